"""Probes of frozen features: how much of a label a fixed encoder's features carry, and in what form.

:func:`linear_probe` (MAE's linear probing: standardised features, multinomial logistic regression via sklearn),
:func:`knn_probe` (DINO's weighted kNN on cosine similarity: no fitting, cheap enough for online evaluation),
:func:`attentive_probe` (V-JEPA's attentive pooler) and :func:`probe_readouts` (every depth and read-out at once).
Every result holds WAR, UAR, sample counts and a 95% Wilson interval (``ci95``). docs/guides/benchmarks.md.
"""
from __future__ import annotations

import os
from pathlib import Path
from statistics import NormalDist
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from expmae.vit import AttentivePooler

PROBES = ("knn", "linear", "attentive")

def read_features(folder: str | os.PathLike, names: Sequence[str]) -> np.ndarray:
    """``folder/<name>.npy`` for every name (as expmae-features writes them), mean over any leading clip axis:
    (len(names), D). A missing file is a one-line error naming it."""
    folder = Path(folder)
    rows = []
    for name in names:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no features for {name!r} (extract them with expmae-features first)")
        x = np.load(path)
        rows.append(x.reshape(-1, x.shape[-1]).mean(0) if x.ndim > 1 else x)
    return np.stack(rows).astype(np.float64)


def linear_probe(train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, test_y: Sequence, *,
                 C: float = 0.1, seed: int = 0) -> dict:
    """Fit on (train_x, train_y), score on (test_x, test_y): see :func:`score`."""
    check_lengths(train_x, train_y, test_x, test_y)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, random_state=seed))
    clf.fit(train_x, np.asarray(train_y))
    return score(test_y, clf.predict(test_x), num_train=len(train_x))


def score(test_y: Sequence, pred: Sequence, *, num_train: int) -> dict:
    """A probe's result: accuracy (WAR), balanced accuracy (UAR), sample counts, 95% Wilson interval (ci95)."""
    test_y, pred = np.asarray(test_y), np.asarray(pred)
    accuracy = float(accuracy_score(test_y, pred))
    return {"accuracy": accuracy, "balanced_accuracy": float(balanced_accuracy_score(test_y, pred)),
            "num_train": int(num_train), "num_test": int(len(test_y)),
            "ci95": list(accuracy_interval(accuracy, len(test_y)))}


def accuracy_interval(accuracy: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of an accuracy measured on n samples: (low, high). Unlike the normal approximation it
    stays inside [0, 1] and is not empty at an accuracy of 0 or 1."""
    if n < 1 or not 0 <= accuracy <= 1 or not 0 < level < 1:
        raise ValueError(f"accuracy={accuracy}, n={n}, level={level}: expected 0 <= accuracy <= 1, n >= 1, "
                         "0 < level < 1")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    denom = 1 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / denom
    half = z / denom * np.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def knn_probe(train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, test_y: Sequence, *, k: int = 20,
              temperature: float = 0.07, chunk: int = 1024) -> dict:
    """DINO's weighted kNN (:func:`knn_predict`), scored on (test_x, test_y): see :func:`score`."""
    check_lengths(train_x, train_y, test_x, test_y)
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, chunk=chunk)
    return score(test_y, pred, num_train=len(train_x))


def knn_predict(train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, *, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """DINO's weighted kNN: L2-normalise, cosine similarity, the k most similar training samples (k capped at the
    training set's size) each vote for their label with weight exp(similarity / temperature); the heaviest label
    wins. Ties: between equally similar neighbours the lower training index is taken, between equal votes the
    label that sorts first (as sklearn's KNeighborsClassifier). float64 inputs are computed in float64, anything
    else in float32; test rows go ``chunk`` at a time, so memory stays chunk x len(train). Returns the labels."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k={k}, temperature={temperature}: expected k >= 1 and temperature > 0")
    classes, train_labels = np.unique(np.asarray(train_y), return_inverse=True)
    dtype = torch.float64 if np.asarray(train_x).dtype == np.float64 else torch.float32
    train = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train_x), dtype=dtype), dim=1)
    test = torch.nn.functional.normalize(torch.as_tensor(np.asarray(test_x), dtype=dtype), dim=1)
    labels, k = torch.as_tensor(train_labels), min(k, len(train))
    pred = []
    for start in range(0, len(test), chunk):
        sim = test[start : start + chunk] @ train.T  # (B, N_train) cosine similarities
        weights = torch.where(top_k_mask(sim, k), (sim / temperature).exp(), 0)  # (B, N_train), k non-zero a row
        votes = torch.zeros(len(sim), len(classes), dtype=dtype).scatter_add_(1, labels.expand_as(sim), weights)
        pred.append(votes.argmax(dim=1))  # (B,), ties: the first maximum, the label that sorts first
    return classes[torch.cat(pred).numpy()]


def top_k_mask(sim, k: int):
    """(B, N) -> bool (B, N): each row's k largest entries; among entries equal to the k-th largest, the first ones
    (lowest index), so the choice is deterministic, unlike torch.topk's among ties."""
    kth = torch.topk(sim, k, dim=1).values[:, -1:]  # (B, 1)
    above, at = sim > kth, sim == kth
    room = k - above.sum(dim=1, keepdim=True)  # (B, 1) places left for the entries tied with the k-th
    tied = (at.sum(dim=1, keepdim=True) > room).squeeze(1)  # (B,) rows with more ties than places: rare, slow path
    if tied.any():
        at[tied] &= torch.cumsum(at[tied], dim=1) <= room[tied]
    return above | at


def check_lengths(train_x, train_y, test_x, test_y) -> None:
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"features and labels differ in length: train {len(train_x)} vs {len(train_y)}, "
                         f"test {len(test_x)} vs {len(test_y)}")
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError(f"{len(train_x)} training and {len(test_x)} test samples: expected at least one of each")


# ----------------------------------------------------------------------------------------------- attentive probe
class AttentiveClassifier(nn.Module):
    """V-JEPA's attentive probe: :class:`AttentivePooler` over the tokens (B, N, D), then a linear classifier on
    its queries (concatenated when there are several): logits (B, num_classes)."""

    def __init__(self, dim: int, num_classes: int, *, num_queries: int = 1, num_heads: int = 1,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.pooler = AttentivePooler(dim, num_queries=num_queries, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.linear = nn.Linear(num_queries * dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D); rows of NaN are padding (:func:`stack_tokens`), left out of the attention."""
        valid = ~torch.isnan(tokens).any(dim=2)  # (B, N)
        pooled = self.pooler(tokens.nan_to_num(0.0), None if valid.all() else valid)  # (B, Q, D)
        return self.linear(pooled.flatten(1))  # (B, Q*D) -> (B, C)


def stack_tokens(samples: Sequence[np.ndarray]) -> np.ndarray:
    """Token sequences (K_i, D) of several samples -> float32 (N, max K_i, D), each padded with rows of NaN, which
    the attentive probe leaves out."""
    out = np.full((len(samples), max(len(s) for s in samples), samples[0].shape[-1]), np.nan, dtype=np.float32)
    for i, s in enumerate(samples):
        out[i, : len(s)] = s
    return out


def default_num_heads(dim: int) -> int:
    """64-dimensional heads as in a ViT; a single head for narrower features."""
    return dim // 64 if dim >= 64 and dim % 64 == 0 else 1


def attentive_probe(train_tokens: np.ndarray, train_y: Sequence, test_tokens: np.ndarray, test_y: Sequence, *,
                    num_queries: int = 1, num_heads: int | None = None, mlp_ratio: float = 4.0, epochs: int = 100,
                    lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 32, seed: int = 0) -> dict:
    """Train :class:`AttentiveClassifier` on frozen tokens (N, K, D) with AdamW (cosine lr decay, cross-entropy)
    and score it on (test_tokens, test_y): see :func:`score`. Tokens are standardised per dimension with the
    training tokens' statistics first (as the linear probe's features). Deterministic for a given ``seed``;
    the global torch RNG is left as it was. ``num_heads`` None: :func:`default_num_heads`. Samples with fewer
    tokens: pad with rows of NaN (:func:`stack_tokens`)."""
    check_lengths(train_tokens, train_y, test_tokens, test_y)
    train_tokens, test_tokens = np.asarray(train_tokens, np.float32), np.asarray(test_tokens, np.float32)
    if train_tokens.ndim != 3 or test_tokens.ndim != 3 or train_tokens.shape[2] != test_tokens.shape[2]:
        raise ValueError(f"tokens of shapes {train_tokens.shape} and {test_tokens.shape}: expected (N, K, D) both, "
                         "one D")
    classes, labels = np.unique(np.asarray(train_y), return_inverse=True)
    dim = train_tokens.shape[2]
    mean, std = np.nanmean(train_tokens, axis=(0, 1)), np.nanstd(train_tokens, axis=(0, 1))  # padding left out
    std = np.where(std > 1e-6, std, 1.0)  # a constant dimension is centred, not blown up
    x_train = torch.from_numpy((train_tokens - mean) / std)
    x_test = torch.from_numpy((test_tokens - mean) / std)
    y = torch.from_numpy(labels.astype(np.int64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttentiveClassifier(dim, len(classes), num_queries=num_queries,
                                    num_heads=num_heads or default_num_heads(dim), mlp_ratio=mlp_ratio)
        train_classifier(model, x_train, y, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                         seed=seed)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x_test[i : i + batch_size]).argmax(1) for i in range(0, len(x_test), batch_size)])
    return score(test_y, classes[pred.numpy()], num_train=len(train_tokens))


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
                     weight_decay: float, batch_size: int, seed: int) -> None:
    """Cross-entropy, AdamW, lr cosine-decayed to 0 over all steps; batches reshuffled every epoch."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs={epochs}, batch_size={batch_size}, lr={lr}: expected positive values")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


# ----------------------------------------------------------------------------------------------- all read-outs
def probe_readouts(train: dict[str, np.ndarray], train_y: Sequence, test: dict[str, np.ndarray], test_y: Sequence, *,
                   probes: Sequence[str] = PROBES, knn_k: int = 20, knn_temperature: float = 0.07, seed: int = 0,
                   attentive: dict | None = None) -> dict[str, dict[str, dict]]:
    """Every probe that applies to every feature of ``train`` / ``test`` (the same keys, e.g. encode_readouts'
    "L6/mean", "L6/position", "L6/tokens", one row per sample): kNN and linear on vectors (N, F), the attentive
    probe on tokens (N, K, D). Returns {key: {probe: result}} (keys without an applicable probe are left out);
    ``attentive``: extra keyword arguments of :func:`attentive_probe` (epochs, lr, ...)."""
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise ValueError(f"probes {list(probes)}: unknown {unknown[0]!r}; expected some of {PROBES}")
    if set(train) != set(test):
        key = sorted(set(train) ^ set(test))[0]
        raise ValueError(f"feature {key!r} is in one of train / test only: both need the same keys")
    out: dict[str, dict[str, dict]] = {}
    for key, x in train.items():
        x, x_test = np.asarray(x), np.asarray(test[key])
        if x.ndim not in (2, 3) or x_test.ndim != x.ndim:
            raise ValueError(f"feature {key!r}: shapes {x.shape} and {x_test.shape}; expected (N, F) or (N, K, D)")
        results = {}
        for probe in probes:
            if probe == "knn" and x.ndim == 2:
                results[probe] = knn_probe(x, train_y, x_test, test_y, k=knn_k, temperature=knn_temperature)
            elif probe == "linear" and x.ndim == 2:
                results[probe] = linear_probe(x, train_y, x_test, test_y, seed=seed)
            elif probe == "attentive" and x.ndim == 3:
                results[probe] = attentive_probe(x, train_y, x_test, test_y, seed=seed, **(attentive or {}))
        if results:
            out[key] = results
    return out
