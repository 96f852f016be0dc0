"""Linear probe of frozen features: how much of a label a fixed encoder's features carry, linearly.

The standard check of a self-supervised encoder (MAE's linear probing): standardise the features with the
training set's statistics (MAE puts a BatchNorm without affine before its linear head for the same reason), fit
a multinomial logistic regression on the training samples, score held-out samples. sklearn does the fitting.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def read_features(folder: str | os.PathLike, names: Sequence[str]) -> np.ndarray:
    """``folder/<name>.npy`` for every name (as expmae-features writes them), mean over any leading clip axis:
    (len(names), D). A missing file is a one-line error naming it."""
    folder = Path(folder)
    rows = []
    for name in names:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no features for {name!r} (extract them with expmae-features first)")
        x = np.load(path)
        rows.append(x.reshape(-1, x.shape[-1]).mean(0) if x.ndim > 1 else x)
    return np.stack(rows).astype(np.float64)


def linear_probe(train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, test_y: Sequence, *,
                 C: float = 0.1, seed: int = 0) -> dict[str, float]:
    """Fit on (train_x, train_y), score on (test_x, test_y): accuracy (WAR) and balanced accuracy (UAR)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"features and labels differ in length: train {len(train_x)} vs {len(train_y)}, "
                         f"test {len(test_x)} vs {len(test_y)}")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, random_state=seed))
    clf.fit(train_x, np.asarray(train_y))
    pred = clf.predict(test_x)
    return {"accuracy": float(accuracy_score(test_y, pred)), "balanced_accuracy": float(balanced_accuracy_score(test_y, pred)),
            "num_train": int(len(train_x)), "num_test": int(len(test_x))}
