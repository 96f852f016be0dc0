"""MER2023 metrics: weighted F1 of the discrete emotion, MSE of valence, and their combination.

As the challenge defines them (MER2023 paper, Sec. 4; MERTools ``calculate_results``):
metric_e = F1 averaged over classes weighted by their support in the ground truth,
metric_v = mean squared error of valence, metric = metric_e - 0.25 * metric_v.
Computed here from a confusion matrix in numpy; tests hold them against scikit-learn.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

VALENCE_WEIGHT_IN_METRIC = 0.25


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be 1-D and of one length")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} has class indices outside [0, {num_classes})")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """F1 of each class (0 where precision + recall is 0, as scikit-learn's zero_division default)."""
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)  # predicted + true = 2tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """metric_e: per-class F1 weighted by true-class support."""
    support = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=num_classes).astype(np.float64)
    if support.sum() == 0:
        raise ValueError("weighted F1 of an empty label set")
    return float((per_class_f1(y_true, y_pred, num_classes) * support).sum() / support.sum())


def valence_mse(v_true: np.ndarray, v_pred: np.ndarray) -> float:
    """metric_v: mean squared error."""
    v_true, v_pred = np.asarray(v_true, dtype=np.float64), np.asarray(v_pred, dtype=np.float64)
    if v_true.shape != v_pred.shape or v_true.size == 0:
        raise ValueError(f"valence arrays {v_true.shape} and {v_pred.shape} must be non-empty and of one shape")
    return float(np.mean((v_true - v_pred) ** 2))


def combined_metric(metric_e: float, metric_v: float) -> float:
    """metric = metric_e - 0.25 * metric_v (the challenge's ranking score)."""
    return metric_e - VALENCE_WEIGHT_IN_METRIC * metric_v


def mer_metrics(
    emotion_true: np.ndarray,
    emotion_probs: np.ndarray,
    valence_true: np.ndarray | None = None,
    valence_pred: np.ndarray | None = None,
) -> dict[str, float]:
    """All MER2023 numbers from class scores (N, C) and valence; valence terms are NaN where truth is unknown.

    ``valence_true`` may hold NaN (e.g. test3, pseudo-labels): those rows are left out of metric_v; when no
    row has valence, metric_v and metric are NaN and ranking falls back to the caller.
    """
    emotion_probs = np.asarray(emotion_probs)
    num_classes = emotion_probs.shape[1]
    emotion_pred = emotion_probs.argmax(1)
    emotion_true = np.asarray(emotion_true, dtype=np.int64)
    out = {
        "metric_e": weighted_f1(emotion_true, emotion_pred, num_classes),
        "accuracy": float(np.mean(emotion_true == emotion_pred)),
        "metric_v": float("nan"),
        "metric": float("nan"),
    }
    if valence_true is not None and valence_pred is not None:
        valence_true = np.asarray(valence_true, dtype=np.float64)
        known = np.isfinite(valence_true)
        if known.any():
            out["metric_v"] = valence_mse(valence_true[known], np.asarray(valence_pred, dtype=np.float64)[known])
            out["metric"] = combined_metric(out["metric_e"], out["metric_v"])
    return out


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """Write a row-normalised confusion matrix (counts annotated) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and servers have no display
    import matplotlib.pyplot as plt

    from expmae.jobs import atomic_path

    cm = np.asarray(cm)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(class_names), 0.8 + 0.8 * len(class_names)))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
