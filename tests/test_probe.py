"""Probes: the linear probe (sklearn's logistic regression on standardised features), DINO's weighted kNN (against
sklearn's KNeighborsClassifier), the Wilson interval (against scipy), scored on held-out samples."""
import numpy as np
import pytest

from conftest import key_token_set

from expmae.probe import (accuracy_interval, attentive_probe, knn_predict, knn_probe, linear_probe, probe_readouts,
                           read_features)


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


# ---------------------------------------------------------------------------------- kNN
@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (20, 0.02), (200, 1.0)])
def test_knn_equals_sklearn_cosine_distance_weighted(k, temperature):
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(k)
    centres = rng.normal(size=(4, 16))
    y = rng.integers(0, 4, 500)
    x = centres[y] * 0.4 + rng.normal(size=(500, 16))  # overlapping classes: the weighting decides many rows
    labels = np.array(["neutral", "happy", "sad", "angry"])[y]  # string labels, as the CSVs have them
    clf = KNeighborsClassifier(n_neighbors=min(k, 300), metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / temperature)).fit(x[:300], labels[:300])
    expected = clf.predict(x[300:])
    np.testing.assert_array_equal(knn_predict(x[:300], labels[:300], x[300:], k=k, temperature=temperature, chunk=64),
                                  expected)
    ours = knn_probe(x[:300], labels[:300], x[300:], labels[300:], k=k, temperature=temperature)
    assert ours["accuracy"] == pytest.approx((expected == labels[300:]).mean(), abs=1e-12)
    assert 0.3 < ours["accuracy"] < 0.99 and ours["num_train"] == 300 and ours["num_test"] == 200
    if k > 1:  # the weighting matters: plain majority votes predict other labels on some rows
        plain = KNeighborsClassifier(n_neighbors=min(k, 300), metric="cosine", algorithm="brute")
        assert (plain.fit(x[:300], labels[:300]).predict(x[300:]) != expected).any()
    f32 = knn_probe(x[:300].astype(np.float32), labels[:300], x[300:].astype(np.float32), labels[300:], k=k,
                    temperature=temperature)
    assert abs(f32["accuracy"] - ours["accuracy"]) <= 0.01  # float32 path: at most a near-tie apart


@pytest.mark.filterwarnings("ignore:.*(single label|not in y_true)")  # one test sample: balanced accuracy warns
def test_knn_weights_votes_by_similarity_hand_computed():
    """Three neighbours: two of class "b" at similarity 0 and one of class "a" at similarity 1. Unweighted, "b"
    wins two to one; with temperature 0.5 the weights are e^2 = 7.4 against 2 x e^0 = 2, so "a" wins; with
    temperature 10, e^0.1 = 1.1 against 2: "b" wins."""
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    labels = ["a", "b", "b"]
    test = np.array([[2.0, 0.0]])  # the length does not matter: cosine
    assert knn_probe(train, labels, test, ["a"], k=3, temperature=0.5)["accuracy"] == 1.0
    assert knn_probe(train, labels, test, ["a"], k=3, temperature=10.0)["accuracy"] == 0.0
    assert knn_probe(train, labels, test, ["a"], k=50, temperature=0.5)["num_train"] == 3  # k capped at N
    # ties: equal votes go to the label that sorts first ("a" before "b")
    tie = knn_probe(np.array([[1.0, 1.0], [1.0, -1.0]]), ["b", "a"], np.array([[1.0, 0.0]]), ["a"], k=2)
    assert tie["accuracy"] == 1.0
    # equally similar neighbours beyond k: the lower training index is taken (here "b", though "a" sorts first)
    dup = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    assert list(knn_predict(dup, ["c", "b", "a", "a"], np.array([[1.0, 0.0], [0.0, 5.0]]), k=1)) == ["b", "c"]
    with pytest.raises(ValueError, match="temperature=0"):
        knn_probe(train, labels, test, ["a"], temperature=0)


def test_wilson_interval_equals_scipy():
    from scipy.stats import binomtest

    for successes, n in [(8, 10), (0, 20), (20, 20), (431, 500), (1, 3)]:
        expected = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = accuracy_interval(successes / n, n)
        assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-9)
    low, high = accuracy_interval(0.8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # the textbook case
    assert accuracy_interval(0.9, 1000, level=0.99)[1] - accuracy_interval(0.9, 1000, level=0.99)[0] < 0.05
    result = linear_probe(np.eye(4), [0, 1, 0, 1], np.eye(4), [0, 1, 0, 1])
    assert result["ci95"] == list(accuracy_interval(result["accuracy"], 4))


# ---------------------------------------------------------------------------------- attentive probe
def test_attentive_probe_finds_the_key_token_where_the_mean_pool_cannot(single_thread):
    import torch

    rng = np.random.default_rng(1)
    (x, y), (x_test, y_test) = key_token_set(200, rng, tokens=16), key_token_set(200, rng, tokens=16)
    state = torch.random.get_rng_state()
    attentive = attentive_probe(x, y, x_test, y_test, epochs=40, lr=2e-3)  # 280 steps: seconds on one core
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert attentive["accuracy"] >= 0.9 and attentive["num_train"] == 200 and len(attentive["ci95"]) == 2
    assert linear_probe(x.mean(1), y, x_test.mean(1), y_test)["accuracy"] < 0.4  # chance is 0.25
    assert knn_probe(x.mean(1), y, x_test.mean(1), y_test)["accuracy"] < 0.4
    again = attentive_probe(x, y, x_test, y_test, epochs=5)
    assert again == attentive_probe(x, y, x_test, y_test, epochs=5)  # deterministic for one seed
    with pytest.raises(ValueError, match=r"expected \(N, K, D\)"):
        attentive_probe(x.mean(1), y, x_test.mean(1), y_test)


def test_attentive_pooler_forward_equals_multihead_attention_and_a_hand_softmax():
    import torch

    from expmae.probe import AttentivePooler

    torch.manual_seed(0)
    x = torch.randn(3, 7, 8)
    # two heads with the MLP: query + MHA(query, norm1(x), norm1(x)) + MLP(norm2(.)), torch's MHA as the oracle
    pooler = AttentivePooler(8, num_queries=2, num_heads=2).eval()
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pooler.xattn.q.weight, pooler.xattn.kv.weight]))  # rows: q, k, v
        mha.in_proj_bias.copy_(torch.cat([pooler.xattn.q.bias, pooler.xattn.kv.bias]))
        mha.out_proj.load_state_dict(pooler.xattn.proj.state_dict())
        q = pooler.query_tokens.expand(3, -1, -1)
        keys = pooler.norm1(x)
        q = q + mha(q, keys, keys, need_weights=False)[0]
        expected = q + pooler.mlp(pooler.norm2(q))
        got = pooler(x)
    assert got.shape == (3, 2, 8)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # one head, no MLP, by hand: softmax(q k^T / sqrt(D)) v, projected, added to the query
    single = AttentivePooler(8, num_queries=1, num_heads=1, mlp_ratio=0).eval()
    att = single.xattn
    with torch.no_grad():
        query = single.query_tokens[0, 0]  # (D,)
        tokens = torch.nn.functional.layer_norm(x, (8,), single.norm1.weight, single.norm1.bias, eps=1e-6)
        k, v = tokens @ att.kv.weight[:8].T + att.kv.bias[:8], tokens @ att.kv.weight[8:].T + att.kv.bias[8:]
        qv = att.q.weight @ query + att.q.bias
        weights = torch.softmax(k @ qv / 8 ** 0.5, dim=1)  # (B, N): one distribution over the tokens per sample
        by_hand = query + (weights[:, :, None] * v).sum(1) @ att.proj.weight.T + att.proj.bias
        torch.testing.assert_close(single(x)[:, 0], by_hand, atol=1e-6, rtol=1e-5)


def test_attentive_classifier_leaves_nan_padding_out(single_thread):
    import torch

    from expmae.probe import AttentiveClassifier, stack_tokens

    rng = np.random.default_rng(3)
    samples = [rng.normal(size=(k, 8)).astype(np.float32) for k in (5, 2, 7)]
    stacked = stack_tokens(samples)
    assert stacked.shape == (3, 7, 8) and np.isnan(stacked[1, 2:]).all() and not np.isnan(stacked[2]).any()
    torch.manual_seed(0)
    model = AttentiveClassifier(8, 3, num_queries=2, num_heads=2).eval()
    with torch.no_grad():
        alone = torch.cat([model(torch.from_numpy(s)[None]) for s in samples])
        torch.testing.assert_close(model(torch.from_numpy(stacked)), alone, atol=1e-6, rtol=1e-5)
    result = attentive_probe(stacked, [0, 1, 2], stacked, [0, 1, 2], epochs=2)  # ragged sets train too
    assert 0 <= result["accuracy"] <= 1 and result["num_test"] == 3


def test_probe_readouts_scores_every_key_with_the_probes_that_apply(single_thread):
    rng = np.random.default_rng(2)
    (tok, y), (tok_test, y_test) = key_token_set(120, rng), key_token_set(60, rng)
    train = {"L0/mean": tok.mean(1), "L0/position": tok.reshape(120, -1), "L0/tokens": tok}
    test = {"L0/mean": tok_test.mean(1), "L0/position": tok_test.reshape(60, -1), "L0/tokens": tok_test}
    out = probe_readouts(train, y, test, y_test, knn_k=5, attentive={"epochs": 3})
    assert {k: sorted(v) for k, v in out.items()} == {"L0/mean": ["knn", "linear"], "L0/position": ["knn", "linear"],
                                                      "L0/tokens": ["attentive"]}
    assert out["L0/mean"]["knn"] == knn_probe(train["L0/mean"], y, test["L0/mean"], y_test, k=5)
    assert out["L0/position"]["linear"] == linear_probe(train["L0/position"], y, test["L0/position"], y_test)
    assert out["L0/tokens"]["attentive"] == attentive_probe(tok, y, tok_test, y_test, epochs=3)
    assert list(probe_readouts(train, y, test, y_test, probes=("knn",))) == ["L0/mean", "L0/position"]
    with pytest.raises(ValueError, match="'L0/tokens' is in one of train / test only"):
        probe_readouts(train, y, {k: v for k, v in test.items() if k != "L0/tokens"}, y_test)
    with pytest.raises(ValueError, match="unknown 'svm'"):
        probe_readouts(train, y, test, y_test, probes=("svm",))
