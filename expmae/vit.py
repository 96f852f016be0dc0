"""Pre-norm ViT blocks, named like timm's VisionTransformer so state dicts map 1:1.

Keys per block: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2 (timm.models.vision_transformer.Block
with default options). Attention goes through F.scaled_dot_product_attention (flash / memory-efficient kernels).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# timm's default ViT LayerNorm eps (torch's default is 1e-5); it matters for bit-exact export.
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample, scale the kept ones by 1/keep_prob."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, segments: list[int] | None = None) -> torch.Tensor:
        """segments: lengths of independent sequences packed along dim 1; each attends only within itself."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if segments is None:
            x = F.scaled_dot_product_attention(q, k, v)
        else:  # exact block-diagonal attention, without the masked-out score blocks a mask would still compute
            x = torch.cat([F.scaled_dot_product_attention(*qkv)
                           for qkv in zip(q.split(segments, 2), k.split(segments, 2), v.split(segments, 2))], dim=2)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, segments: list[int] | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), segments))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool = False,
               segments: list[int] | None = None) -> torch.Tensor:
    """Apply blocks in order; with grad_checkpointing, recompute each block's activations in backward.
    segments: see Attention.forward."""
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the RNG state, so drop-path masks match in the recompute.
            x = checkpoint(block, x, segments, use_reentrant=False)
        else:
            x = block(x, segments)
    return x
