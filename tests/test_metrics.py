"""MER2023 metrics against scikit-learn (the oracle) and a hand-computed case."""
import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score, mean_squared_error

from expmae.finetune.metrics import (
    combined_metric,
    confusion_matrix,
    mer_metrics,
    per_class_f1,
    plot_confusion_matrix,
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
