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


class CrossAttention(nn.Module):
    """Queries (B, Q, D) attend to tokens (B, N, D): V-JEPA's CrossAttention (q from the queries, k and v from
    the tokens, one output projection)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: bool (B, N), True for the tokens to attend to (None: all)."""
        B, Q, C = queries.shape
        H = self.num_heads
        q = self.q(queries).reshape(B, Q, H, C // H).transpose(1, 2)  # (B, H, Q, C/H)
        k, v = self.kv(x).reshape(B, x.shape[1], 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, C/H)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N): every head, every query
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, Q, C/H)
        return self.proj(out.transpose(1, 2).reshape(B, Q, C))


class AttentivePooler(nn.Module):
    """V-JEPA's attentive pooler: ``num_queries`` learned queries cross-attend the (frozen) tokens, then an MLP:
    tokens (B, N, D) -> (B, num_queries, D). One cross-attention block (LayerNorm on the tokens, multi-head
    cross-attention, residual; LayerNorm + MLP, residual; ``mlp_ratio=0``: no MLP). Unlike a mean over the
    tokens, it can read a cue from the few tokens that carry it."""

    def __init__(self, dim: int, num_queries: int = 1, num_heads: int = 1, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True):
        super().__init__()
        if num_queries < 1 or mlp_ratio < 0:
            raise ValueError(f"num_queries={num_queries}, mlp_ratio={mlp_ratio}: expected >= 1 and >= 0")
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, dim))
        nn.init.trunc_normal_(self.query_tokens, std=0.02)  # V-JEPA's init_std
        self.norm1 = LayerNorm(dim)
        self.xattn = CrossAttention(dim, num_heads, qkv_bias)
        self.norm2 = LayerNorm(dim) if mlp_ratio else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio)) if mlp_ratio else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D); mask: bool (B, N), True for the tokens to attend to (None: all; padding: False)."""
        q = self.query_tokens.to(x.dtype).expand(len(x), -1, -1)
        q = q + self.xattn(q, self.norm1(x), mask)
        return q if self.mlp is None else q + self.mlp(self.norm2(q))
