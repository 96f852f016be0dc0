"""The seed's ablation in one command: MAE vs VideoMAE vs expMAE (vs a random-init encoder) on the synthetic
expression benchmark's static and dynamic tasks, with an equal pretraining budget.

    python tools/ablation.py [--quick] [--out runs/ablation] [--steps 600] [--identities 40] ...

1. writes both tasks of expmae.synthetic's benchmark (labels carried by the held expression, or only by the
   order of the frames: an expression that appears vs the same one fading), train / held-out identities;
2. pretrains the same encoder in ``mae``, ``videomae`` and ``expmae`` mode for the same number of steps and
   batch size (samples seen) on the train identities' clips of both tasks (``python -m expmae.pretrain``, or
   ``--launcher NAME`` for ``accelerate launch`` with a shipped launcher config); the random-init encoder is
   the architecture those runs start from;
3. exports each, extracts features, and runs the finetune protocol (attention head, unimodal visual) and a
   linear probe on each task, scored on the held-out identities;
4. prints and writes ``table.md`` and ``results.json``: metric_e, metric_v, metric and probe accuracy per
   encoder and task, in the shape of the paper's Table 1.

Reruns reuse the benchmark, finished pretraining runs, exports and features.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODES = ("mae", "videomae", "expmae")
TASKS = ("static", "dynamic")


def model_overrides(size: int) -> list[str]:
    """The tiny encoder every mode trains (tiny_demo's geometry at ``size`` px); decoders as small as the demo's."""
    return ["model.name=tiny", "model.depth=6", f"model.img_size={size}", "model.num_frames=8", "model.patch_size=8",
            "model.tubelet_size=2", "model.mae_decoder_embed_dim=128", "model.mae_decoder_depth=2",
            "model.mae_decoder_num_heads=4",
            "model.video_decoder_embed_dim=128", "model.video_decoder_depth=2", "model.video_decoder_num_heads=4"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="output folder (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a CI-sized run (minutes): tiny set, few steps, 2 folds")
    p.add_argument("--identities", type=int, default=40, help="people per task (default %(default)s)")
    p.add_argument("--test-identities", type=int, default=10, help="of which held out (default %(default)s)")
    p.add_argument("--clips-per-identity", type=int, default=8, help="(default %(default)s)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default %(default)s)")
    p.add_argument("--size", type=int, default=64, help="clip side in pixels, face-crop framing (default %(default)s)")
    p.add_argument("--steps", type=int, default=1200, help="pretraining steps per mode (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="pretraining clips per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="pretraining peak lr (default %(default)s)")
    p.add_argument("--folds", type=int, default=5, help="finetune folds (default %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="finetune epochs (default: expmae-finetune's)")
    p.add_argument("--encoders", default="random," + ",".join(MODES), help="which rows (default %(default)s)")
    p.add_argument("--tasks", default=",".join(TASKS), help="which tasks (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="pretraining seed (default %(default)s)")
    p.add_argument("--launcher", default=None,
                   help="a shipped accelerate config (expmae-configs) to pretrain under accelerate launch; "
                        "default: one process, no launcher")
    args = p.parse_args(argv)
    if args.quick:  # every size stays a flag; --quick only changes the defaults it was given
        for key, value in {"identities": 8, "test_identities": 2, "clips_per_identity": 4, "steps": 12, "folds": 2,
                           "epochs": 5, "size": 32}.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def write_benchmarks(args, out: Path) -> dict[str, dict[str, Path]]:
    from expmae.synthetic import write_expression_benchmark

    sizes = dict(identities=args.identities, test_identities=args.test_identities,
                 clips_per_identity=args.clips_per_identity)
    return {task: write_expression_benchmark(out / "data" / task, task, num_frames=args.frames, size=args.size,
                                             framing="face", **sizes) for task in args.tasks}


def pretrain(args, mode: str, clips: Path, run_dir: Path) -> bool:
    """One mode's run into ``run_dir``; False when an earlier call already finished it (nothing to do)."""
    from expmae.checkpoint import latest_checkpoint, step_dir_name

    last = latest_checkpoint(run_dir / "checkpoints")
    if last is not None and last.name == step_dir_name(args.steps):  # finished by an earlier call
        return False
    model = model_overrides(args.size)
    train = [f"data.source={clips}", "data.sample_stride=2", "data.num_workers=1", f"train.output_dir={run_dir}",
             f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}", f"train.lr={args.lr}",
             f"train.warmup_steps={max(1, args.steps // 15)}", f"train.seed={args.seed}", "train.clip_grad=1.0",
             f"log.log_every={max(1, args.steps // 20)}", "log.recon_every=0", f"checkpoint.every={args.steps}",
             "checkpoint.keep_last=1", f"model.mode={mode}"]
    entry = ["-m", "expmae.pretrain", "--resume", "auto", *model, *train]
    if args.launcher:
        from expmae.shipped_configs import find_config

        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(find_config(args.launcher, ("accelerate",))), *entry]
    else:
        cmd = [sys.executable, *entry]
    env = {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning"}
    print(f"[pretrain {mode}] {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    rows = [e for e in args.encoders.split(",") if e]
    unknown = [t for t in args.tasks if t not in TASKS] + [e for e in rows if e not in ("random", *MODES)]
    if unknown:
        print(f"error: unknown task/encoder {unknown}; tasks: {', '.join(TASKS)}; encoders: random, {', '.join(MODES)}",
              file=sys.stderr)
        return 2
    from expmae.benchmark import evaluate_encoder, markdown_table, run_script, save_random_init_encoder
    from expmae.config import load_config

    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    benchmarks = write_benchmarks(args, out)
    clips = out / "pretrain_clips"  # the unlabelled pretraining set: links to the train identities of every task
    clips.mkdir(parents=True, exist_ok=True)
    for b in benchmarks.values():
        for video in sorted((b["videos"] / "train").glob("*.mp4")):
            if not (clips / video.name).exists():
                (clips / video.name).symlink_to(video)

    encoders = {}
    for name in rows:
        if name == "random":
            continue
        run_dir, encoders[name] = out / "runs" / name, out / "encoders" / name
        # a rerun keeps an existing export (and so the features extracted from it) unless the run trained again
        if pretrain(args, name, clips, run_dir) or not encoders[name].is_dir():
            run_script("expmae-export", [run_dir, encoders[name], "--overwrite"], quiet=True)
    encoders["random"] = out / "encoders" / "random"
    if "random" in rows and not encoders["random"].is_dir():  # the weights every run above started from
        cfg = load_config(None, [f"data.source={clips}", *model_overrides(args.size)])
        save_random_init_encoder(cfg.model.name, cfg.model.overrides(), encoders["random"], seed=args.seed)
    results = {}
    for name in rows:
        results[name] = {task: evaluate_encoder(encoders[name], benchmarks[task], out / "eval" / name / task,
                                                epochs=args.epochs, folds=args.folds) for task in args.tasks}
    table = markdown_table(results, args.tasks)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    print(table)
    print(f"\n{len(rows)} encoders x {len(args.tasks)} tasks in {(time.perf_counter() - t0) / 60:.1f} min; "
          f"table: {out / 'table.md'}, results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
