#!/usr/bin/env python
"""Crop the main face of every video in a folder: `python tools/crop_faces.py INPUT_DIR OUTPUT_DIR [options]`.

The same as the `expmae-crop` console script (see `expmae.facecrop`); `--help` lists the options.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from expmae.facecrop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
