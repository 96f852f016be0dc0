"""Pseudo-labelling of unlabeled samples for MER-SEMI.

Two selection rules, iterated over rounds (train -> predict the unlabeled pool -> add confident samples):
- ``reliable``: keep every unlabeled sample whose top class probability exceeds the threshold;
- ``weak`` (weak-class reinforcement): the same, but only for the under-represented classes, so the added
  samples rebalance the training set instead of reinforcing its majority classes.
Added samples leave the pool and keep their label in later rounds; they carry no valence (NaN), so they
train the emotion output only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

MODES = ("none", "reliable", "weak")


def select_confident(probs: np.ndarray, threshold: float = 0.8, classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose max probability > ``threshold`` (and whose argmax is in ``classes`` if given): (index, label)."""
    probs = np.asarray(probs)
    label = probs.argmax(1)
    keep = probs.max(1) > threshold
    if classes is not None:
        keep &= np.isin(label, np.asarray(list(classes), dtype=np.int64))
    index = np.flatnonzero(keep)
    return index, label[index]


def minority_classes(
    labels: np.ndarray,
    num_classes: int,
    count: int = 2,
    by: str = "frequency",
    probs: np.ndarray | None = None,
) -> list[int]:
    """The ``count`` under-represented classes.

    by="frequency": fewest labelled samples. by="confidence": lowest mean top probability over the unlabeled
    samples predicted as that class (a class the model never predicts counts as confidence 0).
    Ties go to the lower class index, so the choice is deterministic.
    """
    if by == "frequency":
        score = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    elif by == "confidence":
        if probs is None:
            raise ValueError("minority by confidence needs the unlabeled pool's class probabilities")
        pred, conf = probs.argmax(1), probs.max(1)
        score = np.array([conf[pred == c].mean() if (pred == c).any() else 0.0 for c in range(num_classes)])
    else:
        raise ValueError(f"minority by={by!r}; expected 'frequency' or 'confidence'")
    return sorted(np.argsort(score, kind="stable")[:count].tolist())


@dataclass
class PseudoLabels:
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # rows of the unlabeled pool
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    history: list[dict] = field(default_factory=list)  # one record per selection round


def pseudo_label_rounds(
    train_and_predict: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
    labelled: np.ndarray,
    *,
    mode: str = "weak",
    rounds: int = 1,
    threshold: float = 0.8,
    minority: str | Sequence[int] = "frequency",
    num_minority: int = 2,
    num_classes: int = 6,
    class_names: Sequence[str] | None = None,
) -> PseudoLabels:
    """Iterate ``rounds`` selections; ``train_and_predict(index, label, round)`` trains on the labelled data plus
    the pseudo-labelled rows ``index`` of the pool (labels ``label``) and returns the pool's class probabilities.

    It is called ``rounds + 1`` times at most (the last call trains on the final set, so the caller keeps
    that model); it stops early when a round adds nothing. ``minority``: "frequency", "confidence", or
    explicit class indices (the paper's worried and surprise are 4 and 5).
    """
    if mode not in MODES:
        raise ValueError(f"pseudo-label mode {mode!r}; expected one of {MODES}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    result = PseudoLabels()
    for round_no in range(rounds + 1):
        probs = train_and_predict(result.index, result.label, round_no)
        if mode == "none" or round_no == rounds:
            break
        if mode == "weak":
            if isinstance(minority, str):
                classes = minority_classes(labelled, num_classes, num_minority, by=minority, probs=probs)
            else:
                classes = sorted(int(c) for c in minority)
        else:
            classes = None
        pool = np.setdiff1d(np.arange(len(probs)), result.index)
        picked, label = select_confident(probs[pool], threshold, classes)
        added = np.bincount(label, minlength=num_classes)
        result.history.append(
            {
                "round": round_no + 1,
                "classes": [names[c] for c in classes] if classes is not None else names,
                "added": int(len(picked)),
                "added_per_class": {names[c]: int(added[c]) for c in range(num_classes)},
                "pool_left": int(len(pool) - len(picked)),
            }
        )
        if len(picked) == 0:
            break
        result.index = np.concatenate([result.index, pool[picked]])
        result.label = np.concatenate([result.label, label])
    return result
