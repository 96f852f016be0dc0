"""Linear probe: sklearn's logistic regression on standardised features, scored on held-out samples."""
import numpy as np
import pytest

from expmae.probe import linear_probe, read_features


def test_probe_separates_a_linear_signal_and_not_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 40)
    signal = np.eye(3)[np.searchsorted(["a", "b", "c"], y)] * 3 + rng.normal(size=(120, 3))
    x = np.concatenate([signal, rng.normal(size=(120, 20)) * 10], 1)  # large-scale nuisance dims: standardised away
    order = rng.permutation(120)
    tr, te = order[:80], order[80:]
    good = linear_probe(x[tr], y[tr], x[te], y[te])
    assert good["accuracy"] > 0.85 and good["num_train"] == 80 and good["num_test"] == 40
    noise = linear_probe(x[tr, 3:], y[tr], x[te, 3:], y[te])
    assert noise["accuracy"] < 0.6


def test_probe_equals_sklearn_on_the_same_split():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 2, 60)
    x[:, 0] += y
    scaler = StandardScaler().fit(x[:40])
    clf = LogisticRegression(C=0.1, max_iter=5000).fit(scaler.transform(x[:40]), y[:40])
    pred = clf.predict(scaler.transform(x[40:]))
    ours = linear_probe(x[:40], y[:40], x[40:], y[40:])
    assert ours["accuracy"] == pytest.approx((pred == y[40:]).mean())
    assert ours["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y[40:], pred))


def test_read_features_pools_clip_axes_and_names_a_missing_file(tmp_path):
    np.save(tmp_path / "a.npy", np.array([[1.0, 2.0], [3.0, 4.0]]))
    np.save(tmp_path / "b.npy", np.array([5.0, 6.0]))
    np.testing.assert_array_equal(read_features(tmp_path, ["a", "b"]), [[2.0, 3.0], [5.0, 6.0]])
    with pytest.raises(FileNotFoundError, match="c.npy"):
        read_features(tmp_path, ["c"])
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe(np.zeros((3, 2)), [0, 1], np.zeros((1, 2)), [0])
