"""The console script ``expmae-crop`` (also ``python -m expmae.facecrop``, and ``accelerate launch -m
expmae.facecrop`` for one share per process: docs/cluster.md): parse the crop settings and the job's flags, run
:func:`expmae.facecrop_folder.crop_folder`, print the summary.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Sequence

from expmae import add_version_argument
# The Python entry to face cropping is imported from here too (`from expmae.facecrop import crop_folder`):
# these names are its API, defined in facecrop_folder (folders) and facecrop_video (one video).
from expmae.facecrop_folder import crop_folder, default_workers, reencode_folder
from expmae.facecrop_video import CropOptions, NoFaceError, crop_video, plan_crop
from expmae.features.common import resolve_device
from expmae.runlock import FolderInUse, FolderLock
from expmae.settings import ConfigError, add_arguments, given
from expmae.shards import Shard, merge_job_logs, resolve_shard
from expmae.video import VIDEO_EXTENSIONS

__all__ = ["CropOptions", "NoFaceError", "build_parser", "crop_folder", "crop_video", "main", "plan_crop",
           "reencode_folder"]


def build_parser() -> argparse.ArgumentParser:
    """The flags of every CropOptions field (settings.add_arguments) plus those of the job: folders, processes,
    shards, --merge / --reencode."""
    p = argparse.ArgumentParser(prog="expmae-crop", description="Crop the main face of every video in a folder into stable square face clips (resumable).")
    add_version_argument(p)
    p.add_argument("input_dir", nargs="?", help="folder of videos (searched recursively)")
    p.add_argument("output_dir", nargs="?", help="where clips/, manifest.jsonl and failures.jsonl go; rerun to resume")
    p.add_argument("--reencode", metavar="CROP_DIR", help="instead of cropping: rewrite the mp4 clips of an expmae-crop "
                   "folder made by an older version in today's stored form (decodes faster; resumable)")
    p.add_argument("--merge", metavar="CROP_DIR", help="instead of cropping: write the single manifest.jsonl and "
                   "failures.jsonl of a folder cropped by several processes (idempotent)")
    add_arguments(p, CropOptions)
    p.add_argument("--workers", type=int, default=None, help="processes, each with its own detector (0: in this "
                   "process, decoding and writing in threads; default: 0 on a GPU, else min(8, cores per launched process))")
    p.add_argument("--write-threads", type=int, default=None, help="with --workers 0: threads cutting and encoding "
                   "clips while the detector runs (default: 1 on a GPU, 0 on the CPU: in the detector's thread)")
    p.add_argument("--shard", default=None, metavar="I/N", help="crop share I of N of the videos (default: from "
                   "accelerate launch / torchrun or a Slurm array; see docs/cluster.md)")
    p.add_argument("--limit", type=int, default=None, help="attempt at most N not-yet-finished videos")
    p.add_argument("--retry-failed", action="store_true", help="retry videos recorded in failures.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        opt = CropOptions(**given(args, CropOptions))  # checked before any folder is touched
    except ConfigError as exc:
        p.error(str(exc))
    if args.reencode:
        try:
            with FolderLock(args.reencode, what="--reencode", create=False):  # one writer per folder
                summary = reencode_folder(args.reencode, crf=opt.crf, keyint=opt.keyint, progress=not args.quiet)
        except (FileNotFoundError, FolderInUse) as exc:
            p.error(str(exc))
        for f in summary.pop("failures"):
            print(f"failed: {f['input']}: {f['reason']}", file=sys.stderr)
        print(json.dumps(summary))
        return 1 if summary["failed"] else 0
    if args.merge:
        try:
            print(json.dumps({"output_dir": args.merge, **merge_job_logs(args.merge)}))
        except FileNotFoundError as exc:
            p.error(str(exc))
        return 0
    if not args.input_dir or not args.output_dir:
        p.error("input_dir and output_dir are required (or --reencode / --merge CROP_DIR)")
    if not Path(args.input_dir).is_dir():
        p.error(f"{args.input_dir}: not a folder")
    try:
        shard = resolve_shard(args.shard)
    except ValueError as exc:
        p.error(str(exc))
    options = {**vars(opt), "device": str(resolve_device(opt.device))}
    workers = default_workers(options["device"]) if args.workers is None else args.workers
    # A lone process owns the folder (expmae.runlock); a sharded run's processes write disjoint shard files.
    lock = FolderLock(args.output_dir, what="output_dir") if shard.count == 1 else contextlib.nullcontext()
    try:  # each process of a launch: its share of the videos, its own manifest and failure shards
        with lock:  # FolderInUse is an OSError: one line below
            summary = crop_folder(args.input_dir, args.output_dir, workers=workers, limit=args.limit,
                                  retry_failed=args.retry_failed, progress=not args.quiet, shard=shard,
                                  write_threads=args.write_threads, **options)
    except (ValueError, TypeError, OSError) as exc:
        p.error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return _report(summary, args, shard)


def _report(summary: dict, args: argparse.Namespace, shard: Shard) -> int:
    if summary["total"] == 0 and shard.count == 1:
        print(f"expmae-crop: no video files ({' '.join(VIDEO_EXTENSIONS)}) under {args.input_dir}", file=sys.stderr)
        return 1
    failures = summary.pop("failures")
    print(json.dumps({**({"shard": str(shard)} if shard.count > 1 else {}), **summary}))
    for f in failures:
        print(f"failed: {f['input']}: {f['reason']}", file=sys.stderr)
    if not summary["ok"]:
        print(f"expmae-crop: nothing succeeded ({summary['failed']} of {summary['total']} failed; see {Path(args.output_dir) / 'failures.jsonl'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
