"""expmae: self-supervised pretraining for facial-expression video.

Kept import-light on purpose: `import expmae` must not pull in deepspeed or facenet-pytorch.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy public API: torch / timm load only when used.
    if name == "load_encoder":
        from expmae.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'expmae' has no attribute {name!r}")
