#!/usr/bin/env python
"""``python tools/extract_features.py MODALITY INPUT OUTPUT --model DIR ...``: the same as ``expmae-features``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout that is not pip-installed

from expmae.features.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
