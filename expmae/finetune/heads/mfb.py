"""``mfb``: factorized bilinear pooling (Yu et al., ICCV 2017): each branch -> linear to k*o, elementwise product
across branches, sum-pool over k, power (signed sqrt) and L2 normalisation (then scaled by sqrt(o), see forward).
With more than two branches the product runs over all of them (multilinear)."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from expmae.finetune.heads.base import FusionHead


class FactorizedBilinearPooling(FusionHead):
    def __init__(self, in_dims: Mapping[str, int], factor_k: int = 5, out_dim: int = 128, dropout: float = 0.1,
                 num_classes: int = 6, num_targets: int = 1):
        super().__init__(in_dims, out_dim, num_classes, num_targets)
        self.factor_k, self.out_dim = factor_k, out_dim
        self.projections = nn.ModuleList([nn.Linear(d, factor_k * out_dim) for d in self.in_dims.values()])
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        xs = self.standardized_inputs(inputs)
        joint = self.projections[0](xs[0])
        for proj, x in zip(self.projections[1:], xs[1:]):
            joint = joint * proj(x)
        z = self.dropout(joint).view(-1, self.out_dim, self.factor_k).sum(dim=2)  # sum pooling over k
        z = torch.sign(z) * torch.sqrt(z.abs() + 1e-8)  # power normalisation; eps keeps the gradient finite at 0
        # Unit L2 norm spread over o coordinates leaves each ~1/sqrt(o): the linear outputs then start tiny and
        # the head stays under-confident for many epochs (bad for pseudo-label thresholds); sqrt(o) restores O(1).
        return self.outputs(F.normalize(z, dim=1) * self.out_dim**0.5)
