"""``svm``: scikit-learn's SVC on the branches' features, concatenated (the paper's Table 3 "SVM" row).

``make_pipeline(StandardScaler(), SVC(C=c))``: RBF kernel, gamma "scale", the scaler fit on the training split.
It fits in one go (no epochs, so no best-epoch choice) and has no regression output: its regression predictions
are NaN, so MSE / CCC (and MER2023's metric_v and metric) are reported as n/a and its MER score is metric_e.
Its class "probabilities" are one-hot rows of ``SVC.predict`` (Platt scaling's internal cross-validation would
make the argmax disagree with ``predict``): fold-averaged test predictions are then votes, and it cannot
pseudo-label (no confidences).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC


class SVMHead:
    trainable = False  # fit on features by scikit-learn, not by gradient steps

    def __init__(self, in_dims: Mapping[str, int], c: float = 1.0, num_classes: int = 6, num_targets: int = 1):
        self.in_dims, self.num_classes, self.num_targets = dict(in_dims), num_classes, num_targets
        self.pipeline = make_pipeline(StandardScaler(), SVC(C=c))

    def features(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The branches in the head's order, concatenated: (N, sum of D_m)."""
        return np.concatenate([arrays[b] for b in self.in_dims], axis=1)

    def fit(self, arrays: Mapping[str, np.ndarray], label: np.ndarray) -> "SVMHead":
        self.pipeline.fit(self.features(arrays), np.asarray(label))
        return self

    def predict(self, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One-hot class rows (N, C) and NaN regression (N, R)."""
        x = self.features(arrays)
        probs = np.zeros((len(x), self.num_classes), np.float32)
        if len(x):
            probs[np.arange(len(x)), self.pipeline.predict(x).astype(np.int64)] = 1.0
        return probs, np.full((len(x), self.num_targets), np.nan, np.float32)
