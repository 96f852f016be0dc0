"""Judge encoders on the synthetic expression benchmark (expmae.synthetic): features, a linear probe and the
finetune protocol, for a pretrained encoder and for the same architecture at its random initialisation.

Used by ``make demo`` (pretrained vs random-init) and ``tools/ablation.py`` (random / mae / videomae / expmae).
Every step goes through the public entry points a user runs: the ``expmae-export`` and ``expmae-finetune``
console scripts (called in-process through their entry points) and ``expmae.features``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Sequence

import numpy as np
from accelerate.utils import set_seed

from expmae.features.common import list_inputs
from expmae.features.visual import extract_visual_features
from expmae.model import create_model
from expmae.probe import linear_probe, read_features
from expmae.weights import save_encoder


def console_script(name: str):
    """The ``main(argv)`` of an installed console script (what ``expmae-export ...`` runs)."""
    found = [e for e in entry_points(group="console_scripts") if e.name == name]
    if not found:
        raise RuntimeError(f"console script {name} is not installed; install the package (pip install -e .)")
    return found[0].load()


def run_script(name: str, argv: Sequence[str], quiet: bool = False) -> None:
    """Run a console script in-process; ``quiet`` drops what it prints on stdout (errors still reach stderr)."""
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        rc = console_script(name)([str(a) for a in argv])
    if rc:
        raise RuntimeError(f"{name} {' '.join(map(str, argv))} failed with exit status {rc}")


def read_clips(csv_path: str | os.PathLike) -> list[dict]:
    """Rows of a benchmark's ``clips.csv`` (name, task, identity, split, label, valence, ...)."""
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def random_init_model(model_name: str, overrides: dict, seed: int):
    """The whole ExpMAE (encoder and decoders) a pretraining run with this model config and ``train.seed`` starts
    from."""
    set_seed(seed)  # as the training loop seeds before it builds the model: the same initial weights
    return create_model(model_name, **overrides)


def save_random_init_encoder(model_name: str, overrides: dict, out_dir: str | os.PathLike, seed: int) -> Path:
    """The encoder a pretraining run with this model config and ``train.seed`` starts from, as an encoder folder."""
    model = random_init_model(model_name, overrides, seed)
    return save_encoder(model, out_dir, model_name=model_name, overwrite=True,
                        source={"kind": "random-init", "seed": seed})


def extract_features(encoder_dir: str | os.PathLike, sources: Sequence[str | os.PathLike],
                     out_dir: str | os.PathLike) -> Path:
    """Clip-encoder features of every video of ``sources`` (folders of videos or expmae-crop outputs; mean over
    tokens and windows), one .npy per video in ``out_dir`` (resumable)."""
    videos = [path for source in sources for path in list_inputs(source)]
    extract_visual_features(videos, out_dir, encoder_dir, modality="video", pooling="mean", progress=False)
    return Path(out_dir)


def probe(features: str | os.PathLike, clips: list[dict]) -> dict[str, float]:
    """Linear probe: fit on the train identities' clips, score on the held-out identities'."""
    train = [c for c in clips if c["split"] == "train"]
    test = [c for c in clips if c["split"] == "test"]
    return linear_probe(read_features(features, [c["name"] for c in train]), [c["label"] for c in train],
                        read_features(features, [c["name"] for c in test]), [c["label"] for c in test])


def finetune(features: str | os.PathLike, train_csv, test_csv, out_dir, *, epochs: int | None = None,
             folds: int = 5, seed: int = 0) -> dict:
    """The finetune protocol as a unimodal visual run (attention head, K-fold CV on the train identities,
    fold-averaged predictions on the held-out identities); returns the held-out test set's metrics."""
    argv = ["--labels", train_csv, "--features", f"visual={features}", "--test", test_csv, "--head", "attention",
            "--folds", folds, "--seed", seed, "--out", out_dir, "--no-tensorboard", "--no-progress"]
    if epochs:
        argv += ["--epochs", epochs]
    run_script("expmae-finetune", argv)
    results = json.loads((Path(out_dir) / "results.json").read_text())
    (test,) = results["tests"].values()
    return {**test["metrics"], "cv_metric": results["cv"]["metric"],
            "confusion_matrix_png": test.get("confusion_matrix_png")}


def evaluate_encoder(encoder_dir, benchmark: dict[str, Path], out_dir, *, videos: Sequence | None = None,
                     epochs: int | None = None, folds: int = 5) -> dict:
    """Features + probe + finetune of one encoder on one benchmark task (paths from write_expression_benchmark;
    ``videos``: where its clips are, default the benchmark's own videos, e.g. face crops of them instead)."""
    out_dir = Path(out_dir)
    sources = videos or [benchmark["videos"] / "train", benchmark["videos"] / "test"]
    features = extract_features(encoder_dir, sources, out_dir / "features")
    clips = read_clips(benchmark["clips"])
    return {"probe": probe(features, clips),
            "finetune": finetune(features, benchmark["train"], benchmark["test"], out_dir / "finetune",
                                 epochs=epochs, folds=folds),
            "features": str(features)}


def markdown_table(results: dict[str, dict[str, dict]], tasks: Sequence[str]) -> str:
    """Rows: encoders; per task: metric_e (weighted F1), metric_v (valence MSE), metric, probe accuracy (held-out
    identities), as in the paper's Table 1 (unimodal visual results)."""
    head = "| encoder | " + " | ".join(f"{t} metric_e | {t} metric_v | {t} metric | {t} probe acc" for t in tasks) + " |"
    rule = "|---|" + "---|" * (4 * len(tasks))
    rows = [head, rule]
    for encoder, per_task in results.items():
        cells = []
        for t in tasks:
            r = per_task.get(t)
            if r is None:
                cells += ["-"] * 4
                continue
            f = r["finetune"]
            cells += [f"{f['metric_e']:.3f}", f"{f['metric_v']:.3f}", f"{f['metric']:.3f}", f"{r['probe']['accuracy']:.3f}"]
        rows.append(f"| {encoder} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
