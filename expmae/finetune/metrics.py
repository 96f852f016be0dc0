"""Metrics of a labelled set, from a confusion matrix in numpy; tests hold each against scikit-learn.

Classification (any set): ``war`` (weighted average recall = accuracy), ``uar`` (unweighted average recall: the
mean recall of the classes present in the truth, scikit-learn's ``balanced_accuracy_score``), ``weighted_f1``
(per-class F1 weighted by true support), ``macro_f1`` (mean F1 of the classes in the truth or the predictions,
scikit-learn's ``f1_score(average="macro")``), ``recall/<class>`` (NaN for a class absent from the truth).
Regression columns: ``mse/<column>`` and ``ccc/<column>`` (Lin's concordance correlation coefficient) over the
rows whose truth is known. DFER papers (DFEW, FERV39k, MAFW) report UAR and WAR.

MER2023 (challenge paper, Sec. 4; MERTools ``calculate_results``): metric_e = weighted F1, metric_v = MSE of
valence, metric = metric_e - 0.25 * metric_v, the challenge's ranking score.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from expmae.files import atomic_path

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


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class; NaN for a class without true samples."""
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    support = cm.sum(1)
    return np.divide(np.diag(cm), support, out=np.full(num_classes, np.nan), where=support > 0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes that occur in the truth or the predictions (scikit-learn's macro average)."""
    present = np.union1d(np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64))
    if not present.size:
        raise ValueError("macro F1 of an empty label set")
    return float(per_class_f1(y_true, y_pred, num_classes)[present].mean())


def concordance_cc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Lin's concordance correlation coefficient, 2 cov / (var_t + var_p + (mean_t - mean_p)^2) (population
    moments), the usual score of valence / arousal regression; NaN when both are constant and equal."""
    t, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    denom = t.var() + p.var() + (t.mean() - p.mean()) ** 2
    return float(2 * np.mean((t - t.mean()) * (p - p.mean())) / denom) if denom > 0 else float("nan")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """WAR, UAR, weighted and macro F1 and per-class recall of the argmax of class scores ``probs`` (N, C)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(probs).argmax(1)
    num_classes = len(classes)
    recall = per_class_recall(y_true, y_pred, num_classes)
    out = {
        "war": float(np.mean(y_true == y_pred)),
        "uar": float(np.nanmean(recall)),
        "weighted_f1": weighted_f1(y_true, y_pred, num_classes),
        "macro_f1": macro_f1(y_true, y_pred, num_classes),
    }
    out.update({f"recall/{c}": float(r) for c, r in zip(classes, recall)})
    return out


def regression_metrics(truth: np.ndarray, pred: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """``mse/<name>`` and ``ccc/<name>`` per column of (N, R) arrays over rows with known (finite) truth; NaN
    where a column has no known row or no prediction (a head without regression output)."""
    out = {}
    for j, name in enumerate(names):
        t, p = np.asarray(truth, dtype=np.float64)[:, j], np.asarray(pred, dtype=np.float64)[:, j]
        known = np.isfinite(t) & np.isfinite(p)
        out[f"mse/{name}"] = valence_mse(t[known], p[known]) if known.any() else float("nan")
        out[f"ccc/{name}"] = concordance_cc(t[known], p[known]) if known.any() else float("nan")
    return out


def evaluate(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], targets_true: np.ndarray | None = None,
             targets_pred: np.ndarray | None = None, target_names: Sequence[str] = (), mer: bool = False) -> dict[str, float]:
    """Every metric of a set's predictions (flat ``{name: float}``): classification, regression columns and,
    with ``mer``, the MER2023 numbers (``metric_e``, ``metric_v`` from the first target column, ``metric``)."""
    out = {}
    if mer:
        valence = (targets_true[:, 0], targets_pred[:, 0]) if target_names else (None, None)
        out.update({k: v for k, v in mer_metrics(y_true, probs, *valence).items() if k != "accuracy"})
    out.update(classification_metrics(y_true, probs, classes))
    if target_names:
        out.update(regression_metrics(targets_true, targets_pred, target_names))
    return out


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """Write a row-normalised confusion matrix (counts annotated) as a PNG, atomically."""
    cm = np.asarray(cm)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    # a Figure of its own, not pyplot's: no display backend to choose, nothing global to switch or close
    fig = Figure(figsize=(1.0 + 0.9 * len(class_names), 0.8 + 0.8 * len(class_names)))
    ax = fig.subplots()
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
    return Path(path)


LOWER_IS_BETTER = ("mse/", "metric_v")  # metric names (prefixes) where smaller is better


class Scorer:
    """What a run reports and picks its best epoch by: the set's classes and regression columns, MER2023's
    combined metric where it applies, and the ``metric`` that selects (``metric``, ``uar``, ``war``, ...)."""

    def __init__(self, classes, target_names=(), *, mer: bool = False, metric: str = "auto"):
        self.classes, self.target_names, self.mer = tuple(classes), tuple(target_names), mer
        self.metric = ("metric" if mer else "uar") if metric == "auto" else metric

    def names(self) -> list[str]:
        """Every metric this scorer reports (the valid choices of ``metric``)."""
        dummy = np.zeros((1, len(self.classes)), np.float32)
        targets = np.zeros((1, len(self.target_names)), np.float32)
        with np.errstate(all="ignore"):
            return list(self(np.zeros(1, np.int64), dummy, targets, targets))

    def __call__(self, label, probs, targets_true=None, targets_pred=None) -> dict[str, float]:
        return evaluate(label, probs, self.classes, targets_true, targets_pred, self.target_names, mer=self.mer)

    def headline(self) -> list[str]:
        """The selected metric first, then the others worth a summary line."""
        if self.mer:
            usual = ["metric", "metric_e", "metric_v", "war", "uar"]
        else:
            usual = ["uar", "war", "weighted_f1", "macro_f1"] + [f"ccc/{t}" for t in self.target_names]
        return [self.metric] + [m for m in usual if m != self.metric]

    def score(self, metrics: dict[str, float]) -> float:
        """Larger is better; MER2023's metric falls back to metric_e without valence truth; NaN is worst."""
        value = metrics[self.metric]
        if self.metric == "metric" and not np.isfinite(value):
            value = metrics["metric_e"]
        if self.metric.startswith(LOWER_IS_BETTER):
            value = -value
        return float(value) if np.isfinite(value) else -np.inf
