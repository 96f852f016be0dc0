"""``attentive``: V-JEPA's attentive probe as a head: a learned query cross-attends tokens (expmae.vit.AttentivePooler).

A branch is either one vector per sample (B, D_m): one token, or tokens (B, N_m, D_m): the end-to-end encoder's
patch / tubelet tokens (expmae.finetune.backends.video_model passes them instead of their mean to a head with
``token_inputs``), or a feature folder's frame-level (N, D) files (expmae.finetune.featureset, ``tokens``; rows of
NaN are padding, left out of the attention). Every token -> its branch's linear map to the hidden size + a learned
branch embedding; the query reads all branches' tokens at once; the pooled vector (after dropout) feeds the two
task outputs. With tokens, the head can read a cue from the few tokens that carry it, which a mean washes out.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from expmae.finetune.heads.base import FusionHead
from expmae.vit import AttentivePooler


class AttentiveFusion(FusionHead):
    token_inputs = True  # branches may be (B, N, D): the video backend passes the encoder's tokens

    def __init__(self, in_dims: Mapping[str, int], hidden_dim: int = 128, dropout: float = 0.3, num_heads: int = 4,
                 num_classes: int = 6, num_targets: int = 1):
        super().__init__(in_dims, hidden_dim, num_classes, num_targets)
        if hidden_dim % num_heads:
            raise ValueError(f"attentive head: hidden_dim={hidden_dim}, expected a multiple of its {num_heads} "
                             "attention heads")
        self.tokenizers = nn.ModuleList([nn.Linear(d, hidden_dim) for d in self.in_dims.values()])
        self.branch_embed = nn.Parameter(torch.zeros(1, len(self.in_dims), hidden_dim))
        nn.init.trunc_normal_(self.branch_embed, std=0.02)
        self.pooler = AttentivePooler(hidden_dim, num_queries=1, num_heads=num_heads)
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens, masks = [], []
        for i, (tok, x) in enumerate(zip(self.tokenizers, self.standardized_inputs(inputs))):
            x = x if x.ndim == 3 else x.unsqueeze(1)  # (B, D_m) -> one token (B, 1, D_m)
            valid = ~torch.isnan(x).any(dim=2)  # (B, N_m): NaN rows are padding
            tokens.append(tok(x.nan_to_num(0.0)) + self.branch_embed[:, i : i + 1])  # (B, N_m, H)
            masks.append(valid)
        mask = torch.cat(masks, dim=1)  # (B, sum N_m)
        pooled = self.pooler(torch.cat(tokens, dim=1), None if mask.all() else mask)[:, 0]  # (B, H)
        return self.outputs(self.dropout(pooled))
