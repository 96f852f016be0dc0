"""Folds: which samples each fold trains on and which it holds out.

Three sources, one result (a list of (train rows, held-out rows) into the loaded Train&Val samples):

- stratified k-fold (the default; MER2023: 5 folds, seeded): every sample held out once;
- a split column of the label CSV (``--split-column``): each distinct value is one fold's held-out set (DFEW's
  five official folds, 1..5), except the value ``train``, whose rows always train: a column holding ``train``
  and ``test`` is an official train / test split (one fold, scored on ``test``);
- split files (``--split-files``): one per fold, each ``HELD_OUT`` (a name list; the fold trains on every other
  labelled sample) or ``TRAIN:HELD_OUT`` (official train and test lists, e.g. DFEW's set_1 ... set_5).
"""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold

from expmae.labels import read_name_list

TRAIN_VALUE = "train"  # a split-column value that is never held out


def stratified_folds(label: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's StratifiedKFold (shuffled, seeded); every class needs at least ``folds`` samples."""
    return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(label)), label))


def column_folds(values: list[str], column: str) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """(fold names, splits) from a split column's per-sample ``values``: one fold per value other than ``train``,
    numeric values in numeric order."""
    if any(not v for v in values):
        raise ValueError(f"split column {column!r}: {sum(not v for v in values)} samples have no value")
    keys = sorted(set(values) - {TRAIN_VALUE}, key=lambda v: (0, float(v), v) if _is_number(v) else (1, 0.0, v))
    if not keys:
        raise ValueError(f"split column {column!r}: every sample is {TRAIN_VALUE!r}; nothing to hold out")
    values_arr = np.array(values, dtype=object)
    return [f"{column}={k}" for k in keys], [(np.flatnonzero(values_arr != k), np.flatnonzero(values_arr == k)) for k in keys]


def file_folds(specs: list[str], names: list[str], labelled: set[str]) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """(fold names, splits) from split-file specs ``HELD_OUT`` or ``TRAIN:HELD_OUT`` over the loaded ``names``.
    A listed name without a label is an error; one that is labelled but was dropped (no features) is skipped."""
    row = {n: i for i, n in enumerate(names)}
    fold_names, splits = [], []
    for spec in specs:
        train_path, sep, held_path = spec.rpartition(":")
        held = _rows(held_path, row, labelled)
        if sep:
            train = _rows(train_path, row, labelled)
            overlap = np.intersect1d(train, held)
            if len(overlap):
                raise ValueError(f"{spec}: {len(overlap)} samples are in both lists (first: {names[overlap[0]]})")
        else:
            train = np.setdiff1d(np.arange(len(names)), held)
        fold_names.append(spec)
        splits.append((train, held))
    return fold_names, splits


def _rows(path: str, row: dict[str, int], labelled: set[str]) -> np.ndarray:
    listed = read_name_list(path)
    unknown = [n for n in listed if n not in labelled]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} of {len(listed)} names are not in the label CSV (first: {unknown[0]!r})")
    rows = np.array(sorted(row[n] for n in listed if n in row), dtype=np.int64)
    if not len(rows):
        raise ValueError(f"{path}: none of its {len(listed)} samples is usable (all lack features)")
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_folds(splits: list[tuple[np.ndarray, np.ndarray]], source: str) -> None:
    """Every fold must hold out and train on something."""
    for k, (train, held) in enumerate(splits):
        if not len(held) or not len(train):
            raise ValueError(f"{source}: fold {k} has {len(train)} training and {len(held)} held-out samples; "
                             "both must be non-empty")
