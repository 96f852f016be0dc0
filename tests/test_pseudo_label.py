"""Pseudo-labelling: selection rules by hand, round bookkeeping, and weak-class reinforcement on a synthetic
class-imbalanced task measured on held-out data."""
import numpy as np
import pytest
import torch

from expmae.finetune.training import fit_head, predict
from expmae.finetune.featureset import FeatureSet
from expmae.finetune.heads import create_head
from expmae.finetune.metrics import per_class_f1
from expmae.finetune.pseudo_label import minority_classes, pseudo_label_rounds, select_confident


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny heads, one thread


def test_select_confident_by_hand():
    probs = np.array([
        [0.90, 0.02, 0.02, 0.02, 0.02, 0.02],  # confident class 0
        [0.10, 0.10, 0.10, 0.10, 0.50, 0.10],  # not confident
        [0.00, 0.00, 0.00, 0.00, 0.15, 0.85],  # confident class 5
        [0.00, 0.00, 0.00, 0.00, 0.80, 0.20],  # exactly at the threshold: not kept (strictly greater)
    ])
    index, label = select_confident(probs, 0.8)
    assert index.tolist() == [0, 2] and label.tolist() == [0, 5]
    index, label = select_confident(probs, 0.8, classes=[4, 5])
    assert index.tolist() == [2] and label.tolist() == [5]


def test_minority_classes_by_frequency_and_confidence():
    labels = np.array([0] * 9 + [1] * 7 + [2] * 5 + [3] * 5 + [4] * 1)  # class 5 has none
    assert minority_classes(labels, 6, 2, by="frequency") == [4, 5]
    assert minority_classes(labels, 6, 3, by="frequency") == [2, 4, 5]  # tie 2/3 broken by lower index
    probs = np.full((6, 6), 0.0)
    for row, (c, p) in enumerate([(0, 0.9), (1, 0.8), (1, 0.6), (2, 0.95), (3, 0.5), (4, 0.99)]):
        probs[row, c] = p
    # mean confidence: 0 -> .9, 1 -> .7, 2 -> .95, 3 -> .5, 4 -> .99, 5 never predicted -> 0
    assert minority_classes(labels, 6, 2, by="confidence", probs=probs) == [3, 5]
    with pytest.raises(ValueError, match="needs the unlabeled pool"):
        minority_classes(labels, 6, by="confidence")


def test_rounds_accumulate_disjoint_samples_and_stop_when_nothing_is_added():
    # A fake trainer: at round r it is confident (0.9) on the pool rows of classes 0..r, unsure (0.5) elsewhere.
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, 300)
    count = np.bincount(truth, minlength=6)
    labelled = np.array([0, 1, 2, 3] * 10)  # classes 4 and 5 have no labelled samples
    calls = []

    def train_and_predict(index, label, round_no):
        calls.append((round_no, len(index)))
        np.testing.assert_array_equal(label, truth[index])  # the selected labels come back as selected
        confident = truth <= round_no
        probs = np.full((300, 6), 0.1)
        probs[np.arange(300), truth] = np.where(confident, 0.9, 0.5)
        return probs / probs.sum(1, keepdims=True)

    reliable = pseudo_label_rounds(train_and_predict, labelled, mode="reliable", rounds=3, threshold=0.6)
    assert calls == [(0, 0), (1, count[0]), (2, count[:2].sum()), (3, count[:3].sum())]  # last call trains on the final set
    assert [h["added"] for h in reliable.history] == count[:3].tolist()
    assert reliable.history[1]["added_per_class"] == {"0": 0, "1": int(count[1]), "2": 0, "3": 0, "4": 0, "5": 0}
    assert sorted(reliable.index.tolist()) == np.flatnonzero(truth <= 2).tolist()  # disjoint, nothing twice

    calls.clear()
    weak = pseudo_label_rounds(train_and_predict, labelled, mode="weak", rounds=3, threshold=0.6)
    # minority by frequency = 4 and 5, never confident here: the first round adds nothing and the loop stops
    assert calls == [(0, 0)] and weak.history == [
        {"round": 1, "classes": ["4", "5"], "added": 0, "added_per_class": dict.fromkeys("012345", 0), "pool_left": 300}
    ]

    calls.clear()
    told = pseudo_label_rounds(train_and_predict, labelled, mode="weak", rounds=5, threshold=0.6, minority=[0, 1])
    assert calls == [(0, 0), (1, count[0]), (2, count[:2].sum())]  # round 3 finds no confident class-0/1 row left
    assert np.bincount(told.label, minlength=6)[2:].sum() == 0

    calls.clear()
    none = pseudo_label_rounds(train_and_predict, labelled, mode="none", rounds=3)
    assert calls == [(0, 0)] and len(none.index) == 0 and none.history == []
    with pytest.raises(ValueError, match="pseudo-label mode"):
        pseudo_label_rounds(train_and_predict, labelled, mode="soft")


# ------------------------------------------------------------------------------------------------------
# Imbalanced synthetic task: six Gaussian classes in two modalities (overlapping at this noise level); the
# labelled set has 150 samples of each majority class and 12 of classes 4 and 5; the unlabeled pool and the
# held-out test set are balanced, independent draws. Pseudo-labels come from model predictions only: the
# pool's true labels are used solely to report how accurate the pseudo-labels were.

DIM = 8


def imbalanced_task(counts, seed, geometry_seed=1):
    geometry, rng = np.random.default_rng(geometry_seed), np.random.default_rng(seed)
    means = {"a": geometry.normal(size=(6, DIM)), "b": geometry.normal(size=(6, DIM))}
    label = np.repeat(np.arange(6), counts)
    rng.shuffle(label)
    arrays = {k: (m[label] + rng.normal(size=(len(label), DIM))).astype(np.float32) for k, m in means.items()}
    valence = np.linspace(-4, 4, 6)[label].astype(np.float32)
    return FeatureSet([f"{seed}_{i}" for i in range(len(label))], arrays), label, valence


def test_weak_reinforcement_raises_minority_f1_over_supervised_baseline():
    labelled, y, v = imbalanced_task([150, 150, 150, 150, 12, 12], seed=0)
    pool, pool_truth, _ = imbalanced_task([150] * 6, seed=1)
    test, test_truth, _ = imbalanced_task([150] * 6, seed=2)
    final = {}

    def train_and_predict(index, label, round_no, mode):
        torch.manual_seed(0)
        head = create_head("attention", labelled.dims, hidden_dim=64, dropout=0.1)
        train = labelled.concat(pool.subset(index)) if len(index) else labelled
        emotion = np.concatenate([y, label])
        valence = np.concatenate([v, np.full(len(label), np.nan, np.float32)])  # pseudo-labels carry no valence
        fit_head(head, train, emotion, valence, epochs=30, batch_size=32, seed=0)
        final[mode] = head
        return predict(head, pool)[0]

    supervised = pseudo_label_rounds(lambda i, lab, r: train_and_predict(i, lab, r, "none"), y, mode="none")
    weak = pseudo_label_rounds(lambda i, lab, r: train_and_predict(i, lab, r, "weak"), y, mode="weak", rounds=2,
                               threshold=0.8, minority="frequency")
    assert len(supervised.index) == 0
    assert all(h["classes"] == ["4", "5"] for h in weak.history)  # found from class frequency, not told
    added = np.bincount(weak.label, minlength=6)
    assert added[:4].sum() == 0 and added[4] > 20 and added[5] > 20
    assert (pool_truth[weak.index] == weak.label).mean() > 0.9  # the pseudo-labels are mostly right

    f1 = {mode: per_class_f1(test_truth, predict(head, test)[0].argmax(1), 6) for mode, head in final.items()}
    minority_f1 = {mode: scores[4:].mean() for mode, scores in f1.items()}
    assert minority_f1["weak"] > minority_f1["none"] + 0.1, minority_f1
