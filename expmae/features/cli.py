"""Console script ``expmae-features``: per-sample features for the fusion stage, one subcommand per modality.

    expmae-features video FACES FEATURES --model /models/expmae-base    (an expmae-export encoder folder)

Each run writes ``FEATURES/<extractor>/<sample>.npy``, resumable, failures in failures.jsonl; ``--merge`` joins the
shares of a multi-process run. A new modality is one more entry in ``MODALITIES``: a module with
``add_arguments(parser)`` and ``run_cli(args, out_root) -> (out_dir, JobSummary)``. Every modality's command and
folder name: docs/guides/features.md; across GPUs and machines: docs/cluster.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from expmae import add_version_argument
from expmae.jobs import one_line
from expmae.shards import merge_job_logs, resolve_shard

MODALITIES = {
    "audio": ("expmae.features.audio", "HuBERT/wav2vec2 features of each video's sound track (16 kHz mono)"),
    "text": ("expmae.features.text", "BERT-family features of each sample's transcript (MER2023 CSV)"),
    "clip": ("expmae.features.clip", "CLIP image features of face frames, from face-cropped videos"),
    "video": ("expmae.features.visual", "expMAE clip features (sliding windows of T frames) of face videos"),
    "frame": ("expmae.features.visual", "expMAE frame features (evenly spaced frames) of face videos"),
    "tacotron_var": ("expmae.features.tacotron_var",
                     "Tacotron-Var: a Capacitron Tacotron 2's variational prosody embedding of each sound track "
                     "(coqui-tts: pip install 'expmae[tts]')"),
}


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a folder of videos, a .txt list of video paths (text: or the transcript CSV)")
    parser.add_argument("output", type=Path, help="features root: the extractor's folder is created inside")
    parser.add_argument("--model", required=True, help="local model folder (Hugging Face; tacotron_var: a coqui checkpoint or its folder); never downloaded")
    parser.add_argument("--name", default=None, help="the extractor folder's name (default: <model>[-<layers>]-UTT|FRA)")
    parser.add_argument("--pooling", choices=("mean", "none"), default="mean",
                        help="mean: one (D,) vector per sample; none: frame/token level (N, D)")
    parser.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="model precision (features are saved as float32 either way)")
    parser.add_argument("--limit", type=int, default=None, help="process at most this many new samples")
    parser.add_argument("--retry-failed", action="store_true", help="retry samples recorded in failures.jsonl")
    parser.add_argument("--prefetch", type=int, default=2, help="inputs decoded ahead in background threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="process share I of N of the inputs (default: from accelerate launch / torchrun or a "
                             "Slurm array; see docs/cluster.md); each share writes its own manifest shard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expmae-features", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser)
    parser.add_argument("--merge", metavar="FEATURE_DIR", type=Path,
                        help="instead of extracting: write the single manifest.jsonl / failures.jsonl of an extractor "
                             "folder from the shards of its processes (idempotent)")
    sub = parser.add_subparsers(dest="modality", metavar="{" + ",".join(MODALITIES) + "}")
    for name, (module_name, help_text) in MODALITIES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common_arguments(p)
        importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        try:
            print(json.dumps({"out_dir": str(args.merge), **merge_job_logs(args.merge)}))
        except OSError as exc:
            parser.error(one_line(exc))
        return 0
    if not args.modality:
        parser.error(f"choose a modality ({', '.join(MODALITIES)}) or --merge FEATURE_DIR")
    try:
        args.shard = resolve_shard(args.shard)
    except ValueError as exc:
        parser.error(str(exc))
    if args.no_progress:  # transformers' own "Loading weights" bars too (read when transformers is imported)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    module = importlib.import_module(MODALITIES[args.modality][0])
    try:
        out_dir, summary = module.run_cli(args, args.output)  # each process of a launch: its share, its own logs
    except (OSError, ValueError, LookupError, ImportError) as exc:  # setup errors: one line, no traceback
        print(f"expmae-features {args.modality}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps({"out_dir": str(out_dir), **({"shard": str(args.shard)} if args.shard.count > 1 else {}),
                      **summary.as_dict()}))
    if summary.failed:
        print(f"expmae-features {args.modality}: {summary.failed} sample(s) failed, reasons in {out_dir / 'failures.jsonl'}",
              file=sys.stderr)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
