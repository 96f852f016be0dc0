"""What every trained head shares: per-branch input standardisation, the two task outputs, input checking, the loss.

A head takes a mapping ``{branch: (B, D_m) tensor}`` (any embedding: expMAE features, HuBERT, MacBERT, CLIP, or an
end-to-end encoder's pooled output) and returns ``{"logits": (B, C), "regression": (B, R), "embedding": (B, H)}``,
R being the number of regression columns of the label set (MER2023: valence, R = 1; a set without any: R = 0).
A single branch is the unimodal model (the paper's Table 1), same code. Inputs are standardised inside the head
with per-branch mean/std buffers set from the training split (``set_input_stats``), so a saved state dict carries
its own normalisation.
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

    token_inputs = False  # True: a branch may also be tokens (B, N, D_m), standardised per token

    def __init__(self, in_dims: Mapping[str, int], embed_dim: int, num_classes: int, num_targets: int = 1):
        super().__init__()
        if not in_dims:
            raise ValueError("a fusion head needs at least one input branch")
        self.in_dims = dict(in_dims)
        self.num_classes, self.num_targets = num_classes, num_targets
        self.standardize = nn.ModuleDict({b: Standardize(d) for b, d in self.in_dims.items()})
        self.fc_emotion = nn.Linear(embed_dim, num_classes)
        self.fc_regression = nn.Linear(embed_dim, num_targets) if num_targets else None

    @torch.no_grad()
    def set_input_stats(self, stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]], eps: float = 1e-6) -> None:
        """Set each branch's (mean, std) (from the training split only, so nothing leaks from evaluation data)."""
        for branch, (mean, std) in stats.items():
            std = torch.as_tensor(std)
            self.standardize[branch].mean.copy_(torch.as_tensor(mean))
            # A dimension constant on the training split carries nothing; dividing by ~0 would only blow up
            # whatever value it takes at test time, so it is centred and left unscaled.
            self.standardize[branch].std.copy_(torch.where(std > eps, std, torch.ones_like(std)))

    def standardized_inputs(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The branches in the head's order, checked and standardised."""
        xs = []
        dtype = self.fc_emotion.weight.dtype
        for branch, dim in self.in_dims.items():
            if branch not in inputs:
                raise KeyError(f"missing input branch {branch!r}; the head was built for {list(self.in_dims)}")
            x = inputs[branch]
            if x.shape[-1:] != (dim,) or not (x.ndim == 2 or (x.ndim == 3 and self.token_inputs)):
                tokens = f" or (B, N, {dim})" if self.token_inputs else ""
                raise ValueError(f"branch {branch!r}: got shape {tuple(x.shape)}, expected (B, {dim}){tokens}")
            xs.append(self.standardize[branch](x.to(dtype)))
        return xs

    def outputs(self, embedding: torch.Tensor, **extra) -> dict[str, torch.Tensor]:
        """The task outputs of the fused ``embedding`` (B, H)."""
        regression = self.fc_regression(embedding) if self.fc_regression is not None else embedding.new_zeros(len(embedding), 0)
        return {"logits": self.fc_emotion(embedding), "regression": regression, "embedding": embedding, **extra}


def task_loss(outputs: Mapping[str, torch.Tensor], label: torch.Tensor, targets: torch.Tensor,
              target_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """CE(class) + lambda * MSE(regression columns) over the known targets: NaN entries (pseudo-labels, a test
    set without valence) skip the MSE. MER2023: CE(emotion) + lambda * MSE(valence)."""
    ce = F.cross_entropy(outputs["logits"].float(), label)
    known = torch.isfinite(targets)
    mse = F.mse_loss(outputs["regression"].float()[known], targets[known]) if known.any() else ce.new_zeros(())
    loss = ce + target_weight * mse
    return loss, {"loss_class": ce.item(), "loss_regression": mse.item()}
