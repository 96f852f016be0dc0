"""A benchmark that can show whether pretraining makes better expression features.

Built like the method's real regime (a large unlabelled pool, a small labelled set) rather than the demo's set,
which pixels already solve: face crops with real crops' nuisance (expmae.nuisance), an unlabelled **pool** of
other people to pretrain on, and per task a **labelled** set split by identity, with enough held-out people for a
probe's 95% interval of about +-0.05. Why, and the layout of ``out_dir``: docs/guides/benchmarks.md.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from expmae.synthetic import TASKS, ExpressionClip, expression_benchmark, render_expression_clip

POOL_FIRST_IDENTITY = 100_000  # pool people never appear in a labelled set
LABEL_FIELDS = ("name", "discrete", "valence", "identity", "split", "task")


@dataclasses.dataclass(frozen=True)
class LearningBenchmarkSize:
    """How big each part is. Defaults: 4,000 pool clips, per task 560 labelled train and 384 held-out clips."""

    pool_identities: int = 500
    pool_clips_per_identity: int = 8
    identities: int = 118  # labelled people per task, of which test_identities are held out
    test_identities: int = 48
    clips_per_identity: int = 8
    num_frames: int = 16
    size: int = 64
    nuisance: float = 1.0
    seed: int = 0

    @classmethod
    def quick(cls) -> "LearningBenchmarkSize":
        """A few seconds to write: for CI and smoke runs, not for conclusions."""
        return cls(pool_identities=12, pool_clips_per_identity=4, identities=12, test_identities=4,
                   clips_per_identity=4, num_frames=8)


def pool_clips(size: LearningBenchmarkSize) -> list[ExpressionClip]:
    """The pool: half its people drawn as static-task clips, half as dynamic-task clips (both kinds of motion)."""
    half = size.pool_identities // 2
    clips = []
    for i, task in enumerate(TASKS):
        n = half if i == 0 else size.pool_identities - half
        clips += expression_benchmark(task, identities=n + 1, test_identities=1, seed=size.seed,
                                      clips_per_identity=size.pool_clips_per_identity,
                                      first_identity=POOL_FIRST_IDENTITY + i * half)
    return [dataclasses.replace(c, split="pool") for c in clips if c.split == "train"]


def labelled_clips(task: str, size: LearningBenchmarkSize) -> list[ExpressionClip]:
    return expression_benchmark(task, identities=size.identities, test_identities=size.test_identities,
                                clips_per_identity=size.clips_per_identity, seed=size.seed)


def _render_to(job: tuple[ExpressionClip, Path, LearningBenchmarkSize]) -> None:
    clip, path, size = job
    if path.is_file():
        return
    frames = render_expression_clip(clip, size.num_frames, size.size, "face", size.seed, nuisance=size.nuisance)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, frames)
    os.replace(tmp, path)  # a killed writer leaves no half clip behind; a rerun renders what is missing


def _write_labels(path: Path, clips: list[ExpressionClip]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LABEL_FIELDS)
        w.writerows([c.name, c.label, c.valence, c.identity, c.split, c.task] for c in clips)


def write_learning_benchmark(out_dir: str | os.PathLike, size: LearningBenchmarkSize | None = None, *,
                             workers: int = 1, progress: bool = True) -> dict[str, Path]:
    """Render the benchmark into ``out_dir`` (resumable: finished clips are kept); returns its paths."""
    size = size or LearningBenchmarkSize()
    out = Path(out_dir)
    pool = pool_clips(size)
    jobs = [(c, out / "pool" / f"{c.name}.npy", size) for c in pool]
    paths = {"pool": out / "pool", "pool_labels": out / "pool-labels.csv"}
    (out / "pool").mkdir(parents=True, exist_ok=True)
    _write_labels(paths["pool_labels"], pool)
    labelled = [c for task in TASKS for c in labelled_clips(task, size)]
    paths["labelled"] = out / "labelled"
    (out / "labelled" / "clips").mkdir(parents=True, exist_ok=True)
    _write_labels(out / "labelled" / "labels.csv", labelled)
    jobs += [(c, out / "labelled" / "clips" / f"{c.name}.npy", size) for c in labelled]
    todo = [j for j in jobs[len(pool):] + jobs[:len(pool)] if not j[1].is_file()]  # labelled sets first
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as executor:
        rendered = executor.map(_render_to, todo, chunksize=16) if executor else map(_render_to, todo)
        for _ in tqdm(rendered, total=len(todo), disable=not progress, desc="learning benchmark", unit="clip"):
            pass
    (out / "benchmark.json").write_text(json.dumps(dataclasses.asdict(size), indent=2))
    return paths


def read_labels(labelled_dir: str | os.PathLike, task: str | None = None) -> list[dict]:
    """Rows of the labelled set's labels.csv (of one ``task``, or all), each with its clip's path."""
    labelled_dir = Path(labelled_dir)
    with open(labelled_dir / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if task is None or r["task"] == task]
    for r in rows:
        r["path"] = str(labelled_dir / "clips" / f"{r['name']}.npy")
    return rows
