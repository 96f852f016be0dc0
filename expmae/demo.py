"""`make demo` / `expmae-demo`: the whole main job on the built-in default, on the CPU, in minutes, no download.

A labelled synthetic expression set -> face crops -> a tiny expMAE pretrained on 2 DeepSpeed ranks (the same
``accelerate launch -m expmae.pretrain`` as a real run) -> export -> held-out reconstruction loss against random
init and trivial predictors -> features -> finetune protocol and linear probe, pretrained vs random init ->
``summary.json``. What it prints and shows: docs/index.md and docs/studies/ablation.md.

    python -m expmae.demo [--out demo_out] [section.key=value ...]   # overrides go to the training config
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from expmae import add_version_argument
from expmae.files import JsonlLog
from expmae.shipped_configs import find_config

ACCELERATE_CONFIG = find_config("cpu_deepspeed_2proc", ("accelerate",))
TRAIN_CONFIG = find_config("tiny_demo", ("pretrain",))
STEPS = 8
RECON_DRAWS = 8  # mask draws averaged per held-out loss (seeds 0..7), the same for every predictor


def free_port() -> int:
    with socket.socket() as s:  # accelerate's default 29500 may be taken by another run on this machine
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(step: int, msg: str) -> None:
    print(f"[{step}/{STEPS}] {msg}", flush=True)


# Each step imports what it runs: `expmae-demo --help` (50 ms) would otherwise load numpy (+150 ms) and torch (+1.5 s).
def make_sample_set(out: Path, args) -> dict[str, Path]:
    from expmae.synthetic import write_expression_benchmark  # deferred: console start-up: numpy

    t0 = time.perf_counter()
    paths = write_expression_benchmark(out, "static", num_frames=args.frames, size=128, framing="scene",
                                       identities=args.identities, test_identities=args.test_identities,
                                       clips_per_identity=args.clips_per_identity)
    n = {split: len(list((paths["videos"] / split).glob("*.mp4"))) for split in ("train", "test")}
    say(1, f"expression set: {n['train']} train + {n['test']} held-out-identity clips in {paths['videos']} "
           f"({time.perf_counter() - t0:.0f} s; reused when present)")
    return paths


def crop(videos_dir: Path, crops_dir: Path, size: int, workers: int) -> int:
    from expmae.facecrop_folder import crop_folder  # deferred: console start-up: numpy

    t0 = time.perf_counter()
    done = 0
    for split in ("train", "test"):
        summary = crop_folder(videos_dir / split, crops_dir / split, size=size, workers=workers)
        done += summary["done"] + summary["skipped"]
        for failure in summary["failures"]:
            print(f"      failed: {failure['input']}: {failure['reason']}")
    say(2, f"face crops: {done} clips -> {crops_dir} ({time.perf_counter() - t0:.0f} s)")
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
    say(3, f"pretraining on the train identities: {' '.join(cmd[1:])}")
    return subprocess.call(cmd, env=env)


def encoders(run_dir: Path, out: Path) -> dict[str, Path]:
    """The pretrained encoder (expmae-export of the run) and the one the run started from (random init)."""
    from expmae.benchmark import run_script, save_random_init_encoder  # deferred: console start-up: torch
    from expmae.config import load_config  # deferred: console start-up: +16 ms on expmae-demo --help

    cfg = load_config(run_dir / "config.yaml")
    pretrained, random_init = out / "encoder", out / "encoder_random_init"
    run_script("expmae-export", [run_dir, pretrained, "--overwrite"], quiet=True)
    save_random_init_encoder(cfg.model.name, cfg.model.overrides(), random_init, seed=cfg.train.seed)
    say(4, f"encoders: pretrained -> {pretrained}, random init (same architecture and seed) -> {random_init}")
    return {"random_init": random_init, "pretrained": pretrained}


def heldout_recon(pretrained, random_init, clips_uint8, *, draws: int = RECON_DRAWS, seed: int = 0) -> dict:
    """Masked-reconstruction losses on held-out clips (uint8 (B, C, T, H, W)) of the pretrained model, its random
    initialisation and the trivial predictors, all on the same ``draws`` mask draws (seeds seed, seed + 1, ...):
    {name: {"loss", "loss_mae", "loss_video"}} for random_init, patch_mean, copy_visible, pretrained."""
    # deferred: console start-up: torch
    import torch

    from expmae.recon_baselines import PREDICTORS
    from expmae.visualize import reconstruction_losses

    cpu = torch.device("cpu")
    scored = reconstruction_losses(pretrained, clips_uint8, seed=seed, draws=draws, device=cpu, baselines=PREDICTORS)
    init = reconstruction_losses(random_init, clips_uint8, seed=seed, draws=draws, device=cpu)["model"]
    return {"random_init": init, **{name: scored[name] for name in PREDICTORS}, "pretrained": scored["model"]}


def reconstruction(run_dir: Path, clips_dir: Path) -> dict:
    """heldout_recon of the run's last checkpoint (encoder and decoders) and of the model it started from, on the
    evaluation views (centre window and crop, the run's frame stride) of every clip in ``clips_dir``."""
    # deferred: console start-up: torch
    import torch

    from expmae.benchmark import random_init_model
    from expmae.config import load_config
    from expmae.visualize import evaluation_clips, load_pretrained, video_paths

    t0 = time.perf_counter()
    cfg = load_config(run_dir / "config.yaml")
    pretrained, _ = load_pretrained(run_dir)
    random_init = random_init_model(cfg.model.name, cfg.model.overrides(), seed=cfg.train.seed).eval()
    clips = evaluation_clips(video_paths([str(clips_dir)]), pretrained.cfg, cfg.data.sample_stride)
    if not clips:
        raise SystemExit(f"error: no readable held-out clip in {clips_dir}; see its failures.jsonl")
    losses = heldout_recon(pretrained, random_init, torch.stack(clips))
    say(5, f"held-out masked reconstruction: {len(clips)} clips x {RECON_DRAWS} mask draws "
           f"({time.perf_counter() - t0:.0f} s)")
    return {"clips": len(clips), "draws": RECON_DRAWS, **losses}


def evaluate(encoder_dirs: dict[str, Path], benchmark: dict[str, Path], crops_dir: Path, out: Path) -> dict:
    from expmae.benchmark import evaluate_encoder  # deferred: console start-up: torch

    t0 = time.perf_counter()
    # Always from scratch, as the run: features are resumable per file and keyed by the encoder's config, not its
    # weights, so a rerun would otherwise score the new encoder on the last run's features.
    shutil.rmtree(out / "eval", ignore_errors=True)
    results = {}
    for name, encoder_dir in encoder_dirs.items():
        results[name] = evaluate_encoder(encoder_dir, benchmark, out / "eval" / name,
                                         videos=[crops_dir / "train", crops_dir / "test"])
    say(6, f"features -> {out / 'eval' / '*' / 'features'}")
    say(7, f"5-fold finetune + linear probe, scored on held-out identities ({time.perf_counter() - t0:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="expmae-demo", description=__doc__.split("\n")[0])
    add_version_argument(p)
    p.add_argument("--out", default="demo_out", help="output folder (default %(default)s, git-ignored)")
    p.add_argument("--identities", type=int, default=16, help="people in the expression set (default %(default)s)")
    p.add_argument("--test-identities", type=int, default=4, help="of which held out (default %(default)s)")
    p.add_argument("--clips-per-identity", type=int, default=8, help="clips per person (default %(default)s)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default %(default)s)")
    p.add_argument("--crop-size", type=int, default=64, help="face crop side in pixels (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="crop processes (default %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="training config overrides (python -m expmae.pretrain --help-config)")
    args = p.parse_args(argv)

    from expmae.config import ConfigError, load_config  # deferred: console start-up: +16 ms on expmae-demo --help

    out = Path(args.out).resolve()
    crops_dir, run_dir = out / "crops", out / "run"
    try:  # fail on a typo now, not after cropping
        load_config(TRAIN_CONFIG, [f"data.source={crops_dir}", *args.overrides])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    benchmark = make_sample_set(out / "benchmark", args)
    if crop(benchmark["videos"], crops_dir, args.crop_size, args.workers) == 0:
        print(f"error: no face clips in {crops_dir}; see its failures.jsonl", file=sys.stderr)
        return 1
    rc = pretrain(crops_dir / "train", run_dir,
                  # online evaluation at steps 0, 100, 200, 300: every crop, the split column's train people fit
                  # the probes, the held-out people score them
                  [f"eval.source={crops_dir}", f"eval.labels={benchmark['clips']}", "eval.every=100", "eval.knn_k=10",
                   *args.overrides])
    if rc != 0:
        print(f"error: pretraining failed (exit status {rc}); its output is above", file=sys.stderr)
        return rc
    encoder_dirs = encoders(run_dir, out)
    recon = reconstruction(run_dir, crops_dir / "test")
    results = evaluate(encoder_dirs, benchmark, crops_dir, out)
    summary = {
        "heldout_recon": {k: recon[k]["loss"] for k in ("random_init", "patch_mean", "copy_visible", "pretrained")},
        "probe": {k: r["probe"]["accuracy"] for k, r in results.items()},
        "metric": {k: r["finetune"]["metric"] for k, r in results.items()},
    }
    # Said as measured: a short CPU pretraining need not beat random features (see the README's demo section).
    summary["pretrained_better"] = {k: summary[k]["pretrained"] > summary[k]["random_init"] for k in ("probe", "metric")}
    summary["pretrained_better"]["heldout_recon"] = summary["heldout_recon"]["pretrained"] < summary["heldout_recon"]["random_init"]
    summary["online_eval"] = online_curve(run_dir)
    summary["details"] = {**results, "heldout_recon": recon}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report(summary, run_dir, out, time.perf_counter() - t0)
    return 0


def report(summary: dict, run_dir: Path, out: Path, seconds: float) -> None:
    say(STEPS, f"demo finished in {seconds / 60:.1f} min; held-out identities:")
    report_reconstruction(summary["details"]["heldout_recon"])
    report_online_curve(summary["online_eval"])
    report_probes(summary)
    report_paths(summary, run_dir, out)


def report_reconstruction(recon: dict) -> None:
    """What a short pretraining does show: the held-out masked-reconstruction loss against its references."""
    print(f"  masked-reconstruction loss, lower is better ({recon['clips']} clips x {recon['draws']} mask draws; "
          "loss = the branches as the model weighs them):")
    for name in ("random_init", "patch_mean", "copy_visible", "pretrained"):
        r = recon[name]
        branches = ", ".join(f"{k.removeprefix('loss_')} {r[k]:.4f}" for k in ("loss_mae", "loss_video") if k in r)
        print(f"    {name:13s} {r['loss']:.4f}  ({branches})")
    # per branch too: a total below a reference can hide a branch that learned nothing beyond it
    mine = recon["pretrained"]
    verdicts = []
    for name in ("random_init", "patch_mean", "copy_visible"):
        says = [f"{k.removeprefix('loss_')} {'yes' if mine[k] < recon[name][k] else 'no'}"
                for k in ("loss", "loss_mae", "loss_video") if k in mine]
        verdicts.append(f"{name}: {', '.join(says)}")
    print(f"    pretrained below {'; '.join(verdicts)}")


def online_curve(run_dir: Path) -> dict:
    """The pretraining's online evaluation (kNN and linear probe of the frozen encoder on the held-out people) at
    its first step (the random-init twin) and its last."""
    records = [r for r in JsonlLog(run_dir / "metrics.jsonl").read() if "eval/knn_acc" in r]
    keys = ("eval/knn_acc", "eval/probe_acc", "eval/probe_uar")
    return {"steps": [r["step"] for r in records],
            **({"first": {k: records[0][k] for k in keys}, "last": {k: records[-1][k] for k in keys}} if records else {})}


def report_online_curve(curve: dict) -> None:
    if "first" not in curve:
        print("  online evaluation: not logged (eval.source unset)")
        return
    first, last = curve["first"], curve["last"]
    print(f"  online probes of the frozen encoder during this 2-minute CPU pretraining, held-out people "
          f"(step {curve['steps'][0]} = random init -> step {curve['steps'][-1]}):")
    for key, name in (("eval/knn_acc", "kNN"), ("eval/probe_acc", "linear probe")):
        print(f"    {name:13s} {first[key]:.3f} -> {last[key]:.3f}")
    print("    (a few hundred CPU steps; what a long run shows: tools/learning_curve.py and the learning-curve study in "
          "the docs)")


def report_probes(summary: dict) -> None:
    for name in ("random_init", "pretrained"):
        f = summary["details"][name]["finetune"]
        print(f"  {name:12s} probe accuracy {summary['probe'][name]:.3f} | metric {f['metric']:.3f} "
              f"(metric_e {f['metric_e']:.3f}, metric_v {f['metric_v']:.3f})")
    better = summary["pretrained_better"]
    print(f"  pretrained beats random init: probe {'yes' if better['probe'] else 'no'}, "
          f"metric {'yes' if better['metric'] else 'no'}")


def report_paths(summary: dict, run_dir: Path, out: Path) -> None:
    from expmae.checkpoint import latest_checkpoint  # deferred: console start-up: torch

    pngs = sorted((run_dir / "recon").glob("step_*.png"))
    details = summary["details"]
    print(f"  checkpoint:       {latest_checkpoint(run_dir / 'checkpoints')}")
    print(f"  tensorboard:      {run_dir / 'tensorboard'}   (tensorboard --logdir {run_dir / 'tensorboard'})")
    print(f"  reconstruction:   {pngs[-1] if pngs else 'missing'}")
    print(f"  encoder:          {out / 'encoder'}")
    print(f"  features:         {details['pretrained']['features']}")
    print(f"  results:          {out / 'eval' / 'pretrained' / 'finetune' / 'results.json'}")
    print(f"  confusion matrix: {details['pretrained']['finetune']['confusion_matrix_png']}")
    print(f"  summary:          {out / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
