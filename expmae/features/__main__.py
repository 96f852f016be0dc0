"""``python -m expmae.features`` (and ``accelerate launch -m expmae.features``): the ``expmae-features`` CLI."""
import sys

from expmae.features.cli import main

if __name__ == "__main__":
    sys.exit(main())
