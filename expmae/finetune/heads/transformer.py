"""``transformer``: the modality features as tokens of a Transformer encoder (the paper's Table 3, 3 and 6 layers).

Each branch -> a linear token of the hidden size plus a learned branch embedding; a class token in front;
``num_layers`` pre-norm layers of torch's ``nn.TransformerEncoderLayer`` (``num_heads`` heads, GELU MLP of 4x the
hidden size); the class token after a final LayerNorm is the fused vector."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from expmae.finetune.heads.base import FusionHead


class TransformerFusion(FusionHead):
    def __init__(self, in_dims: Mapping[str, int], hidden_dim: int = 128, dropout: float = 0.3, num_layers: int = 3,
                 num_heads: int = 4, num_classes: int = 6, num_targets: int = 1):
        super().__init__(in_dims, hidden_dim, num_classes, num_targets)
        if num_layers < 1 or hidden_dim % num_heads:
            raise ValueError(f"transformer head: num_layers={num_layers} (expected >= 1), hidden_dim={hidden_dim} "
                             f"(expected a multiple of its {num_heads} attention heads)")
        self.tokenizers = nn.ModuleList([nn.Linear(d, hidden_dim) for d in self.in_dims.values()])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.branch_embed = nn.Parameter(torch.zeros(1, len(self.in_dims), hidden_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.branch_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(hidden_dim, num_heads, 4 * hidden_dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(hidden_dim), enable_nested_tensor=False)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = [tok(x) for tok, x in zip(self.tokenizers, self.standardized_inputs(inputs))]
        tokens = torch.stack(tokens, dim=1) + self.branch_embed  # (B, M, H): one token per branch
        x = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)  # (B, 1 + M, H)
        return self.outputs(self.blocks(x)[:, 0])
