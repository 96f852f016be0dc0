#!/usr/bin/env python
"""``python tools/export_encoder.py CHECKPOINT OUT_DIR ...``: the same as ``expmae-export`` (expmae.export.main)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout that is not pip-installed

from expmae.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
