"""Learning curves: does pretraining make better expression features, and from how many samples on?

    python tools/learning_curve.py --out runs/learning [--modes expmae,mae,videomae] [--seeds 0,1] [--steps 30000]
                                   [--eval-every 1000] [--random-seeds 8] [--supervised-steps 3000] [--quick]

On the learning benchmark (expmae.learning_benchmark: an unlabelled pool of other people with real-crop nuisance,
and per task a labelled set split by identity), it

1. renders the benchmark (once; resumable);
2. pretrains one run per mode and seed with online evaluation on (``python -m expmae.pretrain --resume auto``:
   a killed study continues where it stopped, a finished run is not redone);
3. scores the references with the same evaluator (expmae.pretrain.online_eval): the random-init encoder over
   ``--random-seeds`` init seeds (a band, not one draw), raw pixels, and a supervised reference (the same encoder
   trained end to end on the pool's labels of the task);
4. writes ``curves.json``, ``table.md`` (Table-1 shaped: rows random / supervised / pixels / each mode) and one PNG
   per task (``curve_<task>.png``): accuracy against samples seen, per probe and read-out, mean and spread over
   seeds per mode, the random-init band, the pixel and supervised levels.

``--quick``: a toy benchmark and a few steps, for CI (writes every artefact; shows nothing about learning).
``--launcher CONFIG``: run the pretraining under ``accelerate launch --config_file CONFIG`` (GPUs, several ranks).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from expmae.files import write_json  # noqa: E402  (after the path: runs from a checkout)

MODES = ("expmae", "mae", "videomae")
PROBES = ("knn", "linear")
READOUTS = ("mean", "position")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/learning"))
    p.add_argument("--config", default="learning_small", help="pretraining config (name or YAML path)")
    p.add_argument("--modes", default="expmae", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--seeds", default="0", help="pretraining seeds, comma-separated")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's)")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--layers", default="-1,2", help="hidden states probed (the first is the headline)")
    p.add_argument("--random-seeds", type=int, default=8, help="init seeds of the random-init band")
    p.add_argument("--supervised-steps", type=int, default=3000,
                   help="steps of the end-to-end references (the encoder from scratch; 0: none of them)")
    p.add_argument("--cnn-steps", type=int, default=2000, help="steps of the frame-CNN reference (0: none)")
    p.add_argument("--reference-tasks", default="static,dynamic", help="tasks the end-to-end references train on")
    p.add_argument("--finetune", action="store_true",
                   help="also finetune each mode's pretrained encoder end to end with the supervised recipe")
    p.add_argument("--batch-size", type=int, default=None, help="pretraining batch per rank (default: the config's)")
    p.add_argument("--launcher", default=None, help="accelerate config file: launch pretraining through accelerate")
    p.add_argument("--device", default="auto", help="references' device (pretraining: the launcher's)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering the benchmark")
    p.add_argument("--quick", action="store_true", help="toy sizes for CI")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="more pretraining config overrides")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- pretraining
def run_dir(out: Path, mode: str, seed: int) -> Path:
    return out / "runs" / f"{mode}_seed{seed}"


def pretrain(args, bench: dict, mode: str, seed: int) -> Path:
    """One pretraining run with online evaluation, resumed if it was started before (finished: returns at once)."""
    folder = run_dir(args.out, mode, seed)
    overrides = [f"data.source={bench['pool']}", f"train.output_dir={folder}", f"model.mode={mode}",
                 f"train.seed={seed}", f"eval.source={bench['labelled']}",
                 f"eval.labels={bench['labelled'] / 'labels.csv'}", f"eval.every={args.eval_every}",
                 f"eval.layers=[{args.layers}]", f"checkpoint.every={args.eval_every}", *quick_overrides(args),
                 *([f"train.max_steps={args.steps}"] if args.steps else []),
                 *([f"train.batch_size={args.batch_size}"] if args.batch_size else []), *args.overrides]
    entry = ["-m", "expmae.pretrain", "--config", args.config, "--resume", "auto", *overrides]
    if args.launcher:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.launcher, *entry]
    else:
        cmd = [sys.executable, *entry]
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(folder / "console.log", "a") as log:
        print(f"[learning_curve] {mode} seed {seed}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc:
        raise SystemExit(f"pretraining {mode} seed {seed} failed (exit status {rc}); see {folder / 'console.log'}")
    return folder


def quick_overrides(args) -> list[str]:
    if not args.quick:
        return []
    return ["train.max_steps=6", "train.warmup_steps=1", "eval.every=3", "checkpoint.every=3", "log.log_every=3",
            "log.recon_every=0", "train.batch_size=4", "data.num_workers=0", "eval.knn_k=5"]


def eval_records(folder: Path) -> list[dict]:
    """The online evaluation's records of a run's metrics.jsonl, by step."""
    from expmae.files import JsonlLog

    return sorted((r for r in JsonlLog(folder / "metrics.jsonl").read() if any(k.startswith("eval/") for k in r)),
                  key=lambda r: r["step"])


# ---------------------------------------------------------------------------------------------- references
def load_config(args, extra=()):
    from expmae.config import load_config as load
    from expmae.shipped_configs import resolve_config

    return load(resolve_config(args.config, "pretrain"), [*quick_overrides(args), *args.overrides, *extra])


def evaluator_for(cfg, encoder, device):
    from expmae.pretrain.online_eval import OnlineEvaluator

    return OnlineEvaluator(cfg.eval, encoder, sample_stride=cfg.data.sample_stride, rank=0, world=1, device=device)


def random_init_band(args, cfg, device) -> list[dict]:
    """The online evaluation of the random-init encoder for init seeds 0..n-1 (seed s = a run's step 0)."""
    from accelerate.utils import set_seed

    from expmae.model import create_model

    cache = args.out / "references" / "random_init.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    for seed in range(args.random_seeds):
        if str(seed) not in done:
            set_seed(seed)  # as the training loop seeds before it builds the model
            model = create_model(cfg.model.name, **cfg.model.overrides())
            done[str(seed)] = evaluator_for(cfg, model.encoder, device)(model.encoder.to(device))
            write_json(cache, done)
    return [done[str(s)] for s in range(args.random_seeds)]


def pixel_reference(evaluator) -> dict:
    """The same probes on raw pixels: each clip's windows (3, T, S, S) at half resolution, as "pixels/clip", and
    their mean over time (one vector per position), as "pixels/position"."""
    import torch
    import torch.nn.functional as F

    from expmae.pretrain.online_eval import pool_by_clip

    batch = evaluator.batch
    pixels = batch["pixels"][:, torch.as_tensor(batch["windows"])].permute(1, 0, 2, 3, 4).float() / 255  # (W, 3, T, S, S)
    small = F.avg_pool3d(pixels, (1, 2, 2))  # (W, 3, T, S/2, S/2)
    per_window = {"pixels/clip": small.flatten(1).numpy(), "pixels/position": small.mean(2).flatten(1).numpy()}
    feats = pool_by_clip(per_window, evaluator.owner, len(evaluator.mine))  # as the encoder's read-outs are
    return evaluator.score(evaluator.mine, feats, probes=[p for p in evaluator.cfg.probes if p != "attentive"])


def supervised_split(bench: dict, task: str) -> tuple[tuple, tuple]:
    """The supervised reference's clips of ``task``: trained on the pool's labelled clips and the labelled set's
    train people, scored on its held-out people (the probes' test set)."""
    import csv

    from expmae.learning_benchmark import read_labels

    with open(bench["pool_labels"], newline="") as f:
        pool = {r["name"]: r["discrete"] for r in csv.DictReader(f) if r["task"] == task}
    rows = read_labels(bench["labelled"], task)
    train = {r["name"]: r["discrete"] for r in rows if r["split"] == "train"}
    paths = [str(bench["pool"] / f"{n}.npy") for n in pool] + [r["path"] for r in rows if r["split"] == "train"]
    test = {r["name"]: r["discrete"] for r in rows if r["split"] == "test"}
    return (paths, {**pool, **train}), (bench["labelled"] / "clips", test)


def end_to_end(args, cfg, bench: dict, name: str, recipe, *, device, evaluator=None) -> dict:
    """One end-to-end reference per task (expmae.supervised_reference), in ``references/<name>_<task>``: its own
    head's held-out accuracy and, when it has an encoder, the same probes on that encoder. Resumes a stopped
    run; cached when finished."""
    from expmae.supervised_reference import SupervisedReference

    results = {}
    for task in args.reference_tasks.split(","):
        folder = args.out / "references" / f"{name}_{task}"
        cache = folder / "scores.json"
        done = json.loads(cache.read_text()) if cache.is_file() else {"recipe": {}}
        if {k: done["recipe"].get(k) for k in recipe.identity()} == recipe.identity():
            results[task] = done
            continue
        ref = SupervisedReference(cfg, *supervised_split(bench, task), folder, recipe, device,
                                  num_workers=min(cfg.data.num_workers, 4))
        encoder = ref.run(progress=not args.quick)
        scores = {} if encoder is None or evaluator is None else evaluator(encoder)
        results[task] = {**{k: v for k, v in scores.items() if k.startswith(f"eval/{task}/")}, **ref.summary()}
        write_json(cache, results[task])
        print(f"[learning_curve] {name}, {task}: held-out head accuracy {results[task]['head_acc']:.3f}", flush=True)
    return results


def end_to_end_references(args, cfg, bench: dict, runs: dict, *, device, evaluator) -> dict:
    """The ceiling: the encoder trained from scratch ("supervised"), a frame CNN ("frame_cnn"), and with
    ``--finetune`` the same recipe from each mode's seed-0 pretrained encoder ("finetuned_<mode>")."""
    import dataclasses

    from expmae.checkpoint import find_checkpoint
    from expmae.supervised_reference import SupervisedRecipe

    base = SupervisedRecipe(steps=args.supervised_steps)
    if args.quick:
        base = dataclasses.replace(base, batch_size=4, warmup_steps=1, eval_every=2, save_every=2)
    refs = {"supervised": end_to_end(args, cfg, bench, "supervised", base, device=device, evaluator=evaluator)}
    if args.cnn_steps:
        cnn = dataclasses.replace(base, steps=args.cnn_steps, model="frame_cnn")
        refs["frame_cnn"] = end_to_end(args, cfg, bench, "frame_cnn", cnn, device=device)
    for mode, seeds in runs.items() if args.finetune else ():
        init = str(find_checkpoint(next(iter(seeds.values())) / "checkpoints").resolve())
        refs[f"finetuned_{mode}"] = end_to_end(args, cfg, bench, f"finetuned_{mode}",
                                               dataclasses.replace(base, init=init), device=device, evaluator=evaluator)
    return refs


def main(argv=None) -> int:
    args = parse_args(argv)
    from expmae.learning_benchmark import LearningBenchmarkSize, write_learning_benchmark

    if args.quick:
        args.random_seeds, args.supervised_steps = min(args.random_seeds, 2), min(args.supervised_steps, 4)
        args.cnn_steps = min(args.cnn_steps, 4)
    t0 = time.perf_counter()
    size = LearningBenchmarkSize.quick() if args.quick else LearningBenchmarkSize()
    bench = write_learning_benchmark(args.out / "benchmark", size, workers=args.workers, progress=not args.quick)
    print(f"[learning_curve] benchmark: {args.out / 'benchmark'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    runs = {mode: {seed: pretrain(args, bench, mode, seed) for seed in map(int, args.seeds.split(","))}
            for mode in args.modes.split(",")}
    from expmae.features.common import resolve_device

    device = resolve_device(args.device)
    cfg = load_config(args, [f"data.source={bench['pool']}", f"eval.source={bench['labelled']}",
                             f"eval.labels={bench['labelled'] / 'labels.csv'}", f"eval.layers=[{args.layers}]"])
    band = random_init_band(args, cfg, device)
    refs = {"random_init": band, "pixels": pixel_reference(evaluator_for(cfg, _any_encoder(cfg), "cpu"))}
    if args.supervised_steps:
        refs.update(end_to_end_references(args, cfg, bench, runs, device=device,
                                          evaluator=lambda enc: evaluator_for(cfg, enc, device)(enc)))
    curves = {mode: {seed: eval_records(folder) for seed, folder in seeds.items()} for mode, seeds in runs.items()}
    written = write_report(args.out, curves, refs, samples_per_step=samples_per_step(args, cfg),
                           headline=headline_layer(args, cfg), held_out=held_out_counts(bench))
    print(f"[learning_curve] done in {(time.perf_counter() - t0) / 60:.1f} min: " + ", ".join(map(str, written)))
    return 0


# ---------------------------------------------------------------------------------------------- the report
def held_out_counts(bench: dict) -> dict:
    from expmae.learning_benchmark import read_labels

    rows = read_labels(bench["labelled"])
    return {task: sum(r["split"] == "test" for r in rows if r["task"] == task) for task in {r["task"] for r in rows}}


def samples_per_step(args, cfg) -> int:
    """Clips per optimizer step: batch x accumulation x ranks (the launcher config's num_processes)."""
    world = 1
    if args.launcher:
        import yaml

        launcher = yaml.safe_load(Path(args.launcher).read_text()) or {}
        world = int(launcher.get("num_processes", 1))  # accelerate's count over all machines
    return cfg.train.batch_size * cfg.train.grad_accum_steps * world


def headline_layer(args, cfg) -> str:
    """The first probed layer's key ("L4"): the one every run logs as eval/<task>/knn_acc."""
    from expmae.model_config import get_config
    from expmae.pretrain.online_eval import layer_key

    depth = get_config(cfg.model.name, **cfg.model.overrides()).depth
    return f"L{layer_key(int(args.layers.split(',')[0]), depth)}"


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([r["step"] for r in records if key in r])
    return steps, np.array([r[key] for r in records if key in r])


def end_to_end_names(refs: dict) -> list[str]:
    return [name for name in refs if name not in ("random_init", "pixels")]


def summarise(curves: dict, refs: dict, task: str, layer: str, samples_per_step: int, held_out: int) -> dict:
    """Per probe and read-out: the references, the ceiling (the best own head of the references trained from
    scratch; a finetuned pretrained encoder is a result, not a reference) and its
    margin over pixels and the random-init band, and, per mode, the curve (mean and spread over seeds) and the
    first samples-seen count where its mean leaves the random-init band upwards (None: never). ``held_out``: the
    clips scored (for the 95% intervals)."""
    heads = {name: refs[name][task]["head_acc"] for name in end_to_end_names(refs) if task in refs[name]}
    scratch = {name: acc for name, acc in heads.items() if not name.startswith("finetuned_")}  # no pretraining
    ceiling = max(scratch, key=scratch.get) if scratch else None
    out = {}
    for readout in READOUTS:
        for probe in PROBES:
            key = f"eval/{task}/{layer}/{readout}/{probe}_acc"
            band = np.array([r[key] for r in refs["random_init"] if key in r])
            pixel = refs["pixels"].get(f"eval/{task}/pixels/{'clip' if readout == 'mean' else 'position'}/{probe}_acc")
            entry = {"random_init": {"mean": float(band.mean()), "sd": float(band.std()), "min": float(band.min()),
                                     "max": float(band.max()), "n": int(len(band))},
                     "pixels": pixel, "held_out": held_out, "end_to_end": heads, "modes": {},
                     "probed": {name: refs[name][task].get(key) for name in heads}}  # probes on their encoders
            entry["supervised"] = entry["probed"].get("supervised")
            if ceiling is not None:  # how far the best untrained read-out stays below what training reaches
                entry["ceiling"] = {"reference": ceiling, "head_acc": heads[ceiling]}
                entry["ceiling_margin"] = heads[ceiling] - max(band.max(), pixel if pixel is not None else 0.0)
            entry["modes"] = {mode: mode_curve(seeds, key, band, samples_per_step) for mode, seeds in curves.items()}
            out[f"{readout}/{probe}"] = entry
    return out


def mode_curve(seeds: dict, key: str, band: np.ndarray, samples_per_step: int) -> dict:
    """One mode's curve: mean and spread over seeds, and where its mean leaves / stays above the band."""
    runs = [series(records, key) for records in seeds.values()]
    steps = runs[0][0]
    accs = np.stack([a[: len(steps)] for _, a in runs if len(a) >= len(steps)])  # (seeds, points)
    mean = accs.mean(0)
    above = np.nonzero(mean > band.max())[0]
    below = np.nonzero(mean <= band.max())[0]  # stays above the band after the last point inside it
    stays = below[-1] + 1 if len(below) else 0
    return {"samples": (steps * samples_per_step).tolist(), "mean": mean.tolist(), "min": accs.min(0).tolist(),
            "max": accs.max(0).tolist(), "seeds": len(accs), "last": float(mean[-1]), "best": float(mean.max()),
            "leaves_band_at": int(steps[above[0]] * samples_per_step) if len(above) else None,
            "above_band_from": int(steps[stays] * samples_per_step) if stays < len(steps) else None}


def plot(summary: dict, task: str, layer: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(READOUTS), len(PROBES), figsize=(5 * len(PROBES), 3.6 * len(READOUTS)), squeeze=False)
    for (i, readout), (j, probe) in ((a, b) for a in enumerate(READOUTS) for b in enumerate(PROBES)):
        ax, entry = axes[i][j], summary[f"{readout}/{probe}"]
        band = entry["random_init"]
        ax.axhspan(band["min"], band["max"], color="grey", alpha=0.25, label=f"random init ({band['n']} seeds)")
        ax.axhline(band["mean"], color="grey", lw=1)
        if entry["pixels"] is not None:
            ax.axhline(entry["pixels"], color="black", ls="--", lw=1, label="pixels")
        if entry["supervised"] is not None:
            ax.axhline(entry["supervised"], color="green", ls=":", lw=1.5, label="supervised encoder, probed")
        if "ceiling" in entry:
            ax.axhline(entry["ceiling"]["head_acc"], color="purple", ls="-.", lw=1.5,
                       label=f"ceiling: {entry['ceiling']['reference']}, own head")
        for mode, curve in entry["modes"].items():
            line, = ax.plot(curve["samples"], curve["mean"], marker=".", label=f"{mode} ({curve['seeds']} seeds)")
            ax.fill_between(curve["samples"], curve["min"], curve["max"], color=line.get_color(), alpha=0.2)
        ax.set_title(f"{task}: {probe} probe, {readout} read-out, {layer}")
        ax.set_xlabel("pretraining samples seen")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def with_interval(acc: float | None, n: int) -> str:
    """"0.620 [0.57, 0.67]": an accuracy on n held-out clips and its 95% (Wilson) interval."""
    from expmae.probe import accuracy_interval

    if acc is None:
        return "-"
    low, high = accuracy_interval(acc, n)
    return f"{acc:.3f} [{low:.2f}, {high:.2f}]"


def markdown(summaries: dict, layer: str) -> str:
    """Table-1 shaped, per task: rows random init / pixels / the end-to-end references' encoders probed / each
    mode's last point, columns the probes and read-outs at the headline layer; then the ceiling's margin and the
    end-to-end references' own heads. 95% intervals on the held-out people."""
    cols = [f"{readout}/{probe}" for readout in READOUTS for probe in PROBES]
    lines = []
    for task, summary in summaries.items():
        cell = {c: summary[c] for c in cols}
        first = cell[cols[0]]
        n = first["held_out"]
        lines += [f"**{task}** ({layer}; accuracy on {n} held-out clips, [95% interval])", "",
                  "| encoder | " + " | ".join(c.replace("/", " ") for c in cols) + " |", "|---|" + "---|" * len(cols)]
        lines.append("| random init (mean, min-max) | " + " | ".join(
            f"{e['random_init']['mean']:.3f} ({e['random_init']['min']:.2f}-{e['random_init']['max']:.2f})" for e in cell.values()) + " |")
        lines.append("| pixels | " + " | ".join(with_interval(e["pixels"], n) for e in cell.values()) + " |")
        for name in (k for k, v in first["probed"].items() if v is not None):
            lines.append(f"| {name} (its encoder, probed) | "
                         + " | ".join(with_interval(e["probed"][name], n) for e in cell.values()) + " |")
        for mode in first["modes"]:
            lines.append(f"| {mode} (last; best) | " + " | ".join(
                f"{e['modes'][mode]['last']:.3f}; {e['modes'][mode]['best']:.3f}" for e in cell.values()) + " |")
            lines.append(f"| {mode}: above the random band from (samples seen) | " + " | ".join(
                "never" if e["modes"][mode]["above_band_from"] is None else f"{e['modes'][mode]['above_band_from']:,}"
                for e in cell.values()) + " |")
        if "ceiling" in first:
            lines.append(f"| ceiling margin: {first['ceiling']['reference']}'s head - max(pixels, random-init max) | "
                         + " | ".join(f"{e['ceiling_margin']:+.3f}" for e in cell.values()) + " |")
            lines += ["", "| trained end to end (its own head) | held-out accuracy |", "|---|---|"]
            lines += [f"| {name} | {with_interval(acc, n)} |" for name, acc in first["end_to_end"].items()]
        lines.append("")
    return "\n".join(lines)


def write_report(out: Path, curves: dict, refs: dict, *, samples_per_step: int, headline: str,
                 held_out: dict) -> list[Path]:
    tasks = sorted({k.split("/")[1] for k in refs["random_init"][0] if k.count("/") >= 3})
    summaries = {task: summarise(curves, refs, task, headline, samples_per_step, held_out[task]) for task in tasks}
    write_json(out / "curves.json", {"headline_layer": headline, "samples_per_step": samples_per_step,
                                     "summary": summaries, "references": refs, "curves": curves})
    (out / "table.md").write_text(markdown(summaries, headline))
    end_to_end_plots = [plot_end_to_end(out, t, summaries[t]) for t in tasks
                        if summaries[t][f"{READOUTS[0]}/linear"]["end_to_end"]]
    return [out / "curves.json", out / "table.md", *end_to_end_plots,
            *(plot(summaries[t], t, headline, out / f"curve_{t}.png") for t in tasks)]


def plot_end_to_end(out: Path, task: str, summary: dict) -> Path:
    """``end_to_end_<task>.png``: each end-to-end reference's held-out head accuracy against its training samples,
    with the random-init band and pixels of the probes (mean read-out, linear) for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from expmae.files import JsonlLog

    entry = summary[f"{READOUTS[0]}/linear"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.axhspan(entry["random_init"]["min"], entry["random_init"]["max"], color="grey", alpha=0.25,
               label="random init, linear probe (band)")
    if entry["pixels"] is not None:
        ax.axhline(entry["pixels"], color="black", ls="--", lw=1, label="pixels, linear probe")
    for name in entry["end_to_end"]:
        folder = out / "references" / f"{name}_{task}"
        records = JsonlLog(folder / "curve.jsonl").read()
        batch = json.loads((folder / "summary.json").read_text())["recipe"]["batch_size"]
        ax.plot([r["step"] * batch for r in records], [r["head_acc"] for r in records], marker=".", label=name)
    ax.set_title(f"{task}: trained end to end, own head")
    ax.set_xlabel("labelled training samples seen")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"end_to_end_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _any_encoder(cfg):
    from expmae.model import create_model

    return create_model(cfg.model.name, **cfg.model.overrides()).encoder  # for decoding clips; weights unused


if __name__ == "__main__":
    sys.exit(main())
