"""Online evaluation: how well the encoder's frozen features carry the labels of a held-out set, during pretraining.

At step 0 (the random-init twin every curve starts from), every ``eval.every`` optimizer steps and at the end,
the current encoder (eval mode, no gradients, full unmasked clips) encodes a labelled set exactly as
``expmae-features`` does (one code path: ``VisualFeatureExtractor``: the same windows, resizing, normalisation
and read-outs), and rank 0 scores every requested layer and read-out with the probes of ``expmae.probe``: a
weighted kNN (DINO's), a linear probe on standardised features (MAE's), optionally an attentive probe.
Each rank encodes its share of the clips (decoded once, at start-up) in the same number of forward passes, so
ZeRO-3's collective parameter gathering lines up; rank 0 gathers the features.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from expmae.config import ConfigError, EvalConfig
from expmae.features.common import list_inputs
from expmae.features.visual import VisualFeatureExtractor, pool_readouts
from expmae.probe import probe_readouts, stack_tokens

LABEL_COLUMNS = ("discrete", "label")
VAL_SPLITS = ("val", "test", "valid", "validation")


@dataclass
class EvalSet:
    """The labelled clips: paths, names, labels and which are held out (the probes fit on the rest)."""

    paths: list[Path]
    names: list[str]
    labels: np.ndarray  # (N,) str
    held_out: np.ndarray  # (N,) bool
    tasks: np.ndarray  # (N,) str: the CSV's task column ("" without one); each task is probed on its own

    def __len__(self) -> int:
        return len(self.names)


def _split_column(rows: list[dict], labels_csv: Path) -> np.ndarray:
    values = [r["split"].strip().lower() for r in rows]
    bad = sorted({v for v in values if v != "train" and v not in VAL_SPLITS})
    if bad:
        raise ConfigError(f"eval.labels={labels_csv}: split value {bad[0]!r}; expected train or one of "
                          f"{', '.join(VAL_SPLITS)}")
    return np.array([v in VAL_SPLITS for v in values])


def _held_out(rows: list[dict], labels_csv: Path, val_fraction: float, seed: int) -> np.ndarray:
    """The split column when there is one; else whole identities held out (never a person on both sides);
    else clips."""
    if "split" in rows[0]:
        return _split_column(rows, labels_csv)
    groups = [r["identity"] for r in rows] if "identity" in rows[0] else [r["name"] for r in rows]
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    val = {unique[i] for i in order[: max(1, math.ceil(val_fraction * len(unique)))]}
    return np.array([g in val for g in groups])


def read_eval_set(cfg: EvalConfig) -> EvalSet:
    """The clips of ``eval.source`` that ``eval.labels`` names; one-line errors for a bad CSV or a missing clip."""
    labels_csv = Path(cfg.labels)
    if not labels_csv.is_file():
        raise ConfigError(f"eval.labels={labels_csv}: no such file")
    with open(labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "name" not in rows[0]:
        raise ConfigError(f"eval.labels={labels_csv}: expected a header with a name column and rows")
    label_key = next((k for k in LABEL_COLUMNS if k in rows[0]), None)
    if label_key is None:
        raise ConfigError(f"eval.labels={labels_csv}: no label column; expected one of {', '.join(LABEL_COLUMNS)}")
    try:
        clips = {p.stem: p for p in list_inputs(cfg.source)}
    except FileNotFoundError as exc:
        raise ConfigError(f"eval.source={cfg.source}: {exc}") from None
    missing = [r["name"] for r in rows if r["name"] not in clips]
    if missing:
        raise ConfigError(f"eval.labels={labels_csv}: {len(missing)} clips not found in eval.source={cfg.source}, "
                          f"e.g. {missing[0]!r}")
    held_out = _held_out(rows, labels_csv, cfg.val_fraction, cfg.seed)
    for task in sorted({r.get("task", "") for r in rows}):
        part = held_out[[r.get("task", "") == task for r in rows]]
        if part.all() or not part.any():
            raise ConfigError(f"eval.labels={labels_csv}: the split leaves no {'train' if part.all() else 'held-out'} "
                              f"clips{f' of task {task}' if task else ''}")
    tasks = np.array([r.get("task", "") for r in rows])
    if len(set(tasks)) == 1:  # one task: its scores are the headline eval/knn_acc, ..., not eval/<task>/...
        tasks[:] = ""
    return EvalSet(paths=[clips[r["name"]] for r in rows], names=[r["name"] for r in rows],
                   labels=np.array([r[label_key] for r in rows]), held_out=held_out, tasks=tasks)


def layer_key(layer: int, depth: int) -> int:
    """A hidden-state index as a non-negative block number (0 = embeddings, depth = the last block)."""
    return layer % (depth + 1)


class OnlineEvaluator:
    """Built once at start-up (decodes this rank's share of the clips); called at each evaluation step."""

    def __init__(self, cfg: EvalConfig, encoder, *, sample_stride: int, rank: int, world: int, device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.data = read_eval_set(cfg)
        self.mine = np.arange(rank, len(self.data), world)  # this rank's clips
        was_training = encoder.training
        self.extractor = VisualFeatureExtractor(encoder, modality="video", sample_stride=sample_stride,
                                                batch_size=cfg.batch_size, device=str(device),
                                                dtype=str(encoder.dtype).replace("torch.", ""))
        encoder.train(was_training)  # the extractor put it in eval mode; training goes on
        self.batch, self.owner = self._decode_share()
        self.depth = encoder.cfg.depth
        self.keys = [f"L{layer_key(layer, self.depth)}/{r}" for layer in cfg.layers for r in cfg.readouts]
        self.seconds = 0.0

    def _decode_share(self):
        """All windows of this rank's clips as one ``loaded`` item for the extractor (pixels (3, U, S, S) and
        window indices (W, T)), padded with repeats of the last window to the same forward count on every rank;
        ``owner[w]``: the clip (position in ``self.mine``) of window w, -1 for padding."""
        pixels, windows, owner, offset = [], [], [], 0
        for i, index in enumerate(self.mine):
            loaded = self.extractor.load(self.data.paths[index])
            pixels.append(loaded["pixels"])
            windows.append(loaded["windows"] + offset)
            owner += [i] * len(loaded["windows"])
            offset += loaded["pixels"].shape[1]

        windows = np.concatenate(windows) if windows else np.zeros((0, self.extractor.num_frames), np.int64)
        most = _max_over_ranks(len(windows), self.world)
        steps = -(-most // self.cfg.batch_size) * self.cfg.batch_size  # every rank: the same number of batches
        pad = steps - len(windows)
        if pad and len(windows):
            windows = np.concatenate([windows, np.repeat(windows[-1:], pad, axis=0)])
        elif pad:  # a rank with no clip (more ranks than clips) still joins every forward pass
            pixels = [np.zeros((3, self.extractor.num_frames, *self._size()), np.uint8)]
            windows = np.tile(np.arange(self.extractor.num_frames), (pad, 1))
        owner = np.array(owner + [-1] * pad)
        return {"pixels": torch.cat([torch.as_tensor(p) for p in pixels], dim=1), "windows": windows, "info": {}}, owner

    def _size(self) -> tuple[int, int]:
        s = self.extractor.cfg.img_size
        return s, s

    def features(self, encoder) -> dict[str, np.ndarray]:
        """This rank's clips' features, {key: (len(mine), F) or (len(mine), K, D) for tokens}: each clip's windows
        pooled as expmae-features pools a video."""
        was_training = encoder.training
        encoder.eval()
        try:
            out = self.extractor.encode_readouts(self.batch, layers=tuple(self.cfg.layers),
                                                 readouts=tuple(self.cfg.readouts))
        finally:
            encoder.train(was_training)
        return pool_by_clip(out, self.owner, len(self.mine))

    def __call__(self, encoder) -> dict[str, float] | None:
        """Encode (every rank), gather and probe (rank 0); rank 0 returns the flat ``eval/...`` metrics."""
        t0 = time.perf_counter()
        feats = self.features(encoder)
        gathered = _gather(self.mine, feats, self.world)
        metrics = None
        if self.rank == 0:
            metrics = self.score(*gathered)
        self.seconds += time.perf_counter() - t0
        if metrics is not None:
            metrics["eval/seconds"] = time.perf_counter() - t0
        return metrics

    def score(self, order: np.ndarray, feats: dict[str, np.ndarray], probes=None) -> dict[str, float]:
        """Probe every key on the gathered features (rows in ``order`` of the eval set), each task on its own, with
        ``probes`` (default: eval.probes)."""
        labels, held_out, tasks = self.data.labels[order], self.data.held_out[order], self.data.tasks[order]
        metrics = {}
        for task in sorted(set(tasks)):
            fit, test = (tasks == task) & ~held_out, (tasks == task) & held_out
            results = probe_readouts({k: v[fit] for k, v in feats.items()}, labels[fit],
                                     {k: v[test] for k, v in feats.items()}, labels[test],
                                     probes=tuple(probes or self.cfg.probes), knn_k=self.cfg.knn_k,
                                     knn_temperature=self.cfg.knn_temperature, seed=self.cfg.seed)
            metrics.update(flatten(results, self.keys[0], prefix=f"eval/{task}/" if task else "eval/"))
        return metrics


def pool_by_clip(rows: dict[str, np.ndarray], owner: np.ndarray, num_clips: int) -> dict[str, np.ndarray]:
    """Per-window read-outs {key: (W, ...)} -> per-clip features, each clip's windows (``owner``: the clip of each
    window, -1 = padding) pooled by expmae.features.visual.pool_readouts, token read-outs stacked (NaN-padded)."""
    clips = [pool_readouts({k: v[owner == i] for k, v in rows.items()}) for i in range(num_clips)]
    return {k: stack_tokens([c[k] for c in clips]) if v.ndim == 3 else np.stack([c[k] for c in clips]).astype(np.float32)
            for k, v in rows.items()}


def flatten(results: dict[str, dict[str, dict]], headline: str, prefix: str = "eval/") -> dict[str, float]:
    """{key: {probe: result}} -> {"<prefix><key>/<probe>_acc": ..., "..._uar": ...} plus the headline key's as
    <prefix>knn_acc, <prefix>probe_acc (linear), <prefix>probe_uar, <prefix>attentive_acc."""
    names = {"knn": "knn", "linear": "probe", "attentive": "attentive"}
    out = {}
    for key, per_probe in results.items():
        for probe, r in per_probe.items():
            out[f"{prefix}{key}/{probe}_acc"] = float(r["accuracy"])
            out[f"{prefix}{key}/{probe}_uar"] = float(r["balanced_accuracy"])
            if key == headline:
                out[f"{prefix}{names[probe]}_acc"] = float(r["accuracy"])
                out[f"{prefix}{names[probe]}_uar"] = float(r["balanced_accuracy"])
    return out


def _max_over_ranks(n: int, world: int) -> int:
    if world == 1:
        return n
    counts = [0] * world
    dist.all_gather_object(counts, n)  # object collectives work on gloo and nccl alike
    return max(counts)


def _gather(mine: np.ndarray, feats: dict[str, np.ndarray], world: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every rank's (indices, features) on rank 0 (other ranks get theirs back: unused)."""
    if world == 1:
        return mine, feats
    parts = [None] * world
    dist.all_gather_object(parts, (mine, feats))
    order = np.concatenate([p[0] for p in parts])
    return order, {k: np.concatenate([p[1][k] for p in parts]) for k in feats}
