"""Fixed sin-cos position embeddings: MAE's layout (1-D, 2-D and 3-D) and VideoMAE's 1-D table.

1-D: [sin(pos * w_i) | cos(pos * w_i)], w_i = 1 / 10000^(i / (D/2)), as MAE's get_1d_sincos_pos_embed_from_grid.
2-D: MAE's get_2d_sincos_pos_embed without a class token: the first D/2 channels encode the column (x) index,
     the last D/2 the row (y) index; patches in row-major order (the order of Conv2d(...).flatten(2)).
3-D: the 2-D code of (y, x) plus the 1-D code of the time index t, token order (t, y, x) (Conv3d(...).flatten(2)).
     Adding rather than splitting channels keeps every frame token on the same spatial code as the 2-D path,
     so the image encoder (exported to timm) and the clip encoder share one spatial position code.
VideoMAE: one 1-D table over all T' x H x W tubelets in token order, sin and cos interleaved (channel 2i sin,
     2i+1 cos, w_i = 1 / 10000^(2i / D)); built with numpy float64 exactly as transformers'
     get_sinusoid_encoding_table (and the official VideoMAE / VideoMAE V2 code), so it is bit-for-bit the same.
"""
from __future__ import annotations

import numpy as np
import torch


def get_1d_sincos_pos_embed(embed_dim: int, positions: torch.Tensor | int) -> torch.Tensor:
    """(M, embed_dim) float32 code of M positions (an int M means positions 0..M-1)."""
    if embed_dim % 2:
        raise ValueError(f"1-D sin-cos position embedding needs an even embed_dim, got {embed_dim}")
    if isinstance(positions, int):
        positions = torch.arange(positions)
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int]) -> torch.Tensor:
    """(H*W, embed_dim) float32 code of an H x W patch grid (row-major), MAE layout: [x-code | y-code]."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, xs), get_1d_sincos_pos_embed(embed_dim // 2, ys)], dim=1)


def spatiotemporal_pos_embed(spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
    """Combine (..., N, D) spatial and (..., T, D) temporal codes into (..., T*N, D), token order (t, n)."""
    return (temporal.unsqueeze(-2) + spatial.unsqueeze(-3)).flatten(-3, -2)


def get_videomae_sincos_table(num_positions: int, embed_dim: int) -> torch.Tensor:
    """(1, num_positions, embed_dim) float32: VideoMAE's sinusoid table, bit-for-bit transformers' values."""
    exponent = 2 * (np.arange(embed_dim) // 2) / embed_dim
    angles = np.arange(num_positions, dtype=np.float64)[:, None] / np.power(10000, exponent)[None, :]
    angles[:, 0::2] = np.sin(angles[:, 0::2])  # dim 2i
    angles[:, 1::2] = np.cos(angles[:, 1::2])  # dim 2i + 1
    return torch.from_numpy(angles).float()[None]
