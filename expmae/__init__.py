"""expmae: self-supervised pretraining for facial-expression video.

Kept import-light on purpose: `import expmae` must not pull in deepspeed or facenet-pytorch.
"""

__version__ = "0.1.0"
