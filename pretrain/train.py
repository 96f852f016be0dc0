"""Pretraining from a checkout: a thin entry point over the library's loop (expmae.pretrain).

    accelerate launch --config_file pretrain/configs/accelerate/<launcher>.yaml pretrain/train.py \
        --config pretrain/configs/<model>.yaml [--resume auto] [section.key=value ...]

is the same run as ``accelerate launch ... -m expmae.pretrain --config <model>``; see expmae/pretrain/cli.py.
"""
import sys

from expmae.pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
