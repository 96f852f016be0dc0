"""``concat``: concatenate the branches and apply an MLP, the plain early-fusion baseline."""
from __future__ import annotations

from typing import Mapping

import torch

from expmae.finetune.heads.base import FusionHead, mlp_encoder


class ConcatFusion(FusionHead):
    def __init__(self, in_dims: Mapping[str, int], hidden_dim: int = 128, dropout: float = 0.3, num_classes: int = 6,
                 num_targets: int = 1):
        super().__init__(in_dims, hidden_dim, num_classes, num_targets)
        self.encoder = mlp_encoder(sum(self.in_dims.values()), hidden_dim, dropout)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.outputs(self.encoder(torch.cat(self.standardized_inputs(inputs), dim=1)))
