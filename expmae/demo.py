"""`make demo` / `expmae-demo`: the main job end to end on the built-in default, on the CPU, in minutes, no download.

1. a sample set of synthetic talking-face videos (expmae.synthetic), made once and reused;
2. face crops by the crop tool (expmae.facecrop.crop_folder: resumable, so a rerun skips finished videos);
3. expMAE pretraining of a tiny model with 2 DeepSpeed ZeRO-2 ranks on the CPU, through the same
   ``accelerate launch -m expmae.pretrain`` command as a real run (the shipped configs ``tiny_demo`` and
   ``cpu_deepspeed_2proc``);
4. the paths of the checkpoint, the TensorBoard log dir and the reconstruction PNG.

    python -m expmae.demo [--out demo_out] [section.key=value ...]   # overrides go to the training config

Works from an installed package as from a checkout; everything is written under ``--out`` (relative to the
current folder).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from expmae import add_version_argument
from expmae.shipped_configs import find_config

ACCELERATE_CONFIG = find_config("cpu_deepspeed_2proc", ("accelerate",))
TRAIN_CONFIG = find_config("tiny_demo", ("pretrain",))


def free_port() -> int:
    with socket.socket() as s:  # accelerate's default 29500 may be taken by another run on this machine
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_sample_set(videos_dir: Path, n: int, num_frames: int) -> list[Path]:
    from expmae.synthetic import make_face_videos

    expected = [videos_dir / f"face_{i:03d}.mp4" for i in range(n)]
    if all(p.is_file() for p in expected):
        print(f"[1/3] sample set: reusing {n} synthetic face videos in {videos_dir}")
        return expected
    t0 = time.perf_counter()
    paths = make_face_videos(videos_dir, n=n, num_frames=num_frames, size=128, seed=0)
    print(f"[1/3] sample set: wrote {len(paths)} synthetic face videos to {videos_dir} ({time.perf_counter() - t0:.0f} s)")
    return paths


def crop(videos_dir: Path, crops_dir: Path, size: int, workers: int) -> int:
    from expmae.facecrop import crop_folder

    t0 = time.perf_counter()
    summary = crop_folder(videos_dir, crops_dir, size=size, workers=workers)
    done = summary["done"] + summary["skipped"]
    print(f"[2/3] face crops: {summary['done']} cropped, {summary['skipped']} reused, {summary['failed']} failed "
          f"-> {crops_dir} ({time.perf_counter() - t0:.0f} s)")
    for failure in summary["failures"]:
        print(f"      failed: {failure['input']}: {failure['reason']}")
    return done


def pretrain(crops_dir: Path, run_dir: Path, overrides: list[str]) -> int:
    if run_dir.exists():  # the demo always trains from scratch; sample set and crops are what it reuses
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
           "--main_process_port", str(free_port()), "-m", "expmae.pretrain",
           "--config", str(TRAIN_CONFIG), f"data.source={crops_dir}", f"train.output_dir={run_dir}", *overrides]
    # A CPU demo by design (2 ranks on one GPU would collide); OMP threads: one per rank on a 2-core machine.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore::FutureWarning",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"[3/3] pretraining: {' '.join(cmd[1:])}", flush=True)
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="expmae-demo", description=__doc__.split("\n")[0])
    add_version_argument(p)
    p.add_argument("--out", default="demo_out", help="output folder (default %(default)s, git-ignored)")
    p.add_argument("--videos", type=int, default=32, help="synthetic videos in the sample set (default %(default)s)")
    p.add_argument("--frames", type=int, default=64, help="frames per synthetic video (default %(default)s)")
    p.add_argument("--crop-size", type=int, default=64, help="face crop side in pixels (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="crop processes (default %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="training config overrides (python -m expmae.pretrain --help-config)")
    args = p.parse_args(argv)

    from expmae.config import ConfigError, load_config

    out = Path(args.out).resolve()
    crops_dir, run_dir = out / "crops", out / "run"
    try:  # fail on a typo now, not after cropping
        load_config(TRAIN_CONFIG, [f"data.source={crops_dir}", *args.overrides])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    make_sample_set(out / "videos", args.videos, args.frames)
    if crop(out / "videos", crops_dir, args.crop_size, args.workers) == 0:
        print(f"error: no face clips in {crops_dir}; see {crops_dir / 'failures.jsonl'}", file=sys.stderr)
        return 1
    rc = pretrain(crops_dir, run_dir, args.overrides)
    if rc != 0:
        print(f"error: pretraining failed (exit status {rc}); its output is above", file=sys.stderr)
        return rc

    from expmae.checkpoint import latest_checkpoint

    pngs = sorted((run_dir / "recon").glob("step_*.png"))
    print(f"\ndemo finished in {(time.perf_counter() - t0) / 60:.1f} min")
    print(f"  checkpoint:      {latest_checkpoint(run_dir / 'checkpoints')}")
    print(f"  tensorboard:     {run_dir / 'tensorboard'}   (tensorboard --logdir {run_dir / 'tensorboard'})")
    print(f"  reconstruction:  {pngs[-1] if pngs else 'missing'}")
    return 0 if pngs else 1


if __name__ == "__main__":
    sys.exit(main())
