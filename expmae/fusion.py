"""Fusion heads for MER: several (B, D_m) embeddings in, 6-way emotion logits + valence out.

Three heads, all taking a mapping ``{branch: (B, D_m) tensor}`` (any embedding: our expMAE features,
HuBERT, MacBERT, CLIP, or later an end-to-end encoder's pooled output), and all returning
``{"logits": (B, C), "valence": (B,), "embedding": (B, H)}``:

- ``attention``: each branch -> MLP to a hidden size; an MLP over their concatenation scores the branches;
  the fused vector is the score-weighted sum (MER2023 baseline ``Attention``, MERTools
  MERBench/toolkit/models/attention.py). The scores stay unnormalised as in the baseline: a softmax would
  make them convex weights, and then the head learns labels that depend on an interaction of
  modalities poorly (on the joint-label task of tests/test_fusion.py, held-out F1 0.31 with softmax, 0.75 without).
- ``mfb``: factorized bilinear pooling (Yu et al., ICCV 2017): each branch -> linear to k*o, elementwise
  product across branches, sum-pool over k, power (signed sqrt) and L2 normalisation (then scaled by
  sqrt(o), see forward). With more than two branches the product runs over all of them (multilinear).
- ``concat``: concatenate and MLP, the plain early-fusion baseline.

A single branch is the unimodal model (the paper's Table 1), same code.
Inputs are standardised inside the head with per-branch mean/std buffers set from the training split
(``set_input_stats``), so a saved state dict carries its own normalisation.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp_encoder(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """Two Linear-ReLU-Dropout layers, the MER2023 baseline's utterance-level encoder."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
    )


class Standardize(nn.Module):
    """(x - mean) / std with fixed buffers: part of the state dict, not trained."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class FusionHead(nn.Module):
    """Shared plumbing: per-branch standardisation, the two task outputs, input checking."""

    def __init__(self, in_dims: Mapping[str, int], embed_dim: int, num_classes: int):
        super().__init__()
        if not in_dims:
            raise ValueError("a fusion head needs at least one input branch")
        self.in_dims = dict(in_dims)
        self.num_classes = num_classes
        self.standardize = nn.ModuleDict({b: Standardize(d) for b, d in self.in_dims.items()})
        self.fc_emotion = nn.Linear(embed_dim, num_classes)
        self.fc_valence = nn.Linear(embed_dim, 1)

    @torch.no_grad()
    def set_input_stats(self, stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]], eps: float = 1e-6) -> None:
        """Set each branch's (mean, std) (from the training split only, so nothing leaks from evaluation data)."""
        for branch, (mean, std) in stats.items():
            std = torch.as_tensor(std)
            self.standardize[branch].mean.copy_(torch.as_tensor(mean))
            # A dimension constant on the training split carries nothing; dividing by ~0 would only blow up
            # whatever value it takes at test time, so it is centred and left unscaled.
            self.standardize[branch].std.copy_(torch.where(std > eps, std, torch.ones_like(std)))

    def _inputs(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        xs = []
        dtype = self.fc_emotion.weight.dtype
        for branch, dim in self.in_dims.items():
            if branch not in inputs:
                raise KeyError(f"missing input branch {branch!r}; the head was built for {list(self.in_dims)}")
            x = inputs[branch]
            if x.ndim != 2 or x.shape[1] != dim:
                raise ValueError(f"branch {branch!r}: got shape {tuple(x.shape)}, expected (B, {dim})")
            xs.append(self.standardize[branch](x.to(dtype)))
        return xs

    def _outputs(self, embedding: torch.Tensor, **extra) -> dict[str, torch.Tensor]:
        logits, valence = self.fc_emotion(embedding), self.fc_valence(embedding).squeeze(1)
        return {"logits": logits, "valence": valence, "embedding": embedding, **extra}


class AttentionFusion(FusionHead):
    def __init__(self, in_dims: Mapping[str, int], hidden_dim: int = 128, dropout: float = 0.3, num_classes: int = 6):
        super().__init__(in_dims, hidden_dim, num_classes)
        self.encoders = nn.ModuleList([mlp_encoder(d, hidden_dim, dropout) for d in self.in_dims.values()])
        self.attention_mlp = mlp_encoder(hidden_dim * len(self.in_dims), hidden_dim, dropout)
        self.fc_attention = nn.Linear(hidden_dim, len(self.in_dims))

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden = [enc(x) for enc, x in zip(self.encoders, self._inputs(inputs))]
        weights = self.fc_attention(self.attention_mlp(torch.cat(hidden, dim=1)))  # (B, M), one score per branch
        fused = (torch.stack(hidden, dim=1) * weights.unsqueeze(2)).sum(dim=1)
        return self._outputs(fused, attention=weights)


class FactorizedBilinearPooling(FusionHead):
    def __init__(
        self,
        in_dims: Mapping[str, int],
        factor_k: int = 5,
        out_dim: int = 128,
        dropout: float = 0.1,
        num_classes: int = 6,
    ):
        super().__init__(in_dims, out_dim, num_classes)
        self.factor_k, self.out_dim = factor_k, out_dim
        self.projections = nn.ModuleList([nn.Linear(d, factor_k * out_dim) for d in self.in_dims.values()])
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        xs = self._inputs(inputs)
        joint = self.projections[0](xs[0])
        for proj, x in zip(self.projections[1:], xs[1:]):
            joint = joint * proj(x)
        z = self.dropout(joint).view(-1, self.out_dim, self.factor_k).sum(dim=2)  # sum pooling over k
        z = torch.sign(z) * torch.sqrt(z.abs() + 1e-8)  # power normalisation; eps keeps the gradient finite at 0
        # Unit L2 norm spread over o coordinates leaves each ~1/sqrt(o): the linear outputs then start tiny and
        # the head stays under-confident for many epochs (bad for pseudo-label thresholds); sqrt(o) restores O(1).
        return self._outputs(F.normalize(z, dim=1) * self.out_dim**0.5)


class ConcatFusion(FusionHead):
    def __init__(self, in_dims: Mapping[str, int], hidden_dim: int = 128, dropout: float = 0.3, num_classes: int = 6):
        super().__init__(in_dims, hidden_dim, num_classes)
        self.encoder = mlp_encoder(sum(self.in_dims.values()), hidden_dim, dropout)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._outputs(self.encoder(torch.cat(self._inputs(inputs), dim=1)))


HEADS = {"attention": AttentionFusion, "mfb": FactorizedBilinearPooling, "concat": ConcatFusion}


def create_head(
    name: str,
    in_dims: Mapping[str, int],
    *,
    hidden_dim: int = 128,
    dropout: float = 0.3,
    factor_k: int = 5,
    num_classes: int = 6,
) -> FusionHead:
    """Build a head by name ("attention", "mfb", "concat"); ``hidden_dim`` is MFB's output size o."""
    if name not in HEADS:
        raise ValueError(f"unknown fusion head {name!r}; expected one of {sorted(HEADS)}")
    if name == "mfb":
        return FactorizedBilinearPooling(in_dims, factor_k=factor_k, out_dim=hidden_dim, dropout=dropout, num_classes=num_classes)
    return HEADS[name](in_dims, hidden_dim=hidden_dim, dropout=dropout, num_classes=num_classes)


def mer_loss(
    outputs: Mapping[str, torch.Tensor], emotion: torch.Tensor, valence: torch.Tensor, valence_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """CE(emotion) + lambda * MSE(valence); rows whose valence is NaN (pseudo-labels, test3) skip the MSE."""
    ce = F.cross_entropy(outputs["logits"].float(), emotion)
    known = torch.isfinite(valence)
    mse = F.mse_loss(outputs["valence"].float()[known], valence[known]) if known.any() else ce.new_zeros(())
    loss = ce + valence_weight * mse
    return loss, {"loss_emotion": ce.item(), "loss_valence": mse.item()}
