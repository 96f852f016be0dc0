"""Metrics (any set's and MER2023's) against scikit-learn (the oracle) and hand-computed cases."""
import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, mean_squared_error, recall_score

from expmae.finetune.metrics import (
    Scorer,
    classification_metrics,
    combined_metric,
    concordance_cc,
    confusion_matrix,
    mer_metrics,
    per_class_f1,
    plot_confusion_matrix,
    regression_metrics,
    valence_mse,
    weighted_f1,
)


@pytest.mark.parametrize("seed", range(5))
def test_weighted_f1_and_mse_match_sklearn_on_random_arrays(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y_true = rng.integers(0, 6, n)
    # Skewed predictions so some classes are never predicted and some get many false positives.
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.choice(6, n, p=[0.4, 0.3, 0.2, 0.1, 0.0, 0.0]))
    assert weighted_f1(y_true, y_pred, 6) == pytest.approx(f1_score(y_true, y_pred, average="weighted"), abs=1e-12)
    np.testing.assert_allclose(
        per_class_f1(y_true, y_pred, 6), f1_score(y_true, y_pred, average=None, labels=range(6), zero_division=0), atol=1e-12
    )
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, 6), sk_confusion_matrix(y_true, y_pred, labels=range(6)))
    v_true, v_pred = rng.uniform(-5, 5, n), rng.uniform(-5, 5, n)
    assert valence_mse(v_true, v_pred) == pytest.approx(mean_squared_error(v_true, v_pred), rel=1e-12)


def test_weighted_f1_with_classes_missing_from_truth_matches_sklearn():
    # Class 5 only predicted (support 0 -> weight 0), class 4 absent from both.
    y_true = np.array([0, 0, 1, 2, 2, 3])
    y_pred = np.array([0, 5, 1, 2, 5, 3])
    assert weighted_f1(y_true, y_pred, 6) == pytest.approx(f1_score(y_true, y_pred, average="weighted"), abs=1e-12)


def test_mer_metrics_hand_computed_case():
    # F1: class 0 tp=1 fp=0 fn=1 -> 2/3; class 1 tp=2 fp=1 fn=0 -> 4/5; weighted by support 2, 2.
    y_true = np.array([0, 0, 1, 1])
    probs = np.eye(6)[[0, 1, 1, 1]]
    v_true, v_pred = np.array([1.0, 2.0, -1.0, 0.0]), np.array([2.0, 2.0, -1.0, 0.0])  # MSE = 1/4
    m = mer_metrics(y_true, probs, v_true, v_pred)
    assert m["metric_e"] == pytest.approx((2 * 2 / 3 + 2 * 4 / 5) / 4)
    assert m["metric_v"] == pytest.approx(0.25)
    assert m["metric"] == pytest.approx(m["metric_e"] - 0.25 * 0.25)
    assert m["accuracy"] == pytest.approx(0.75)
    assert combined_metric(0.8, 2.0) == pytest.approx(0.3)


def test_mer_metrics_skips_unknown_valence_rows():
    rng = np.random.default_rng(0)
    y, probs = rng.integers(0, 6, 50), rng.random((50, 6))
    v_true, v_pred = rng.uniform(-5, 5, 50), rng.uniform(-5, 5, 50)
    v_true[::3] = np.nan  # e.g. pseudo-labelled rows
    known = np.isfinite(v_true)
    assert mer_metrics(y, probs, v_true, v_pred)["metric_v"] == pytest.approx(mean_squared_error(v_true[known], v_pred[known]))
    no_valence = mer_metrics(y, probs, np.full(50, np.nan), v_pred)  # test3 has no valence
    assert math.isnan(no_valence["metric_v"]) and math.isnan(no_valence["metric"])
    assert no_valence["metric_e"] == pytest.approx(f1_score(y, probs.argmax(1), average="weighted"))


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 6]), np.array([0, 1]), 6)
    with pytest.raises(ValueError, match="one length"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 6)
    with pytest.raises(ValueError, match="shape"):
        valence_mse(np.zeros(3), np.zeros(4))


def test_confusion_matrix_png_is_written(tmp_path):
    import matplotlib.image

    rng = np.random.default_rng(0)
    cm = confusion_matrix(rng.integers(0, 6, 40), rng.integers(0, 6, 40), 6)
    path = plot_confusion_matrix(cm, ["neutral", "angry", "happy", "sad", "worried", "surprise"], tmp_path / "cm.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("seed", range(5))
def test_war_uar_f1s_and_recalls_match_sklearn_with_classes_absent_from_truth_or_predictions(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    classes = ["b", "a", "c", "never", "pred-only"]
    y_true = rng.choice(5, n, p=[0.5, 0.3, 0.2, 0.0, 0.0])  # "never" and "pred-only" have no true samples
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.choice(5, n, p=[0.3, 0.3, 0.2, 0.0, 0.2]))
    probs = np.eye(5)[y_pred] + 0.01 * rng.random((n, 5))  # argmax = y_pred
    m = classification_metrics(y_true, probs, classes)
    assert m["war"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        uar = balanced_accuracy_score(y_true, y_pred)
    assert m["uar"] == pytest.approx(uar, abs=1e-12)
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    present = recall_score(y_true, y_pred, labels=[0, 1, 2], average=None)
    assert [m[f"recall/{c}"] for c in classes[:3]] == pytest.approx(present, abs=1e-12)
    assert math.isnan(m["recall/never"]) and math.isnan(m["recall/pred-only"])  # no truth: n/a, not 0


def test_concordance_hand_computed_and_regression_metrics_skip_unknown_rows():
    # t = 1, 2, 3; p = 2, 2, 4: cov 2/3, var_t 2/3, var_p 8/9, (mean_t - mean_p)^2 4/9 -> CCC = (4/3) / 2 = 2/3
    assert concordance_cc([1, 2, 3], [2, 2, 4]) == pytest.approx(2 / 3)
    assert concordance_cc([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    truth = np.array([[1.0, 0.5], [2.0, np.nan], [3.0, -0.5], [np.nan, 0.0]])
    pred = np.array([[2.0, 0.0], [2.0, 9.0], [4.0, 0.0], [7.0, 1.0]])
    m = regression_metrics(truth, pred, ["valence", "arousal"])
    assert m["ccc/valence"] == pytest.approx(2 / 3) and m["mse/valence"] == pytest.approx(2 / 3)
    assert m["mse/arousal"] == pytest.approx(mean_squared_error([0.5, -0.5, 0.0], [0.0, 0.0, 1.0]))
    none = regression_metrics(np.full((2, 1), np.nan), np.zeros((2, 1)), ["valence"])
    assert math.isnan(none["mse/valence"]) and math.isnan(none["ccc/valence"])


def test_scorer_selects_by_the_chosen_metric_in_the_right_direction():
    mer = Scorer(["x", "y"], ["valence"], mer=True)
    assert mer.metric == "metric" and mer.headline()[:3] == ["metric", "metric_e", "metric_v"]
    assert mer.score({"metric": float("nan"), "metric_e": 0.4}) == 0.4  # no valence truth: metric_e
    generic = Scorer(["x", "y"], ["arousal"])
    assert generic.metric == "uar" and {"war", "uar", "macro_f1", "mse/arousal", "ccc/arousal"} <= set(generic.names())
    assert "metric" not in generic.names()
    lower = Scorer(["x", "y"], ["arousal"], metric="mse/arousal")
    assert lower.score({"mse/arousal": 0.5}) > lower.score({"mse/arousal": 2.0})
    assert lower.score({"mse/arousal": float("nan")}) == -math.inf
