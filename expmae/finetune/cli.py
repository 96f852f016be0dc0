"""The ``expmae-finetune`` command line: flags (or a YAML config) -> FinetuneConfig -> the protocol or ``--compare``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from expmae import add_version_argument
from expmae.finetune.config import FinetuneConfig, load_config
from expmae.runlock import FolderInUse
from expmae.settings import add_arguments, given
from expmae.shipped_configs import add_list_configs_argument, resolve_config


def build_parser() -> argparse.ArgumentParser:
    """The flags of every FinetuneConfig field (settings.add_arguments) plus --config / --list-configs / --version."""
    p = argparse.ArgumentParser(
        prog="expmae-finetune",
        description="Downstream protocol on any labelled face-video set (MER2023 included): K folds (stratified, or "
                    "the set's own split) from feature folders + label CSV; prints the selected metric (MER2023: "
                    "weighted F1 - 0.25 x valence MSE; other sets: UAR). With --videos and --encoder, each fold "
                    "finetunes the expMAE encoder end to end on the face clips.",
    )
    add_version_argument(p)
    add_list_configs_argument(p, ("finetune",))
    p.add_argument("--config", help="YAML file of settings, or a shipped config's name (--list-configs); "
                                    "command-line flags override it")
    add_arguments(p, FinetuneConfig)
    return p


def config_from_args(argv: Sequence[str] | None = None) -> FinetuneConfig:
    args = build_parser().parse_args(argv)
    settings = load_config(resolve_config(args.config, "finetune")) if args.config else {}
    return FinetuneConfig(**{**settings, **given(args, FinetuneConfig)})


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        # deferred: console start-up: torch, timm, sklearn (--help: 1.5 s -> 0.08 s); only a valid config needs them
        from expmae.finetune.compare import run_compare
        from expmae.finetune.protocol import run_finetune

        run_compare(cfg) if cfg.compare else run_finetune(cfg)
    except (ValueError, FileNotFoundError, KeyError, FolderInUse) as exc:
        print(f"expmae-finetune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
