"""expmae: self-supervised pretraining for facial-expression video.

Kept import-light on purpose: `import expmae` must not pull in deepspeed or facenet-pytorch.
"""

__version__ = "0.1.0"  # the one place: setup.cfg reads it, every console script prints it with --version


def add_version_argument(parser) -> None:
    """``--version`` for a console script's argparse parser: prints the program name and expmae's version."""
    parser.add_argument("--version", action="version", version=f"%(prog)s (expmae) {__version__}")


def __getattr__(name: str):
    # Lazy public API: torch / timm load only when used.
    if name == "load_encoder":
        from expmae.weights import load_encoder  # deferred: upward shim: `import expmae` loads no torch

        return load_encoder
    raise AttributeError(f"module 'expmae' has no attribute {name!r}")
