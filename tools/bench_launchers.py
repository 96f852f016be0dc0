#!/usr/bin/env python
"""Step time of the same pretraining run under DDP, DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3, through the real launcher.

    python tools/bench_launchers.py                          # CPU: 2 gloo ranks, ViT-S and ViT-B encoders (~15 min)
    python tools/bench_launchers.py --models tiny --rounds 1 --steps 6   # a smoke run
    python tools/bench_launchers.py --device cuda --nproc 8  # one GPU machine (bf16)

Each configuration is a real `accelerate launch -m expmae.pretrain` run (2 ranks by default) on random uint8 .npy
clips (decoding costs nothing), with the ZeRO settings train.py gives the shipped launchers (overlap, ViT-sized
buckets; expmae.pretrain.train.zero_defaults). The step time is read from the run's own TensorBoard throughput
(perf/clips_per_s, logged every 2 steps; the first interval, with start-up, is left out) and its median taken.
Launchers are interleaved round by round, so load drifting on a shared machine hits all of them alike; per model
the ratio to DDP is the median over rounds of the per-round ratio. Output: one JSON object per model and launcher
(JSON Lines) on stdout and, with --out, appended to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ("ddp", "zero1", "zero2", "zero3")
# ZeRO-2 with DeepSpeed's own defaults (no overlap, 5e8-element buckets) instead of train.py's: --launchers ...,zero2_dsdefaults
DS_DEFAULTS = {"zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 500_000_000,
                                     "allgather_bucket_size": 500_000_000},
               **dict.fromkeys(("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                "gradient_clipping"), "auto")}
# encoder presets of the registry at a CPU-sized clip: 4 frames of 64 x 64, patch 16 (32 tubelet tokens)
MODELS = {"tiny": dict(embed_dim=192, depth=12, num_heads=3), "small": dict(embed_dim=384, depth=12, num_heads=6),
          "base": dict(embed_dim=768, depth=12, num_heads=12)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_yaml(name: str, nproc: int, bf16: bool, work: Path) -> dict:
    common = {"compute_environment": "LOCAL_MACHINE", "machine_rank": 0, "num_machines": 1, "num_processes": nproc,
              "rdzv_backend": "static", "same_network": True, "use_cpu": False, "main_training_function": "main",
              "mixed_precision": "bf16" if bf16 else "no", "downcast_bf16": "no"}
    if name == "ddp":
        return {**common, "distributed_type": "MULTI_GPU", "gpu_ids": "all"}
    if name == "zero2_dsdefaults":
        (work / "ds.json").write_text(json.dumps({**DS_DEFAULTS, "bf16": {"enabled": bf16}}))
        common.pop("mixed_precision")
        return {**common, "distributed_type": "DEEPSPEED",
                "deepspeed_config": {"deepspeed_config_file": str(work / "ds.json"), "zero3_init_flag": False}}
    stage = int(name[-1])
    ds = {"zero_stage": stage, "offload_optimizer_device": "none", "offload_param_device": "none",
          "zero3_init_flag": False}
    if stage == 3:
        ds["zero3_save_16bit_model"] = True
    return {**common, "distributed_type": "DEEPSPEED", "deepspeed_config": ds}


def train_config(work: Path, data: Path, model: str, steps: int, batch: int) -> dict:
    return {
        "model": {"name": "tiny", "img_size": 64, "num_frames": 4, "patch_size": 16, **MODELS[model],
                  "mae_decoder_embed_dim": 256, "mae_decoder_depth": 2, "mae_decoder_num_heads": 8,
                  "video_decoder_embed_dim": 256, "video_decoder_depth": 2, "video_decoder_num_heads": 8},
        "data": {"source": str(data), "sample_stride": 1, "num_workers": 1},
        "train": {"output_dir": str(work), "batch_size": batch, "max_steps": steps, "warmup_steps": 1, "lr": 1e-4},
        "log": {"log_every": 2, "recon_every": 0},
        "checkpoint": {"every": 10**6, "keep_last": 1},
    }


def step_time(run: Path, global_batch: int) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload().Scalars("perf/clips_per_s")[1:]
    return statistics.median(global_batch / e.value for e in events)


def run_one(work: Path, data: Path, launcher: str, model: str, args) -> float:
    work.mkdir(parents=True)
    (work / "launcher.yaml").write_text(yaml.safe_dump(launcher_yaml(launcher, args.nproc, args.device != "cpu", work)))
    (work / "train.yaml").write_text(yaml.safe_dump(train_config(work / "run", data, model, args.steps, args.batch_size)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(work / "launcher.yaml"),
           "--main_process_port", str(free_port()), "-m", "expmae.pretrain", "--config", str(work / "train.yaml")]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{launcher} {model} failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return step_time(work / "run", args.batch_size * args.nproc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (gloo ranks) | cuda")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--models", default="small,base", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--launchers", default=",".join(LAUNCHERS), help=f"comma-separated subset of {','.join(LAUNCHERS)},zero2_dsdefaults; the first is the reference")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (one run of each launcher per round)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=2, help="clips per rank per step")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    models, launchers = args.models.split(","), args.launchers.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_launchers_") as tmp:
        data = Path(tmp) / "clips"
        data.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.batch_size * args.nproc * 4):
            np.save(data / f"clip_{i:03d}.npy", rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
        times = {(m, l): [] for m in models for l in launchers}
        for r in range(args.rounds):
            for m in models:
                for l in launchers:
                    times[m, l].append(run_one(Path(tmp) / f"r{r}_{m}_{l}", data, l, m, args))
                    print(f"# round {r} {m} {l}: {times[m, l][-1]:.3f} s/step", file=sys.stderr, flush=True)
    lines = []
    for m in models:
        reference = launchers[0]
        for l in launchers:
            ratios = [a / b for a, b in zip(times[m, l], times[m, reference])]
            lines.append(json.dumps({"model": m, "launcher": l, "device": args.device, "ranks": args.nproc,
                                     "step_s_median": round(statistics.median(times[m, l]), 4),
                                     "step_s": [round(t, 4) for t in times[m, l]],
                                     f"ratio_to_{reference}": round(statistics.median(ratios), 3)}))
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
