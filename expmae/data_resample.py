"""Crop, resize and flip of a batch on its device, byte for byte as Pillow's bilinear resize on the CPU (the
pretraining data's ``augment_on="device"``): PIL's fixed-point filter weights applied as batched matmuls."""
from __future__ import annotations

import torch

PIL_PRECISION_BITS = 22  # Pillow's fixed-point weights (Resample.c)


def pil_bilinear_weights(in_size: int, start: torch.Tensor, length: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, out_size, in_size) int64 weights (fixed point, 2^22 = 1) of PIL's bilinear resize of
    [start, start + length) to out_size.

    Pillow's precompute_coeffs (src/libImaging/Resample.c), per output pixel: a triangle filter widened by the
    downscale factor (antialiasing), taps clipped to the image (not the box), normalised, then rounded to PIL's
    22-bit fixed point (normalize_coeffs_8bpc).
    """
    start, length = start.double(), length.double()
    scale = (length / out_size)[:, None]  # (B, 1)
    filterscale = scale.clamp(min=1.0)  # = support: bilinear's support is 1
    center = start[:, None] + (torch.arange(out_size, dtype=torch.float64, device=start.device) + 0.5) * scale  # (B, S)
    xmin = torch.trunc(center - filterscale + 0.5).clamp(min=0)  # C's (int) cast
    xmax = torch.trunc(center + filterscale + 0.5).clamp(max=in_size)
    j = torch.arange(in_size, dtype=torch.float64, device=start.device)  # (in,)
    w = (1 - ((j - center[..., None] + 0.5) / filterscale[..., None]).abs()).clamp(min=0)  # (B, S, in)
    w = w * ((j >= xmin[..., None]) & (j < xmax[..., None]))
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-300)
    return torch.floor(w * 2**PIL_PRECISION_BITS + 0.5).long()


def _pil_pass(x: torch.Tensor, weights: torch.Tensor, rows: bool) -> torch.Tensor:
    """One pass of PIL's 8-bit resampling, bit-exact: ``weights`` (B, S, N) along the rows (``rows``: x is
    (B, T, C, N, M)) or the columns (x is (B, T, C, M, N)); x holds integers 0..255 as float32.

    PIL computes (sum(pixel * weight) + 2^21) >> 22 in integers. A float32 matmul is exact on integers below
    2^24, so the weights are split into 11-bit halves (pixel x half-weight sums stay below 2^19) and joined
    in int32 (below 2^31). Pixels (8 bits) and halves (<= 11 significant bits) are exact in TF32 too, so
    tensor cores give the same bytes.
    """
    halves = [(weights >> 11).float(), (weights & 2047).float()]  # (B, S, N) each
    if rows:
        hi, lo = (h[:, None, None] @ x for h in halves)  # (B, T, C, S, M)
    else:
        hi, lo = (x @ h.transpose(1, 2)[:, None, None] for h in halves)  # (B, T, C, M, S)
    acc = hi.to(torch.int32) * 2048 + lo.to(torch.int32)
    return ((acc + 2 ** (PIL_PRECISION_BITS - 1)) >> PIL_PRECISION_BITS).clamp_(0, 255).float()


def augment_on_device(batch: dict[str, torch.Tensor], input_size: int) -> torch.Tensor:
    """Crop, resize and flip on the tensors' device: a device-augmentation batch -> uint8 (B, 3, T, S, S).

    ``batch``: ``frames`` uint8 (F, H, W, 3), ``frame_index`` (B, T) into frames, ``box`` (B, 4) = (top, left,
    h, w), ``flip`` (B,). Batched matmuls with PIL's own fixed-point weights, horizontal pass first and rounded
    in between as PIL does: the same bytes as VideoClipDataset's CPU path (crop_resize_frames, PIL) for the
    same (seed, epoch, index) (tests/test_data.py).
    """
    frames, index, box, flip = batch["frames"], batch["frame_index"], batch["box"], batch["flip"]
    _, height, width, _ = frames.shape
    wy = pil_bilinear_weights(height, box[:, 0], box[:, 2], input_size)  # (B, S, H)
    wx = pil_bilinear_weights(width, box[:, 1], box[:, 3], input_size)  # (B, S, W)
    wx = torch.where(flip.bool()[:, None, None], wx.flip(1), wx)  # a flip reverses the output columns
    previous = torch.get_float32_matmul_precision()
    # TF32 is exact here (see _pil_pass) and ~8x faster than float32 on the GPU; "medium" (bf16) would not be
    # exact, and on the CPU only "highest" is sure to stay float32.
    torch.set_float32_matmul_precision("high" if frames.device.type == "cuda" else "highest")
    try:
        x = frames[index].permute(0, 1, 4, 2, 3).float()  # (B, T, H, W, 3) -> (B, T, 3, H, W)
        x = _pil_pass(x, wx, rows=False)  # (B, T, 3, H, S)
        x = _pil_pass(x, wy, rows=True)  # (B, T, 3, S, S)
    finally:
        torch.set_float32_matmul_precision(previous)
    return x.to(torch.uint8).permute(0, 2, 1, 3, 4).contiguous()  # (B, 3, T, S, S)
