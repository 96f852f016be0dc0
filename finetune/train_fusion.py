"""`python finetune/train_fusion.py --labels train-label.csv --features ... --out runs/mer`: the MER2023 5-fold
fusion protocol in one command. A thin wrapper; the code is expmae.finetune.cli (also the `expmae-finetune` script).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout that is not pip-installed

from expmae.finetune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
