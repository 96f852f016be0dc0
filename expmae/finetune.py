"""The MER2023 fusion protocol in one command: feature folders + label CSV -> 5-fold CV -> test predictions.

Protocol (MER2023 baseline, MERTools MERBench/main-release.py): Train&Val is split into 5 folds (here
stratified and seeded); per fold a fresh head trains for ``epochs`` epochs and the epoch with the best
combined metric on the held-out fold is kept; the CV score is the mean of the folds' best scores; test
predictions are the folds' class probabilities and valences averaged. With pseudo-labelling each fold runs
its own rounds: its model labels the unlabeled pool, the selected samples join that fold's training split,
and the fold retrains. The pseudo-labels never come from a model that saw the fold's held-out split, so the
CV score of every round stays an honest held-out estimate.

Outputs in ``out_dir``: results.json, confusion_matrix.png (out-of-fold, Train&Val), one confusion matrix
per labelled test set, predictions_<test>.csv (name, discrete, valence); per fold, fold<k>/round<r>/ with
each round's head (safetensors), predictions and epoch curves, and fold<k>/pseudo_labels.csv (name, discrete)
when pseudo-labelling; TensorBoard curves in tb/.
Finished folds are skipped on a rerun with the same settings and the same feature values; in end-to-end mode
an unfinished fold continues after its last finished epoch (fold<k>/round<r>/resume.pt, removed when it finishes).

    expmae-finetune --labels train-label.csv --features audio=feats/hubert text=feats/macbert visual=feats/expmae \
        --test test3-label.csv --head attention --out runs/mer

End-to-end mode (``--videos`` + ``--encoder``, expmae.e2e): the same protocol, but each fold finetunes the
exported expMAE encoder on the face clips, its mean-pooled tokens being the "visual" branch of the head
(other ``--features`` folders, if given, are fused with it). Both modes share everything here; they differ
only in their backend (:class:`FeatureBackend` / ``expmae.e2e.VideoBackend``): how samples load, and how a
fold's model is built, trained, applied and saved.

    expmae-finetune --labels train-label.csv --videos faces/ --encoder encoders/expmae-base --test test3-label.csv \
        --epochs 30 --lr 5e-4 --weight-decay 0.05 --layer-decay 0.75 --out runs/mer-e2e
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from expmae import add_version_argument
from expmae.mer import (
    MER_CLASSES,
    FeatureSet,
    describe_missing,
    labels_to_arrays,
    list_feature_names,
    load_features,
    parse_feature_specs,
    read_label_csv,
    read_name_list,
    write_prediction_csv,
)
from expmae.metrics import confusion_matrix, mer_metrics, plot_confusion_matrix


@dataclass
class FinetuneConfig:
    labels: str = ""  # Train&Val label CSV (name, discrete, valence)
    features: list[str] = field(default_factory=list)  # BRANCH=FOLDER or FOLDER; same branch = concatenated
    out_dir: str = "runs/finetune"
    test: list[str] = field(default_factory=list)  # label CSVs or name lists to predict (test1/2/3)
    head: str = "attention"  # attention | mfb | concat
    hidden_dim: int = 128  # MFB: output size o
    dropout: float = 0.3
    factor_k: int = 5  # MFB factor k
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    valence_weight: float = 1.0  # lambda in CE + lambda * MSE
    folds: int = 5
    seed: int = 0
    missing: str = "drop"  # drop | zero | error, for samples lacking a feature file
    device: str = "auto"
    pseudo_label: str = "none"  # none | reliable | weak
    unlabeled: str = "auto"  # name list, or "auto": every sample in all folders that is neither labelled nor test
    threshold: float = 0.8
    rounds: int = 1
    minority: str = "frequency"  # frequency | confidence | comma-separated class names (e.g. worried,surprise)
    num_minority: int = 2
    threads: int = 0  # torch CPU threads; 0 = torch's default (small heads are often fastest with 1)
    tensorboard: bool = True
    progress: bool = True
    # End-to-end mode (expmae.e2e): lr / weight_decay / epochs / batch_size above then drive AdamW over
    # encoder + head, with layer-wise lr decay and a warmup + cosine schedule.
    videos: str = ""  # face clips named like the labels: an expmae-crop output folder or a folder of videos
    encoder: str = ""  # expmae-export encoder folder (or a pretraining run / checkpoint folder)
    freeze_encoder: bool = False  # train the head only; the encoder stays as loaded (eval mode)
    layer_decay: float = 0.75  # lr of block i = lr * layer_decay^(depth - i); stem depth + 1; final norm, head 1
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6  # end of the cosine schedule
    drop_path: float = -1.0  # stochastic depth of the encoder; < 0: the encoder config's drop_path_rate
    sample_stride: int = 0  # frames between a clip's frames; 0: the stride recorded in the encoder folder, else 4
    augment: bool = True  # VideoMAE multi-scale crop + flip of training clips; off: whole frames (random window only)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    workers: int = 0  # DataLoader processes decoding clips
    # Evaluation (held-out fold every epoch, tests, unlabeled pool): windows spread evenly over each clip, each
    # centre-cropped, class probabilities and valence averaged; 1: the centre window. Costs N x the evaluation.
    test_views: int = 1


# Settings that change what a fold computes; a finished fold is reused only if these match.
_RUN_KEYS = ("head", "hidden_dim", "dropout", "factor_k", "epochs", "batch_size", "lr", "weight_decay",
             "valence_weight", "folds", "seed", "missing")


@dataclass
class FitResult:
    best_epoch: int
    best: dict[str, float]  # validation metrics at the best epoch (empty without validation)
    history: list[dict[str, float]]
    state_dict: dict


# A fold's resume state (end-to-end mode), in its run dir while it trains; removed once its result.json is written.
RESUME_CHECKPOINT = "resume.pt"
# fit_epochs' state after a finished epoch: what a resumed loop needs besides the model and optimizer.
LOOP_KEYS = ("epoch", "best_epoch", "best", "best_score", "best_state", "history")


def _selection_score(metrics: dict[str, float]) -> float:
    # The challenge ranks by the combined metric; without valence truth fall back to metric_e.
    return metrics["metric"] if math.isfinite(metrics["metric"]) else metrics["metric_e"]


def predict(head, features: FeatureSet, *, batch_size: int = 1024, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) and valence (N,) in eval mode."""
    import torch

    device = device or next(head.parameters()).device
    head.eval()
    probs, valence = [], []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = {k: torch.from_numpy(a[start:start + batch_size]).to(device) for k, a in features.arrays.items()}
            out = head(batch)
            probs.append(out["logits"].float().softmax(1).cpu().numpy())
            valence.append(out["valence"].float().cpu().numpy())
    if not probs:
        return np.zeros((0, head.num_classes), np.float32), np.zeros(0, np.float32)
    return np.concatenate(probs), np.concatenate(valence)


def fit_epochs(
    model,
    run_epoch,
    *,
    epochs: int,
    evaluate: tuple | None = None,
    writer=None,
    tag: str = "",
    resume: dict | None = None,
    on_epoch_end=None,
) -> FitResult:
    """The epoch loop of both modes: ``run_epoch(epoch)`` trains one epoch and returns its scalars (train_loss, ...);
    ``evaluate = (predict_fn, emotion, valence)`` scores the held-out split after every epoch, ``predict_fn()``
    returning (probs, valence). The state of the epoch with the best combined metric is kept (the last epoch's
    without evaluation); ``model`` is left holding it.

    Resuming (end-to-end mode, expmae.e2e): ``on_epoch_end(loop)`` gets the loop's state after every epoch (keys
    :data:`LOOP_KEYS`: the finished ``epoch``, best so far, ``history``), and ``resume``, such a state saved
    earlier, continues after its epoch; restoring the model, optimizer and RNG is the caller's part."""
    best_epoch, best, best_score, best_state, history = -1, {}, -math.inf, None, []
    start = 0
    if resume is not None:
        best_epoch, best, best_score, best_state, history = (resume[k] for k in LOOP_KEYS[1:])
        start = resume["epoch"] + 1
    for epoch in range(start, epochs):
        record = {"epoch": epoch, **run_epoch(epoch)}
        if evaluate is not None:
            predict_fn, val_emotion, val_valence = evaluate
            probs, v_pred = predict_fn()
            record.update(mer_metrics(val_emotion, probs, val_valence, v_pred))
            score = _selection_score(record)
            if score > best_score:
                best_epoch, best, best_score = epoch, {k: record[k] for k in ("metric_e", "metric_v", "metric", "accuracy")}, score
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if writer is not None:
            for key, value in record.items():
                if key != "epoch" and math.isfinite(value):
                    writer.add_scalar(f"{tag}/{key}", value, epoch)
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(dict(zip(LOOP_KEYS, (epoch, best_epoch, best, best_score, best_state, history))))
    if best_state is None:
        best_epoch, best_state = epochs - 1, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return FitResult(best_epoch, best, history, best_state)


def fit_head(
    head,
    train: FeatureSet,
    emotion: np.ndarray,
    valence: np.ndarray,
    val: tuple[FeatureSet, np.ndarray, np.ndarray] | None = None,
    *,
    epochs: int = 100,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    valence_weight: float = 1.0,
    seed: int = 0,
    writer=None,
    tag: str = "",
) -> FitResult:
    """Train ``head`` with Adam on CE + lambda * MSE; keep the epoch with the best validation metric (last without val).

    Input standardisation statistics come from ``train`` only. Returns the best state dict; ``head`` is left
    holding it.
    """
    import torch

    from expmae.fusion import mer_loss

    device = next(head.parameters()).device
    head.set_input_stats({k: (torch.from_numpy(a.mean(0)), torch.from_numpy(a.std(0))) for k, a in train.arrays.items()})
    x = {k: torch.from_numpy(a).to(device) for k, a in train.arrays.items()}
    y_emotion = torch.from_numpy(np.asarray(emotion, dtype=np.int64)).to(device)
    y_valence = torch.from_numpy(np.asarray(valence, dtype=np.float32)).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)

    def run_epoch(epoch: int) -> dict[str, float]:
        head.train()
        order = torch.randperm(len(train), generator=generator).to(device)
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2 and len(order) > 1:  # a batch of one adds noise only; its samples are in other epochs
                continue
            loss, _ = mer_loss(head({k: v[idx] for k, v in x.items()}), y_emotion[idx], y_valence[idx], valence_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        return {"train_loss": total / max(seen, 1)}

    evaluate = (lambda: predict(head, val[0], device=device), val[1], val[2]) if val is not None else None
    return fit_epochs(head, run_epoch, epochs=epochs, evaluate=evaluate, writer=writer, tag=tag)


# ----------------------------------------------------------------------------------------------------------
# Backends: what differs between feature-folder mode and end-to-end mode (expmae.e2e.VideoBackend)


class FeatureBackend:
    """Feature-folder mode: a sample is its rows in the feature folders; each fold trains a fusion head."""

    run_keys = _RUN_KEYS  # settings that change what a fold computes

    def __init__(self, cfg: FinetuneConfig):
        if not cfg.features:
            raise ValueError("at least one feature folder (features) is required, or videos + encoder for end-to-end mode")
        self.cfg = cfg
        self.branches = parse_feature_specs(cfg.features)

    def load(self, names: Sequence[str], missing: str) -> FeatureSet:
        return load_features(self.branches, names, missing=missing, progress=self.cfg.progress)

    def available_names(self) -> set[str]:
        """Samples present in every input (the unlabeled pool of pseudo-labelling is drawn from them)."""
        folders = [f for fs in self.branches.values() for f in fs]
        common = set(list_feature_names(folders[0]))
        for folder in folders[1:]:
            common &= set(list_feature_names(folder))
        return common

    def fingerprint(self) -> list:
        """What identifies the inputs beyond the loaded feature values (nothing here)."""
        return []

    def describe(self, train: FeatureSet) -> dict:
        return {"branches": {b: [str(f) for f in fs] for b, fs in self.branches.items()}, "feature_dims": train.dims}

    def fit(self, train: FeatureSet, emotion: np.ndarray, valence: np.ndarray, val, *, seed: int, writer=None,
            tag: str = "", checkpoint: Path | None = None, fingerprint: str = ""):
        """A fresh head trained on ``train``; returns (head holding its best state, FitResult). A fold takes
        seconds here, so ``checkpoint`` / ``fingerprint`` (end-to-end mode's resume state) are not used."""
        from expmae.features.common import resolve_device
        from expmae.fusion import create_head

        cfg = self.cfg
        head = create_head(cfg.head, train.dims, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout,
                           factor_k=cfg.factor_k).to(resolve_device(cfg.device))
        fit = fit_head(head, train, emotion, valence, val, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       weight_decay=cfg.weight_decay, valence_weight=cfg.valence_weight, seed=seed, writer=writer, tag=tag)
        return head, fit

    def predict(self, model, features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
        return predict(model, features)

    def save(self, model, fit: FitResult, run_dir: Path) -> None:
        from safetensors.torch import save_file

        from expmae.jobs import atomic_path

        with atomic_path(run_dir / "head.safetensors") as tmp:
            save_file({n: v.contiguous().cpu() for n, v in fit.state_dict.items()}, str(tmp))


def make_backend(cfg: FinetuneConfig):
    """End-to-end mode when videos or an encoder are given, else feature-folder mode."""
    if cfg.videos or cfg.encoder:
        from expmae.e2e import VideoBackend

        return VideoBackend(cfg)
    return FeatureBackend(cfg)


# ----------------------------------------------------------------------------------------------------------
# The protocol


@dataclass
class _TestSet:
    name: str
    features: FeatureSet
    emotion: np.ndarray | None  # None: names only (no labels to score against)
    valence: np.ndarray | None


def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(f"{p.dtype}{p.shape}".encode() + p.tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    from expmae.jobs import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}  # JSON has no NaN


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load_test(path: str, backend, cfg: FinetuneConfig) -> _TestSet:
    p = Path(path)
    header = p.read_text(encoding="utf-8-sig").splitlines()[:1] if p.is_file() else []
    labelled = p.suffix.lower() == ".csv" and bool(header) and "discrete" in [h.strip() for h in header[0].split(",")]
    labels = read_label_csv(p, require_valence=False) if labelled else None
    names = list(labels) if labels else read_name_list(p)
    features = backend.load(names, cfg.missing)
    for line in describe_missing(features, cfg.missing):
        _log(f"[test {p.stem}] {line}")
    emotion, valence = labels_to_arrays(labels, features.names) if labels else (None, None)
    return _TestSet(p.stem, features, emotion, valence)


def _unlabeled_names(cfg: FinetuneConfig, backend, exclude: set[str]) -> list[str]:
    if cfg.unlabeled != "auto":
        return [n for n in read_name_list(cfg.unlabeled) if n not in exclude]
    return sorted(backend.available_names() - exclude)


def _minority_spec(cfg: FinetuneConfig) -> str | list[int]:
    if cfg.minority in ("frequency", "confidence"):
        return cfg.minority
    names = [c.strip().lower() for c in cfg.minority.split(",") if c.strip()]
    unknown = [c for c in names if c not in MER_CLASSES]
    if unknown or not names:
        raise ValueError(f"minority={cfg.minority!r}: expected 'frequency', 'confidence' or class names from {list(MER_CLASSES)}")
    return [MER_CLASSES.index(c) for c in names]


def train_fold(
    cfg: FinetuneConfig,
    fold: int,
    split: tuple[np.ndarray, np.ndarray],
    train: FeatureSet,
    emotion: np.ndarray,
    valence: np.ndarray,
    tests: Sequence[_TestSet],
    unlabeled: FeatureSet | None,
    pseudo: tuple[FeatureSet, np.ndarray] | None,
    run_dir: Path,
    data_key: str,
    writer=None,
    backend=None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Train (or reuse, if finished with the same settings and data) one fold's model in ``run_dir``.
    ``backend``: how the model is built, trained, applied and saved (default: a FeatureBackend of ``cfg``).

    A backend may keep resume state in ``run_dir / RESUME_CHECKPOINT`` (keyed by the fold's fingerprint) while
    the fold trains, so that an interrupted fold continues after its last finished epoch on a rerun.

    Returns the fold record (best epoch and its validation metrics) and its predictions: the held-out fold
    (``val_*``), each test set (``test{i}_*``) and the unlabeled pool (``pool_probs``).
    """
    import torch

    from expmae.jobs import atomic_path, remove_stale_temp_files

    backend = backend if backend is not None else FeatureBackend(cfg)
    tr, va = split
    run_settings = {k: getattr(cfg, k) for k in backend.run_keys}
    pseudo_key = (pseudo[0].names, pseudo[1].tolist()) if pseudo is not None else None
    fingerprint = _digest(run_settings, fold, data_key, pseudo_key)
    record_path, preds_path = run_dir / "result.json", run_dir / "predictions.npz"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    tag = f"fold{fold}/{run_dir.name}"
    if record is not None and record.get("fingerprint") == fingerprint and preds_path.is_file():
        _log(f"[{tag}] finished earlier with the same settings; reusing it")
    else:
        torch.manual_seed(cfg.seed * 1000 + fold)
        fold_train, fold_emotion, fold_valence = train.subset(tr), emotion[tr], valence[tr]
        if pseudo is not None:
            fold_train = fold_train.concat(pseudo[0])
            fold_emotion = np.concatenate([fold_emotion, pseudo[1]])
            fold_valence = np.concatenate([fold_valence, np.full(len(pseudo[1]), np.nan, np.float32)])
        held_out = train.subset(va)
        model, fit = backend.fit(fold_train, fold_emotion, fold_valence, (held_out, emotion[va], valence[va]),
                                 seed=cfg.seed * 1000 + fold, writer=writer, tag=tag,
                                 checkpoint=run_dir / RESUME_CHECKPOINT, fingerprint=fingerprint)
        arrays = {}
        arrays["val_probs"], arrays["val_valence"] = backend.predict(model, held_out)
        for i, t in enumerate(tests):
            arrays[f"test{i}_probs"], arrays[f"test{i}_valence"] = backend.predict(model, t.features)
        if unlabeled is not None:
            arrays["pool_probs"], _ = backend.predict(model, unlabeled)
        backend.save(model, fit, run_dir)
        with atomic_path(preds_path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
        record = {"fold": fold, "fingerprint": fingerprint, "best_epoch": fit.best_epoch, "num_train": len(fold_train),
                  "num_pseudo": int(len(pseudo[1])) if pseudo is not None else 0, "num_val": int(len(va)),
                  **_clean(fit.best), "history": [_clean(h) for h in fit.history]}
        _write_json(record_path, record)  # written last: its presence marks the fold finished
    # A finished fold needs no resume state (a ViT-B one is over a GB); also a save killed mid-write leaves a temp file.
    (run_dir / RESUME_CHECKPOINT).unlink(missing_ok=True)
    remove_stale_temp_files(run_dir, Path(RESUME_CHECKPOINT).stem)
    with np.load(preds_path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    _log(f"[{tag}] best epoch {record['best_epoch']}: metric {_fmt(record['metric'])}, metric_e {_fmt(record['metric_e'])}, "
         f"metric_v {_fmt(record['metric_v'])} ({record['num_pseudo']} pseudo-labelled)")
    return {k: v for k, v in record.items() if k not in ("fingerprint", "history")}, arrays


def _fold_mean(records: list[dict]) -> dict[str, float | None]:
    out = {}
    for key in ("metric_e", "metric_v", "metric", "accuracy"):
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Run the whole protocol described in the module docstring; returns (and writes) the results dict."""
    from sklearn.model_selection import StratifiedKFold
    from tqdm.auto import tqdm

    from expmae.pseudo_label import MODES, pseudo_label_rounds

    if cfg.pseudo_label not in MODES:
        raise ValueError(f"pseudo_label={cfg.pseudo_label!r}; expected one of {MODES}")
    if not cfg.labels:
        raise ValueError("a label CSV (labels) is required")
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    minority = _minority_spec(cfg)

    labels = read_label_csv(cfg.labels)
    backend = make_backend(cfg)
    train = backend.load(list(labels), cfg.missing)
    for line in describe_missing(train, cfg.missing):
        _log(f"[Train&Val] {line}")
    emotion, valence = labels_to_arrays(labels, train.names)
    counts = np.bincount(emotion, minlength=len(MER_CLASSES))
    if counts[counts > 0].min() < cfg.folds:
        rare = [MER_CLASSES[c] for c in range(len(MER_CLASSES)) if 0 < counts[c] < cfg.folds]
        raise ValueError(f"{cfg.labels}: classes {rare} have fewer samples than folds ({cfg.folds}); "
                         "stratified CV needs at least one per fold")
    tests = [_load_test(p, backend, cfg) for p in cfg.test]
    unlabeled = None
    if cfg.pseudo_label != "none":
        exclude = set(labels) | {n for t in tests for n in t.features.names}
        pool_names = _unlabeled_names(cfg, backend, exclude)
        if not pool_names:
            raise ValueError("pseudo-labelling needs unlabeled samples, but none were found (check --unlabeled)")
        unlabeled = backend.load(pool_names, "drop")
        for line in describe_missing(unlabeled, "drop"):
            _log(f"[unlabeled] {line}")
    # Feature values are part of every fold's key: re-extracted features in the same folders must not reuse old folds.
    data_key = _digest(train.names, emotion, valence, *train.arrays.values(),
                       *[a for t in tests for a in (t.features.names, *t.features.arrays.values())],
                       *([unlabeled.names, *unlabeled.arrays.values()] if unlabeled is not None else []),
                       *backend.fingerprint())

    writer = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))

    splits = list(StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed).split(np.zeros(len(emotion)), emotion))
    fold_runs: list[list[tuple[dict, dict]]] = []  # per fold, per pseudo-label round: (record, predictions)
    fold_pseudo = []
    for k in tqdm(range(cfg.folds), desc="folds", disable=not cfg.progress, unit="fold"):
        runs: list[tuple[dict, dict]] = []

        # Each fold pseudo-labels with its own model, trained without its held-out split, so the held-out
        # score of every round stays free of leakage.
        def train_and_predict(index: np.ndarray, label: np.ndarray, round_no: int) -> np.ndarray:
            pseudo = (unlabeled.subset(index), label) if len(index) else None
            runs.append(train_fold(cfg, k, splits[k], train, emotion, valence, tests, unlabeled, pseudo,
                                   out_dir / f"fold{k}" / f"round{round_no}", data_key, writer, backend))
            return runs[-1][1].get("pool_probs")

        fold_pseudo.append(pseudo_label_rounds(
            train_and_predict, emotion[splits[k][0]], mode=cfg.pseudo_label, rounds=cfg.rounds, threshold=cfg.threshold,
            minority=minority, num_minority=cfg.num_minority, num_classes=len(MER_CLASSES), class_names=MER_CLASSES))
        fold_runs.append(runs)
    if writer is not None:
        writer.close()

    final = [runs[-1] for runs in fold_runs]
    oof_probs = np.zeros((len(train), len(MER_CLASSES)), np.float32)
    oof_valence = np.zeros(len(train), np.float32)
    for (_, va), (_, arrays) in zip(splits, final):
        oof_probs[va], oof_valence[va] = arrays["val_probs"], arrays["val_valence"]
    cv = _fold_mean([record for record, _ in final])  # MER2023 style: mean of the folds' best-epoch scores
    oof = mer_metrics(emotion, oof_probs, valence, oof_valence)
    plot_confusion_matrix(confusion_matrix(emotion, oof_probs.argmax(1), len(MER_CLASSES)), MER_CLASSES,
                          out_dir / "confusion_matrix.png", title=f"{cfg.head}: {cfg.folds}-fold CV (out-of-fold)")

    test_results = {}
    for i, t in enumerate(tests):
        probs = np.mean([arrays[f"test{i}_probs"] for _, arrays in final], axis=0)
        val = np.mean([arrays[f"test{i}_valence"] for _, arrays in final], axis=0)
        csv_path = write_prediction_csv(out_dir / f"predictions_{t.name}.csv", t.features.names, probs.argmax(1), val)
        entry = {"num_samples": len(t.features), "missing_features": t.features.missing, "predictions_csv": str(csv_path)}
        if t.emotion is not None and len(t.features):
            entry["metrics"] = _clean(mer_metrics(t.emotion, probs, t.valence, val))
            entry["confusion_matrix_png"] = str(plot_confusion_matrix(
                confusion_matrix(t.emotion, probs.argmax(1), len(MER_CLASSES)), MER_CLASSES,
                out_dir / f"confusion_matrix_{t.name}.png", title=f"{cfg.head}: {t.name} (fold average)"))
        test_results[t.name] = entry

    # CV after r rounds (a fold that stopped adding pseudo-labels earlier keeps its last model).
    num_rounds = max(len(runs) for runs in fold_runs)
    rounds = [{"round": r, "cv": _fold_mean([runs[min(r, len(runs) - 1)][0] for runs in fold_runs])} for r in range(num_rounds)]
    for k, pl in enumerate(fold_pseudo):
        path = out_dir / f"fold{k}" / "pseudo_labels.csv"
        if len(pl.index):
            write_prediction_csv(path, [unlabeled.names[i] for i in pl.index], pl.label)
        else:
            path.unlink(missing_ok=True)  # not a stale one from an earlier run

    described = backend.describe(train)
    results = {
        "config": dataclasses.asdict(cfg),
        "classes": list(MER_CLASSES),
        **described,  # branches, feature_dims (and, end to end, the encoder and clip settings)
        "num_train": len(train),
        "class_counts": {c: int(n) for c, n in zip(MER_CLASSES, counts)},
        "missing_features": train.missing,
        "cv": cv,
        "cv_pooled": _clean(oof),  # the same out-of-fold predictions scored together
        "folds": [record for record, _ in final],
        "rounds": rounds,
        "pseudo_label": {
            "mode": cfg.pseudo_label,
            "num_unlabeled": len(unlabeled) if unlabeled is not None else 0,
            "per_fold": [{"fold": k, "num_selected": int(len(pl.index)), "history": pl.history} for k, pl in enumerate(fold_pseudo)],
        },
        "tests": test_results,
        "confusion_matrix_png": str(out_dir / "confusion_matrix.png"),
    }
    _write_json(out_dir / "results.json", results)
    print(f"metric {_fmt(cv['metric'])} (metric_e {_fmt(cv['metric_e'])}, metric_v {_fmt(cv['metric_v'])}) "
          f"{cfg.folds}-fold CV on Train&Val, head={cfg.head}, branches={'+'.join(described['branches'])}; results in {out_dir / 'results.json'}")
    return results


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# ----------------------------------------------------------------------------------------------------------
# Command line


def load_config(path: str | Path) -> dict:
    """Read a YAML config of FinetuneConfig fields; unknown keys are an error naming the file and key."""
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    for key in data:
        if key not in known:
            raise ValueError(f"{path}: unknown setting {key!r}; expected one of {sorted(known)}")
    for key in ("features", "test"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
    defaults = FinetuneConfig()
    for key, value in data.items():
        expected = type(getattr(defaults, key))
        if expected is float and not isinstance(value, bool) and isinstance(value, (int, str)):
            try:  # PyYAML reads 1e-3 (no dot) as a string
                data[key] = value = float(value)
            except ValueError:
                pass
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{path}: setting {key!r} is {value!r}; expected {expected.__name__}")
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="expmae-finetune",
        description="MER2023 fusion protocol: K-fold CV on Train&Val from feature folders + label CSV; prints the combined metric. "
                    "With --videos and --encoder, each fold finetunes the expMAE encoder end to end on the face clips.",
    )
    add_version_argument(p)
    p.add_argument("--config", help="YAML file of settings (command-line flags override it)")
    p.add_argument("--labels", help="Train&Val label CSV (columns name, discrete, valence)")
    p.add_argument("--features", nargs="+", help="feature folders, BRANCH=FOLDER or FOLDER; repeated BRANCH = concatenated")
    p.add_argument("--test", nargs="+", help="label CSVs or name lists to predict (fold-averaged)")
    p.add_argument("--out", dest="out_dir", help="output folder")
    p.add_argument("--head", choices=["attention", "mfb", "concat"])
    p.add_argument("--hidden-dim", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--factor-k", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--valence-weight", type=float, help="lambda in CE + lambda * MSE")
    p.add_argument("--folds", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--missing", choices=["drop", "zero", "error"], help="samples lacking a feature file")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch default)")
    p.add_argument("--pseudo-label", choices=["none", "reliable", "weak"])
    p.add_argument("--unlabeled", help="name list of unlabeled samples, or 'auto'")
    p.add_argument("--threshold", type=float)
    p.add_argument("--rounds", type=int)
    p.add_argument("--minority", help="frequency | confidence | class names, e.g. worried,surprise")
    p.add_argument("--num-minority", type=int)
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False)
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    e2e = p.add_argument_group("end-to-end mode (expmae.e2e)")
    e2e.add_argument("--videos", help="face clips named like the labels: an expmae-crop output folder or a folder of videos")
    e2e.add_argument("--encoder", help="expmae-export encoder folder (or a pretraining run / checkpoint folder)")
    e2e.add_argument("--freeze-encoder", dest="freeze_encoder", action="store_const", const=True,
                     help="train the head only, the encoder stays as loaded")
    e2e.add_argument("--layer-decay", type=float, help="lr of block i = lr * layer_decay^(depth - i); head at lr")
    e2e.add_argument("--warmup-epochs", type=float)
    e2e.add_argument("--min-lr", type=float, help="lr at the end of the cosine schedule")
    e2e.add_argument("--drop-path", type=float, help="encoder stochastic depth (default: the encoder config's)")
    e2e.add_argument("--sample-stride", type=int, help="frames between a clip's frames (default: the encoder's)")
    e2e.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                     help="train on whole frames (no multi-scale crop or flip; the clip window stays random)")
    e2e.add_argument("--precision", choices=["fp32", "bf16"])
    e2e.add_argument("--workers", type=int, help="DataLoader processes decoding clips")
    e2e.add_argument("--test-views", type=int,
                     help="temporal views per evaluated sample (held-out fold after every epoch, tests, unlabeled "
                          "pool): N windows spread evenly over the clip, each centre-cropped, class probabilities "
                          "and valence averaged; evaluation costs N times as much (default 1: the centre window)")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> FinetuneConfig:
    args = vars(build_parser().parse_args(argv))
    settings = load_config(args.pop("config")) if args.get("config") else {}
    settings.update({k: v for k, v in args.items() if v is not None and k != "config"})
    return FinetuneConfig(**settings)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        run_finetune(cfg)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"expmae-finetune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
