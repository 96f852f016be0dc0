"""The ``expmae-finetune`` command line: flags (or a YAML config) -> FinetuneConfig -> the protocol or ``--compare``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from expmae import add_version_argument
from expmae.finetune.config import FinetuneConfig, load_config
from expmae.shipped_configs import add_list_configs_argument, resolve_config


def build_parser() -> argparse.ArgumentParser:
    from expmae.finetune.heads import HEADS

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
    p.add_argument("--labels", help="Train&Val label CSV (name, a class column, optional regression / split columns)")
    p.add_argument("--features", nargs="+", help="feature folders, BRANCH=FOLDER or FOLDER; repeated BRANCH = concatenated")
    p.add_argument("--test", nargs="+", help="label CSVs or name lists to predict (fold-averaged)")
    p.add_argument("--out", dest="out_dir", help="output folder")
    data = p.add_argument_group("the label set and its folds")
    data.add_argument("--dataset", choices=["auto", "csv", "mer2023"],
                      help="label layout (auto: csv for a file with a 'label' column or --label-column, else mer2023)")
    data.add_argument("--label-column", help="the class column (default: label; MER2023: discrete)")
    data.add_argument("--classes", help="class names in index order, comma-separated (default: sorted; MER2023: its six)")
    data.add_argument("--targets", help="regression columns, comma-separated, or 'none' (default: valence/arousal/"
                                        "dominance columns present; MER2023: valence)")
    data.add_argument("--folds", type=int, help="stratified k-fold (without a split column or files)")
    data.add_argument("--split-column", help="label-CSV column naming each sample's fold (e.g. DFEW 1..5); value "
                                             "'train' is never held out, so train/test is an official split")
    data.add_argument("--split-files", nargs="+", help="one per fold: HELD_OUT or TRAIN:HELD_OUT name lists")
    data.add_argument("--metric", help="picks the best epoch, printed first (auto: MER2023 metric, else uar; also "
                                       "war, weighted_f1, macro_f1, metric_e, ccc/<column>, mse/<column>, ...)")
    heads = p.add_argument_group("heads")
    heads.add_argument("--head", choices=sorted(HEADS))
    heads.add_argument("--compare", help="run these heads on the same folds into one table, e.g. "
                                         "svm,transformer:3,transformer:6,attention,mfb")
    heads.add_argument("--hidden-dim", type=int)
    heads.add_argument("--dropout", type=float)
    heads.add_argument("--factor-k", type=int)
    heads.add_argument("--head-layers", type=int, help="transformer head layers (the paper: 3 and 6)")
    heads.add_argument("--svm-c", type=float, help="SVM regularisation C")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--valence-weight", type=float, help="lambda in CE + lambda * MSE of the regression columns")
    p.add_argument("--seed", type=int)
    p.add_argument("--missing", choices=["drop", "zero", "error"], help="samples lacking a feature file")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch default)")
    p.add_argument("--pseudo-label", choices=["none", "reliable", "weak"])
    p.add_argument("--unlabeled", help="name list of unlabeled samples, or 'auto'")
    p.add_argument("--threshold", type=float)
    p.add_argument("--rounds", type=int)
    p.add_argument("--minority", help="frequency | confidence | class names, e.g. worried,surprise")
    p.add_argument("--num-minority", type=int)
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False)
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    add_video_arguments(p)
    return p


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    e2e = p.add_argument_group("end-to-end mode (expmae.finetune.backends.video)")
    e2e.add_argument("--videos", help="face clips named like the labels: an expmae-crop output folder or a folder of videos")
    e2e.add_argument("--encoder", help="expmae-export encoder folder (or a pretraining run / checkpoint folder)")
    e2e.add_argument("--freeze-encoder", dest="freeze_encoder", action="store_const", const=True,
                     help="train the head only, the encoder stays as loaded")
    e2e.add_argument("--unfreeze-blocks", type=parse_unfreeze_blocks, metavar="N",
                     help="train the encoder's last N blocks (+ its final norm) with the head, the rest frozen (eval "
                          "mode); 0: frozen encoder (probing end to end), -1 (all): full finetuning")
    e2e.add_argument("--layer-decay", type=float, help="lr of block i = lr * layer_decay^(depth - i); head at lr")
    e2e.add_argument("--warmup-epochs", type=float)
    e2e.add_argument("--min-lr", type=float, help="lr at the end of the cosine schedule")
    e2e.add_argument("--drop-path", type=float, help="encoder stochastic depth (default: the encoder config's)")
    e2e.add_argument("--sample-stride", type=int, help="frames between a clip's frames (default: the encoder's)")
    e2e.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                     help="train on whole frames (no multi-scale crop or flip; the clip window stays random)")
    e2e.add_argument("--precision", choices=["fp32", "bf16"])
    e2e.add_argument("--workers", type=int, help="DataLoader processes decoding clips")
    e2e.add_argument("--test-views", type=int,
                     help="temporal views per evaluated sample (held-out fold after every epoch, tests, unlabeled "
                          "pool): N windows spread evenly over the clip, each centre-cropped, class probabilities "
                          "and regression averaged; evaluation costs N times as much (default 1: the centre window)")


def parse_unfreeze_blocks(value: str) -> int:
    """``--unfreeze-blocks``: a block count, or "all" (-1)."""
    if value.strip().lower() == "all":
        return -1
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a number of blocks, or 'all'") from None


def config_from_args(argv: Sequence[str] | None = None) -> FinetuneConfig:
    args = vars(build_parser().parse_args(argv))
    settings = load_config(resolve_config(args.pop("config"), "finetune")) if args.get("config") else {}
    settings.update({k: v for k, v in args.items() if v is not None and k != "config"})
    return FinetuneConfig(**settings)


def main(argv: Sequence[str] | None = None) -> int:
    from expmae.finetune.compare import run_compare
    from expmae.finetune.protocol import run_finetune
    from expmae.runlock import FolderInUse

    try:
        cfg = config_from_args(argv)
        run_compare(cfg) if cfg.compare else run_finetune(cfg)
    except (ValueError, FileNotFoundError, KeyError, FolderInUse) as exc:
        print(f"expmae-finetune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
