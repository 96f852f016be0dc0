"""The protocol: label CSV + inputs -> folds -> a model per fold -> held-out and test predictions -> results.

Per fold a fresh model trains and keeps its epoch with the best selected metric on the held-out fold; the CV score
is the mean of the folds' best scores and test predictions average the folds' outputs. Pseudo-labels never come
from a model that saw the fold's held-out split, so every round's CV score stays an honest held-out estimate.
Finished folds are skipped on a rerun. Outputs and options: docs/guides/finetuning.md ("Folds, scores and outputs").
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from expmae.finetune.backends import make_backend
from expmae.finetune.common import clean, digest, fmt, log
from expmae.finetune.config import FinetuneConfig
from expmae.finetune.featureset import FeatureSet, describe_missing
from expmae.finetune.metrics import Scorer, confusion_matrix, plot_confusion_matrix
from expmae.finetune.pseudo_label import MODES, pseudo_label_rounds
from expmae.finetune.splits import check_folds, column_folds, file_folds, stratified_folds
from expmae.files import atomic_path, remove_stale_temp_files, write_json
from expmae.labels import (LabelFormat, LabelSet, is_label_file, label_format, read_labels, read_name_list,
                           write_predictions)
from expmae.runlock import FolderLock

# A fold's resume state (end-to-end backend), in its run dir while it trains; removed once its result.json is written.
RESUME_CHECKPOINT = "resume.pt"


@dataclass
class TestSet:
    name: str
    features: FeatureSet
    label: np.ndarray | None  # None: names only (no labels to score against)
    targets: np.ndarray | None


@dataclass
class Data:
    """Everything a fold reads: Train&Val and its labels, the tests, the unlabeled pool, and the key of it all."""

    train: FeatureSet
    label: np.ndarray  # (N,) class index
    targets: np.ndarray  # (N, R)
    tests: list[TestSet]
    unlabeled: FeatureSet | None
    key: str  # digest of every value above (and the backend's inputs): a changed input retrains finished folds


def load_test(path: str, backend, cfg: FinetuneConfig, fmt_: LabelFormat, classes: Sequence[str]) -> TestSet:
    """A labelled test CSV (scored) or a name list (predicted only)."""
    p = Path(path)
    labels = read_labels(p, dataclasses.replace(fmt_, classes=tuple(classes)), require_targets=False) \
        if is_label_file(p, fmt_) else None
    features = backend.load(labels.names if labels else read_name_list(p), cfg.missing)
    for line in describe_missing(features, cfg.missing):
        log(f"[test {p.stem}] {line}")
    label, targets = labels.arrays(features.names) if labels else (None, None)
    return TestSet(p.stem, features, label, targets)


def unlabeled_names(cfg: FinetuneConfig, backend, exclude: set[str]) -> list[str]:
    if cfg.unlabeled != "auto":
        return [n for n in read_name_list(cfg.unlabeled) if n not in exclude]
    return sorted(backend.available_names() - exclude)


def minority_spec(cfg: FinetuneConfig, classes: Sequence[str]) -> str | list[int]:
    if cfg.minority in ("frequency", "confidence"):
        return cfg.minority
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    names = [c.strip().lower() for c in cfg.minority.split(",") if c.strip()]
    unknown = [c for c in names if c not in lookup]
    if unknown or not names:
        raise ValueError(f"minority={cfg.minority!r}: expected 'frequency', 'confidence' or class names from {list(classes)}")
    return [lookup[c] for c in names]


def make_folds(cfg: FinetuneConfig, labels: LabelSet, names: list[str], label: np.ndarray):
    """(fold names, [(train rows, held-out rows)]) over the loaded Train&Val ``names``."""
    if cfg.split_column and cfg.split_files:
        raise ValueError("give the dataset's split as split_column or split_files, not both")
    if cfg.split_column:
        if cfg.split_column not in labels.columns:
            raise ValueError(f"{cfg.labels}: no split column {cfg.split_column!r} (found {['name', *labels.columns]})")
        values = labels.columns[cfg.split_column]
        rows = labels.rows(names)
        fold_names, splits = column_folds([values[i] for i in rows], cfg.split_column)
    elif cfg.split_files:
        fold_names, splits = file_folds(cfg.split_files, names, set(labels.names))
    else:
        counts = np.bincount(label, minlength=len(labels.classes))
        if counts[counts > 0].min() < cfg.folds:
            rare = [labels.classes[c] for c in range(len(labels.classes)) if 0 < counts[c] < cfg.folds]
            raise ValueError(f"{cfg.labels}: classes {rare} have fewer samples than folds ({cfg.folds}); "
                             "stratified CV needs at least one per fold")
        return [f"fold{k}" for k in range(cfg.folds)], stratified_folds(label, cfg.folds, cfg.seed)
    check_folds(splits, cfg.split_column or "split_files")
    return fold_names, splits


def load_data(cfg: FinetuneConfig, backend, labels: LabelSet, fmt_: LabelFormat) -> Data:
    """Load Train&Val, the test sets and (pseudo-labelling) the unlabeled pool through the backend."""
    train = backend.load(labels.names, cfg.missing)
    for line in describe_missing(train, cfg.missing):
        log(f"[Train&Val] {line}")
    label, targets = labels.arrays(train.names)
    tests = [load_test(p, backend, cfg, fmt_, labels.classes) for p in cfg.test]
    unlabeled = None
    if cfg.pseudo_label != "none":
        exclude = set(labels.names) | {n for t in tests for n in t.features.names}
        pool_names = unlabeled_names(cfg, backend, exclude)
        if not pool_names:
            raise ValueError("pseudo-labelling needs unlabeled samples, but none were found (check --unlabeled)")
        unlabeled = backend.load(pool_names, "drop")
        for line in describe_missing(unlabeled, "drop"):
            log(f"[unlabeled] {line}")
    # Feature values are part of every fold's key: re-extracted features in the same folders must not reuse old folds.
    key = digest(train.names, label, targets, *train.arrays.values(),
                 *[a for t in tests for a in (t.features.names, *t.features.arrays.values())],
                 *([unlabeled.names, *unlabeled.arrays.values()] if unlabeled is not None else []),
                 *backend.fingerprint())
    return Data(train, label, targets, tests, unlabeled, key)


def train_fold(cfg: FinetuneConfig, fold: int, split: tuple[np.ndarray, np.ndarray], data: Data, scorer: Scorer,
               pseudo: tuple[FeatureSet, np.ndarray] | None, run_dir: Path, backend, writer=None
               ) -> tuple[dict, dict[str, np.ndarray]]:
    """Train (or reuse, if finished with the same settings and data) one fold's model in ``run_dir``.

    A backend may keep resume state in ``run_dir / RESUME_CHECKPOINT`` (keyed by the fold's fingerprint) while
    the fold trains, so that an interrupted fold continues after its last finished epoch on a rerun.

    Returns the fold record (best epoch and its held-out metrics) and its predictions: the held-out fold
    (``val_*``), each test set (``test{i}_*``) and the unlabeled pool (``pool_probs``).
    """
    tr, va = split
    run_settings = {k: getattr(cfg, k) for k in backend.run_keys}
    pseudo_key = (pseudo[0].names, pseudo[1].tolist()) if pseudo is not None else None
    fingerprint = digest(run_settings, fold, data.key, pseudo_key, tr, va, list(scorer.classes), list(scorer.target_names))
    record_path, preds_path = run_dir / "result.json", run_dir / "predictions.npz"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    tag = f"fold{fold}/{run_dir.name}"
    if record is not None and record.get("fingerprint") == fingerprint and preds_path.is_file():
        log(f"[{tag}] finished earlier with the same settings; reusing it")
    else:
        record = fit_fold(cfg, fold, split, data, scorer, pseudo, run_dir, backend, writer, tag, fingerprint)
    # A finished fold needs no resume state (a ViT-B one is over a GB); also a save killed mid-write leaves a temp file.
    (run_dir / RESUME_CHECKPOINT).unlink(missing_ok=True)
    remove_stale_temp_files(run_dir, Path(RESUME_CHECKPOINT).stem)
    with np.load(preds_path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    shown = ", ".join(f"{m} {fmt(record.get(m))}" for m in scorer.headline()[:3])
    log(f"[{tag}] best epoch {record['best_epoch']}: {shown} ({record['num_pseudo']} pseudo-labelled)")
    return {k: v for k, v in record.items() if k not in ("fingerprint", "history")}, arrays


def fit_fold(cfg, fold, split, data: Data, scorer: Scorer, pseudo, run_dir: Path, backend, writer, tag: str,
             fingerprint: str) -> dict:
    """Train one fold, predict its held-out split, the tests and the pool, and write its files (record last)."""
    tr, va = split
    torch.manual_seed(cfg.seed * 1000 + fold)
    fold_train, fold_label, fold_targets = data.train.subset(tr), data.label[tr], data.targets[tr]
    if pseudo is not None:
        fold_train = fold_train.concat(pseudo[0])
        fold_label = np.concatenate([fold_label, pseudo[1]])
        fold_targets = np.concatenate([fold_targets, np.full((len(pseudo[1]), fold_targets.shape[1]), np.nan, np.float32)])
    held_out = data.train.subset(va)
    model, fit = backend.fit(fold_train, fold_label, fold_targets, (held_out, data.label[va], data.targets[va]),
                             scorer=scorer, seed=cfg.seed * 1000 + fold, writer=writer, tag=tag,
                             checkpoint=run_dir / RESUME_CHECKPOINT, fingerprint=fingerprint)
    arrays = {}
    arrays["val_probs"], arrays["val_regression"] = backend.predict(model, held_out)
    for i, t in enumerate(data.tests):
        arrays[f"test{i}_probs"], arrays[f"test{i}_regression"] = backend.predict(model, t.features)
    if data.unlabeled is not None:
        arrays["pool_probs"], _ = backend.predict(model, data.unlabeled)
    backend.save(model, fit, run_dir)
    with atomic_path(run_dir / "predictions.npz", suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    record = {"fold": fold, "fingerprint": fingerprint, "best_epoch": fit.best_epoch, "num_train": len(fold_train),
              "num_pseudo": int(len(pseudo[1])) if pseudo is not None else 0, "num_val": int(len(va)),
              **clean(fit.best), "history": [clean(h) for h in fit.history]}
    write_json(run_dir / "result.json", record)  # written last: its presence marks the fold finished
    return record


def fold_mean(records: list[dict], keys: Sequence[str]) -> dict[str, float | None]:
    """Each metric's mean over the folds that have it (MER2023 style: the mean of the folds' best-epoch scores)."""
    out = {}
    for key in keys:
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Run the whole protocol described in the module docstring; returns (and writes) the results dict."""
    if cfg.pseudo_label not in MODES:
        raise ValueError(f"pseudo_label={cfg.pseudo_label!r}; expected one of {MODES}")
    if cfg.pseudo_label != "none" and cfg.head == "svm":
        raise ValueError("head 'svm' gives no class confidences to pseudo-label with; use pseudo_label='none' or another head")
    if not cfg.labels:
        raise ValueError("a label CSV (labels) is required")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    with FolderLock(out_dir, what="out_dir"):  # one live run per folder (FolderInUse names the owner)
        fmt_ = label_format(cfg.labels, cfg.dataset, label_column=cfg.label_column, classes=cfg.classes,
                            targets=cfg.targets)
        labels = read_labels(cfg.labels, fmt_)
        scorer = Scorer(labels.classes, labels.target_names, mer=fmt_.is_mer, metric=cfg.metric)
        if scorer.metric not in scorer.names():
            raise ValueError(f"metric={cfg.metric!r}: expected 'auto' or one of {scorer.names()}")
        minority = minority_spec(cfg, labels.classes)
        backend = make_backend(cfg)
        data = load_data(cfg, backend, labels, fmt_)
        fold_names, splits = make_folds(cfg, labels, data.train.names, data.label)
        fold_runs, fold_pseudo = run_folds(cfg, data, splits, scorer, minority, backend, out_dir)
        return report(cfg, fmt_, labels, data, fold_names, splits, fold_runs, fold_pseudo, scorer, backend, out_dir)


def run_folds(cfg: FinetuneConfig, data: Data, splits, scorer: Scorer, minority, backend, out_dir: Path):
    """Every fold with its pseudo-label rounds: (per fold, per round: (record, predictions)), per fold PseudoLabels."""
    writer = None
    if cfg.tensorboard:
        writer = SummaryWriter(str(out_dir / "tb"))
    fold_runs: list[list[tuple[dict, dict]]] = []
    fold_pseudo = []
    for k in tqdm(range(len(splits)), desc="folds", disable=not cfg.progress, unit="fold"):
        runs: list[tuple[dict, dict]] = []

        # Each fold pseudo-labels with its own model, trained without its held-out split, so the held-out
        # score of every round stays free of leakage.
        def train_and_predict(index: np.ndarray, label: np.ndarray, round_no: int) -> np.ndarray:
            pseudo = (data.unlabeled.subset(index), label) if len(index) else None
            runs.append(train_fold(cfg, k, splits[k], data, scorer, pseudo, out_dir / f"fold{k}" / f"round{round_no}",
                                   backend, writer))
            return runs[-1][1].get("pool_probs")

        fold_pseudo.append(pseudo_label_rounds(
            train_and_predict, data.label[splits[k][0]], mode=cfg.pseudo_label, rounds=cfg.rounds,
            threshold=cfg.threshold, minority=minority, num_minority=cfg.num_minority,
            num_classes=len(scorer.classes), class_names=scorer.classes))
        fold_runs.append(runs)
    if writer is not None:
        writer.close()
    return fold_runs, fold_pseudo


def report(cfg, fmt_: LabelFormat, labels: LabelSet, data: Data, fold_names, splits, fold_runs, fold_pseudo,
           scorer: Scorer, backend, out_dir: Path) -> dict:
    """Scores (fold mean, pooled held-out), prediction CSVs, confusion matrices and results.json."""
    classes, keys = scorer.classes, scorer.names()
    final = [runs[-1] for runs in fold_runs]
    held = np.zeros(len(data.train), bool)
    probs = np.zeros((len(data.train), len(classes)), np.float32)
    regression = np.zeros(data.targets.shape, np.float32)
    fold_of = np.full(len(data.train), "", dtype=object)
    for name, (_, va), (_, arrays) in zip(fold_names, splits, final):
        probs[va], regression[va], held[va], fold_of[va] = arrays["val_probs"], arrays["val_regression"], True, name
    rows = np.flatnonzero(held)
    cv = fold_mean([record for record, _ in final], keys)
    pooled = scorer(data.label[rows], probs[rows], data.targets[rows], regression[rows])
    cv_csv = write_predictions(out_dir / "predictions_cv.csv", [data.train.names[i] for i in rows], probs[rows].argmax(1),
                               fmt_, classes, regression[rows], extra={"fold": list(fold_of[rows])})
    plot_confusion_matrix(confusion_matrix(data.label[rows], probs[rows].argmax(1), len(classes)), classes,
                          out_dir / "confusion_matrix.png", title=f"{cfg.head}: {len(splits)}-fold CV (held-out)")
    tests = {t.name: report_test(cfg, fmt_, t, i, final, scorer, out_dir) for i, t in enumerate(data.tests)}
    # CV after r rounds (a fold that stopped adding pseudo-labels earlier keeps its last model).
    num_rounds = max(len(runs) for runs in fold_runs)
    rounds = [{"round": r, "cv": fold_mean([runs[min(r, len(runs) - 1)][0] for runs in fold_runs], keys)}
              for r in range(num_rounds)]
    for k, pl in enumerate(fold_pseudo):
        path = out_dir / f"fold{k}" / "pseudo_labels.csv"
        if len(pl.index):
            write_predictions(path, [data.unlabeled.names[i] for i in pl.index], pl.label, fmt_, classes)
        else:
            path.unlink(missing_ok=True)  # not a stale one from an earlier run
    described = backend.describe(data.train)
    counts = np.bincount(data.label, minlength=len(classes))
    results = {
        "config": dataclasses.asdict(cfg),
        "dataset": fmt_.name, "classes": list(classes), "targets": list(labels.target_names), "metric": scorer.metric,
        **described,  # branches, feature_dims (and, end to end, the encoder and clip settings)
        "num_train": len(data.train),
        "class_counts": {c: int(n) for c, n in zip(classes, counts)},
        "missing_features": data.train.missing,
        "cv": cv,
        "cv_pooled": clean(pooled),  # the same held-out predictions scored together
        "predictions_csv": str(cv_csv),
        "fold_names": list(fold_names),
        "folds": [record for record, _ in final],
        "rounds": rounds,
        "pseudo_label": {
            "mode": cfg.pseudo_label,
            "num_unlabeled": len(data.unlabeled) if data.unlabeled is not None else 0,
            "per_fold": [{"fold": k, "num_selected": int(len(pl.index)), "history": pl.history} for k, pl in enumerate(fold_pseudo)],
        },
        "tests": tests,
        "confusion_matrix_png": str(out_dir / "confusion_matrix.png"),
    }
    write_json(out_dir / "results.json", results)
    head, *others = scorer.headline()
    shown = lambda names: ", ".join(f"{m} {fmt(cv[m])}" for m in names)  # noqa: E731
    print(f"{head} {fmt(cv[head])} ({shown(others[:2])}) {len(splits)}-fold CV on Train&Val [{shown(others[2:])}], "
          f"head={cfg.head}, branches={'+'.join(described['branches'])}; results in {out_dir / 'results.json'}")
    return results


def report_test(cfg, fmt_: LabelFormat, t: TestSet, i: int, final, scorer: Scorer, out_dir: Path) -> dict:
    """A test set's fold-averaged predictions (CSV) and, when labelled, its metrics and confusion matrix."""
    probs = np.mean([arrays[f"test{i}_probs"] for _, arrays in final], axis=0)
    regression = np.mean([arrays[f"test{i}_regression"] for _, arrays in final], axis=0)
    csv_path = write_predictions(out_dir / f"predictions_{t.name}.csv", t.features.names, probs.argmax(1), fmt_,
                                 scorer.classes, regression)
    entry = {"num_samples": len(t.features), "missing_features": t.features.missing, "predictions_csv": str(csv_path)}
    if t.label is not None and len(t.features):
        entry["metrics"] = clean(scorer(t.label, probs, t.targets, regression))
        entry["confusion_matrix_png"] = str(plot_confusion_matrix(
            confusion_matrix(t.label, probs.argmax(1), len(scorer.classes)), scorer.classes,
            out_dir / f"confusion_matrix_{t.name}.png", title=f"{cfg.head}: {t.name} (fold average)"))
    return entry
