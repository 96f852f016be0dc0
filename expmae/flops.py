"""Model FLOPs of an expMAE training step, counted from the algorithm, and the accelerator peaks for MFU.

Counted analytically (not from what an implementation happens to compute), so two implementations of the same
algorithm get the same count; tests/test_bench.py holds our forward to torch's FLOP counter exactly. Per transformer
layer on a sequence of n tokens of width d with MLP width h, forward: 2 * n * (4 d^2 + 2 d h) for the matmuls (qkv,
proj, fc1, fc2) + 4 * n^2 * d for attention (QK^T and AV). Also counted: the patch stem on the tokens the encoder
sees, the encoder-to-decoder projection on them, the decoder on all tokens, its head on the masked tokens (the
ones the loss reads). Training = 3 x forward (backward = 2 x forward, the usual 6 * params * tokens rule; the
stem's input gradient, never computed, makes it a <1% overcount). Norms, GELU, softmax, the loss and the
optimizer are not counted.

Used by tools/bench_pretrain.py (clips/s, MFU, the FLOP ratio to the reference) and pretrain/train.py (the
perf/model_tflops and perf/mfu TensorBoard curves).
"""
from __future__ import annotations

from expmae.model_config import ExpMAEConfig, mae_num_kept, tube_num_masked

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, matched against the device name in order.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("A100", 312e12),
)

BRANCHES = {"expmae": ("mae", "video"), "mae": ("mae",), "videomae": ("video",)}  # per ExpMAEConfig.mode


def transformer_forward_flops(seq_len: int, dim: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of ``depth`` pre-norm ViT layers on one sequence of ``seq_len`` tokens."""
    hidden = int(dim * mlp_ratio)
    return depth * (2 * seq_len * (4 * dim * dim + 2 * dim * hidden) + 4 * seq_len**2 * dim)


def branch_forward_flops(cfg: ExpMAEConfig, branch: str) -> float:
    """Forward FLOPs per clip of one branch: 'mae' (one frame, random masking) or 'video' (tube masking)."""
    p, C, N = cfg.patch_size, cfg.in_chans, cfg.num_patches
    if branch == "mae":
        visible, total, pixels = mae_num_kept(N, cfg.mae_mask_ratio), N, p * p * C
        dec_dim, dec_depth = cfg.mae_decoder_embed_dim, cfg.mae_decoder_depth
    elif branch == "video":
        visible = cfg.num_time * (N - tube_num_masked(N, cfg.video_mask_ratio))
        total, pixels = cfg.num_time * N, cfg.tubelet_size * p * p * C
        dec_dim, dec_depth = cfg.video_decoder_embed_dim, cfg.video_decoder_depth
    else:
        raise ValueError(f"branch={branch!r}: expected 'mae' or 'video'")
    cls = int(cfg.class_token)  # a class token runs through the encoder, and through the MAE decoder only
    dec_cls = cls if branch == "mae" else 0
    return (2 * visible * pixels * cfg.embed_dim  # stem on visible tokens
            + transformer_forward_flops(visible + cls, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)
            + 2 * (visible + dec_cls) * cfg.embed_dim * dec_dim  # encoder -> decoder projection
            + transformer_forward_flops(total + dec_cls, dec_dim, dec_depth, cfg.mlp_ratio)
            + 2 * (total - visible) * dec_dim * pixels)  # head on the masked tokens


def train_flops_per_clip(cfg: ExpMAEConfig, mode: str | None = None) -> float:
    """Model FLOPs of one training step per clip (forward + backward) in ``mode`` (default: cfg.mode)."""
    return 3 * sum(branch_forward_flops(cfg, b) for b in BRANCHES[mode or cfg.mode])


def encoder_tokens_per_clip(cfg: ExpMAEConfig, mode: str | None = None) -> int:
    """Tokens the encoder sees per clip: the visible frame patches and / or the visible tubelets."""
    N = cfg.num_patches
    counts = {"mae": mae_num_kept(N, cfg.mae_mask_ratio),
              "video": cfg.num_time * (N - tube_num_masked(N, cfg.video_mask_ratio))}
    return sum(counts[b] for b in BRANCHES[mode or cfg.mode])


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a known accelerator (by its name, e.g. torch.cuda.get_device_name), else None."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None
