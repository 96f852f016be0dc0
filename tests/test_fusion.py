"""Fusion heads: shapes, the MFB computation against a hand-written einsum, the loss, and the synthetic
multimodal task where the label depends on two modalities jointly."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from expmae.finetune.training import fit_head, predict
from expmae.finetune.featureset import FeatureSet
from expmae.finetune.heads import FactorizedBilinearPooling, create_head, task_loss
from expmae.finetune.metrics import weighted_f1

DIMS = {"audio": 5, "text": 7, "visual": 3}


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny heads, one thread


def batch(n=4, dims=DIMS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, d, generator=g) for k, d in dims.items()}


@pytest.mark.parametrize("name", ["attention", "attentive", "mfb", "concat", "transformer"])
@pytest.mark.parametrize("branches", [["visual"], ["audio", "visual"], ["audio", "text", "visual"]])
def test_heads_take_any_branches_and_return_both_tasks(name, branches):
    dims = {b: DIMS[b] for b in branches}
    head = create_head(name, dims, hidden_dim=16, factor_k=3)
    out = head(batch(dims=dims))
    assert out["logits"].shape == (4, 6) and out["regression"].shape == (4, 1) and out["embedding"].shape == (4, 16)
    if name == "attention":
        assert out["attention"].shape == (4, len(branches))
    loss, parts = task_loss(out, torch.tensor([0, 1, 2, 5]), torch.tensor([[0.5], [-1.0], [2.0], [4.0]]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters() if p.requires_grad)


def test_heads_reject_wrong_inputs():
    head = create_head("attention", {"audio": 5, "visual": 3})
    with pytest.raises(KeyError, match="missing input branch 'visual'"):
        head({"audio": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match=r"branch 'audio': got shape \(2, 4\), expected \(B, 5\)"):
        head({"audio": torch.zeros(2, 4), "visual": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="unknown head 'lstm'"):
        create_head("lstm", {"audio": 5})


def test_mfb_matches_the_factorized_bilinear_formula():
    torch.manual_seed(0)
    k, o = 3, 4
    head = FactorizedBilinearPooling({"a": 5, "b": 6}, factor_k=k, out_dim=o, dropout=0.0).eval()
    x = batch(n=8, dims={"a": 5, "b": 6})
    # z_j = sum_i (U x + u)_{j,i} * (V y + v)_{j,i}; signed sqrt, L2 normalisation (Yu et al. 2017), times sqrt(o).
    U, u = head.projections[0].weight.view(o, k, 5), head.projections[0].bias.view(o, k)
    V, v = head.projections[1].weight.view(o, k, 6), head.projections[1].bias.view(o, k)
    px = torch.einsum("jid,nd->nji", U, x["a"]) + u
    py = torch.einsum("jid,nd->nji", V, x["b"]) + v
    z = (px * py).sum(2)
    z = torch.sign(z) * torch.sqrt(z.abs())
    z = z / z.norm(dim=1, keepdim=True) * o**0.5
    torch.testing.assert_close(head(x)["embedding"], z, atol=1e-5, rtol=1e-4)
    # the power normalisation keeps gradients finite where the pooled value is exactly zero
    zero = {"a": torch.zeros(2, 5), "b": torch.zeros(2, 6)}
    with torch.no_grad():
        head.projections[1].bias.zero_()
    out = head(zero)
    (out["logits"].sum() + out["regression"].sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_attention_fuses_by_the_returned_weights():
    torch.manual_seed(0)
    head = create_head("attention", DIMS, hidden_dim=8, dropout=0.0).eval()
    x = batch()
    out = head(x)
    hidden = [enc(std(x[b])) for b, enc, std in zip(DIMS, head.encoders, head.standardize.values())]
    fused = sum(out["attention"][:, i:i + 1] * h for i, h in enumerate(hidden))
    torch.testing.assert_close(out["embedding"], fused)


@pytest.mark.parametrize("name", ["attention", "attentive", "mfb", "concat", "transformer"])
def test_input_standardisation_makes_heads_invariant_to_feature_scale(name):
    torch.manual_seed(0)
    head = create_head(name, DIMS, hidden_dim=8, dropout=0.0).eval()
    x = batch(n=6)
    scale = {k: torch.rand(d) * 10 + 0.1 for k, d in DIMS.items()}
    shift = {k: torch.randn(d) * 5 for k, d in DIMS.items()}
    ref = head(x)["logits"]
    head.set_input_stats({k: (shift[k], scale[k]) for k in DIMS})
    moved = head({k: x[k] * scale[k] + shift[k] for k in DIMS})["logits"]
    torch.testing.assert_close(moved, ref, atol=1e-4, rtol=1e-4)
    assert "standardize.audio.mean" in head.state_dict()  # travels with a saved head
    head.set_input_stats({"audio": (torch.zeros(5), torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0]))})
    assert head.standardize["audio"].std.tolist() == [1.0, 1.0, 2.0, 1.0, 3.0]  # constant dims: centred, not scaled


def test_transformer_head_is_a_class_token_over_one_token_per_branch():
    torch.manual_seed(0)
    head = create_head("transformer", DIMS, hidden_dim=16, dropout=0.0, num_layers=2, num_classes=3, num_targets=2).eval()
    assert len(head.blocks.layers) == 2 and head.branch_embed.shape == (1, 3, 16)
    x = batch()
    out = head(x)
    assert out["logits"].shape == (4, 3) and out["regression"].shape == (4, 2)
    # by hand: tokens = per-branch linear + branch embedding, class token first, torch's encoder, its class token
    tokens = torch.stack([tok(std(x[b])) for b, tok, std in zip(DIMS, head.tokenizers, head.standardize.values())], 1)
    seq = torch.cat([head.cls_token.expand(4, -1, -1), tokens + head.branch_embed], 1)
    torch.testing.assert_close(out["embedding"], head.blocks(seq)[:, 0])
    # each sample is its own sequence: one sample's output does not depend on the others in the batch
    torch.testing.assert_close(head({k: v[:1] for k, v in x.items()})["logits"], out["logits"][:1])
    with pytest.raises(ValueError, match="multiple of its 4 attention heads"):
        create_head("transformer", DIMS, hidden_dim=10)


def test_attentive_head_is_a_query_over_every_token_of_every_branch():
    """Vectors are one token each, token branches (B, N, D) many; by hand: per-branch linear + branch embedding,
    all tokens concatenated, the attentive pooler's one query. Only this head takes tokens."""
    torch.manual_seed(0)
    head = create_head("attentive", DIMS, hidden_dim=16, dropout=0.0, num_classes=3, num_targets=2).eval()
    x = batch()
    x["visual"] = torch.randn(4, 9, 3)  # 9 tokens of the visual branch
    out = head(x)
    assert out["logits"].shape == (4, 3) and out["regression"].shape == (4, 2) and out["embedding"].shape == (4, 16)
    parts = []
    for i, (b, tok, std) in enumerate(zip(DIMS, head.tokenizers, head.standardize.values())):
        t = std(x[b]) if x[b].ndim == 3 else std(x[b])[:, None]
        parts.append(tok(t) + head.branch_embed[:, i])
    torch.testing.assert_close(out["embedding"], head.pooler(torch.cat(parts, 1))[:, 0])
    assert torch.cat(parts, 1).shape == (4, 1 + 1 + 9, 16)
    # a vector branch is the same as that vector as a single token
    same = head({**x, "audio": x["audio"][:, None]})
    torch.testing.assert_close(same["logits"], out["logits"])
    # each sample is its own sequence
    torch.testing.assert_close(head({k: v[:1] for k, v in x.items()})["logits"], out["logits"][:1])
    with pytest.raises(ValueError, match=r"expected \(B, 5\) or \(B, N, 5\)"):
        head({**x, "audio": torch.zeros(4, 2, 6)})
    with pytest.raises(ValueError, match=r"expected \(B, 3\)$"):  # the others take one vector per branch
        create_head("concat", DIMS)({**batch(), "visual": torch.zeros(4, 9, 3)})


def test_attentive_head_reads_frame_level_feature_files_where_the_mean_cannot(tmp_path):
    """Feature mode: frame-level files (K_i, D) of varying length, one flagged key frame carrying the class among
    loud label-free frames. The attentive head gets them as tokens (NaN padding masked) and learns the class;
    the attention head (frames mean-pooled, as before) stays near chance. Padding changes no prediction."""
    from conftest import key_token_set

    from expmae.finetune.featureset import load_features

    rng = np.random.default_rng(0)
    x, y = key_token_set(360, rng, tokens=12, dim=8)
    folder, names = tmp_path / "frames", [f"v{i:03d}" for i in range(360)]
    folder.mkdir()
    for i, name in enumerate(names):
        keep = np.sort(np.r_[np.flatnonzero(x[i, :, -1] > 0), rng.permutation(12)[: rng.integers(4, 12)]])
        np.save(folder / f"{name}.npy", x[i, np.unique(keep)])  # 5..12 frames, the key among them
    scores = {}
    for name in ("attentive", "attention"):
        data = load_features({"v": [folder]}, names, progress=False, tokens=name == "attentive")
        train, test = data.subset(range(240)), data.subset(range(240, 360))
        torch.manual_seed(0)
        head = create_head(name, data.dims, hidden_dim=32, dropout=0.0, num_classes=4, num_targets=0)
        fit_head(head, train, y[:240], np.zeros((240, 0)), epochs=40, batch_size=32, lr=3e-3, seed=0)
        probs, _ = predict(head, test)
        scores[name] = (probs.argmax(1) == y[240:]).mean()
        if name == "attentive":
            alone = [head({"v": torch.from_numpy(np.load(folder / f"{n}.npy"))[None]})["logits"] for n in names[240:250]]
            padded = head({"v": torch.from_numpy(test.arrays["v"][:10])})["logits"]
            torch.testing.assert_close(torch.cat(alone), padded, atol=1e-5, rtol=1e-5)
    assert scores["attentive"] > 0.85 and scores["attention"] < 0.45, scores


def test_svm_head_predicts_one_hot_classes_and_no_regression():
    from sklearn.svm import SVC

    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(30, 4)).astype(np.float32), "b": rng.normal(size=(30, 2)).astype(np.float32)}
    label = (arrays["a"][:, 0] > 0).astype(np.int64) + 2 * (arrays["b"][:, 1] > 0)
    head = create_head("svm", {"a": 4, "b": 2}, svm_c=3.0, num_classes=5, num_targets=1).fit(arrays, label)
    probs, regression = head.predict(arrays)
    assert probs.shape == (30, 5) and set(probs.sum(1)) == {1.0} and np.isnan(regression).all()
    svc = head.pipeline[-1]
    assert isinstance(svc, SVC) and svc.C == 3.0
    np.testing.assert_array_equal(probs.argmax(1), head.pipeline.predict(np.concatenate([arrays["a"], arrays["b"]], 1)))


def test_task_loss_is_ce_plus_lambda_mse_over_known_valence():
    logits, pred_v = torch.randn(5, 6), torch.randn(5, 1)
    emotion = torch.tensor([0, 3, 4, 5, 1])
    valence = torch.tensor([[1.0], [float("nan")], [-2.0], [float("nan")], [0.5]])  # NaN: pseudo-labelled rows
    loss, parts = task_loss({"logits": logits, "regression": pred_v}, emotion, valence, target_weight=0.3)
    known = torch.tensor([0, 2, 4])
    expected_mse = ((pred_v[known] - valence[known]) ** 2).mean()
    assert loss.item() == pytest.approx((F.cross_entropy(logits, emotion) + 0.3 * expected_mse).item(), rel=1e-6)
    assert parts["loss_regression"] == pytest.approx(expected_mse.item(), rel=1e-6)
    only_pseudo, _ = task_loss({"logits": logits, "regression": pred_v}, emotion, torch.full((5, 1), float("nan")))
    assert only_pseudo.item() == pytest.approx(F.cross_entropy(logits, emotion).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------------
# Synthetic multimodal task. Three latent factors: u in {0,1,2} and w in {0,1} are visible in modality
# "a", v in {0,1,2} in modality "b"; "c" is pure noise. label = 3w + (u + v) mod 3, so "a" alone can reach
# at best 1/3 accuracy (it knows w and u, but (u + v) mod 3 is uniform given u), "b" alone is at chance,
# and only a model combining a and b can be right. Train and held-out sets are independent draws.

DIM = 8


def joint_task(n, seed, geometry_seed=0):
    rng, geometry = np.random.default_rng(seed), np.random.default_rng(geometry_seed)
    means_a, means_b = geometry.normal(size=(6, DIM)), geometry.normal(size=(3, DIM))
    u, w, v = rng.integers(0, 3, n), rng.integers(0, 2, n), rng.integers(0, 3, n)
    label = 3 * w + (u + v) % 3
    arrays = {
        "a": means_a[3 * w + u] + 0.5 * rng.normal(size=(n, DIM)),
        "b": means_b[v] + 0.5 * rng.normal(size=(n, DIM)),
        "c": rng.normal(size=(n, DIM)),
    }
    valence = np.linspace(-4, 4, 6)[label] + 0.3 * rng.normal(size=n)
    features = FeatureSet([f"{seed}_{i}" for i in range(n)], {k: x.astype(np.float32) for k, x in arrays.items()})
    return features, label, valence.astype(np.float32)


def held_out_f1(name, branches, train, test):
    torch.manual_seed(0)
    pick = lambda fs: FeatureSet(fs.names, {b: fs.arrays[b] for b in branches})  # noqa: E731
    head = create_head(name, {b: DIM for b in branches}, hidden_dim=64, dropout=0.1)
    fit_head(head, pick(train[0]), train[1], train[2], epochs=25, batch_size=32, lr=1e-3, seed=0)
    probs, _ = predict(head, pick(test[0]))
    return weighted_f1(test[1], probs.argmax(1), 6)


@pytest.mark.parametrize("name", ["attention", "mfb"])  # transformer passes too, in 35 s: left out for speed
def test_fusion_beats_every_unimodal_model_on_a_joint_label(name):
    train, test = joint_task(800, seed=1), joint_task(600, seed=2)
    unimodal = {b: held_out_f1(name, [b], train, test) for b in ("a", "b", "c")}
    fused = held_out_f1(name, ["a", "b", "c"], train, test)
    assert max(unimodal.values()) < 0.45, unimodal  # sanity: the task really needs both modalities
    assert fused > max(unimodal.values()) + 0.15, (fused, unimodal)
