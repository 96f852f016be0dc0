"""`make demo` from a checkout: a thin entry point over expmae.demo (``python -m expmae.demo`` when installed)."""
import sys

from expmae.demo import main

if __name__ == "__main__":
    sys.exit(main())
