"""expmae.flops: the analytic model FLOPs on a hand-computed case, against torch's FLOP counter on our forward
(exactly: the implementation does no matmul work beyond the algorithm's), and the accelerator peak table."""
import pytest
import torch

from expmae import flops
from expmae.model import create_model


def test_transformer_flops_hand_computed_case():
    # 2 tokens, width 4, MLP 8: matmuls 2 * 2 * (4*16 + 2*4*8) = 512, attention 4 * 2^2 * 4 = 64
    assert flops.transformer_forward_flops(seq_len=2, dim=4, depth=1, mlp_ratio=2.0) == 576
    assert flops.transformer_forward_flops(seq_len=2, dim=4, depth=3, mlp_ratio=2.0) == 3 * 576


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("mode", ["mae", "videomae", "expmae"])
def test_forward_flops_match_torch_flop_counter(mode, class_token):
    """Our forward, counted by torch.utils.flop_counter, is exactly the analytic count: the stem sees only visible
    tokens, the heads only masked ones, and the packed encoder pass attends within each branch only (a class token
    runs through the encoder with each branch, and through the MAE decoder only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    overrides = dict(img_size=32, num_frames=4, patch_size=8, depth=2, mae_decoder_depth=2, video_decoder_depth=1)
    model = create_model("tiny", mode=mode, class_token=class_token, **overrides)
    cfg = model.cfg
    clips = torch.randn(3, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    # the math backend spells attention as matmuls, which the counter sees (it skips the CPU flash kernel)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(clips)
    branches = {"mae": ["mae"], "videomae": ["video"], "expmae": ["mae", "video"]}[mode]
    expected = clips.shape[0] * sum(flops.branch_forward_flops(cfg, b) for b in branches)
    assert counter.get_total_flops() == expected
    assert flops.train_flops_per_clip(cfg) == 3 * expected / clips.shape[0]
    # tokens the encoder sees: int(16 * 0.25) = 4 frame patches, 2 steps x (16 - int(0.9 * 16)) = 4 tubelets
    assert flops.encoder_tokens_per_clip(cfg) == {"mae": 4, "videomae": 4, "expmae": 8}[mode]


def test_unknown_branch_is_refused():
    with pytest.raises(ValueError, match="branch='audio': expected 'mae' or 'video'"):
        flops.branch_forward_flops(create_model("tiny", img_size=32, patch_size=8).cfg, "audio")


def test_peak_bf16_table_matches_device_names():
    assert flops.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_bf16_flops("NVIDIA H200") == 989e12
    assert flops.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_bf16_flops("NVIDIA GeForce RTX 4090") is None
