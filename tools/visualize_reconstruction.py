#!/usr/bin/env python
"""``python tools/visualize_reconstruction.py CHECKPOINT CLIPS... --out recon.png``: the same as ``expmae-visualize``
(expmae.visualize.main): a pretrained expMAE's reconstructions of masked clips, as a PNG grid."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout that is not pip-installed

from expmae.visualize import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
