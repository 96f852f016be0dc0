"""expMAE model: shapes and masks, oracles (HF VideoMAE, HF ViT-MAE, timm), gradients, overfitting, export."""
import subprocess
import sys

import pytest
import torch

from conftest import TINY_MODEL as TINY
from expmae.model import (ExpMAE, ExpMAEConfig, create_model, get_config,
                          list_models, masking_from_mask, patchify_clips, patchify_frames,
                          tube_masking, unpatchify_clips, unpatchify_frames)
from expmae.pos_embed import (get_1d_sincos_pos_embed, get_2d_sincos_pos_embed, get_videomae_sincos_table,
                              spatiotemporal_pos_embed)
from expmae.visualize import reconstruct
from expmae.weights.timm_frame import frame_encoder_timm_state_dict, timm_create_kwargs



def tiny_model(**overrides) -> ExpMAE:
    torch.manual_seed(0)
    return create_model("tiny", **{**TINY, **overrides})


def randomize_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (norms and biases start at 1 / 0) so an oracle comparison exercises them all."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def clips_like(model: ExpMAE, batch: int = 2, seed: int = 0) -> torch.Tensor:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)


# ---- config and registry ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    (dict(img_size=30, patch_size=8), "img_size"),
    (dict(num_frames=5), "num_frames"),
    (dict(mode="simclr"), "mode"),
    (dict(embed_dim=66, num_heads=3), "embed_dim"),
    (dict(mae_mask_ratio=1.0), "mae_mask_ratio"),
    (dict(video_mask_ratio=0.05), "video_mask_ratio"),  # int(0.05 * 16) = 0 masked positions
    (dict(depth="2"), "depth"),
    (dict(norm_pix_loss=1), "norm_pix_loss"),
    (dict(mean=(0.5, 0.5)), "mean"),
])
def test_config_errors_are_one_line_and_name_the_field(overrides, field):
    with pytest.raises(ValueError) as err:
        ExpMAEConfig(**{**TINY, **overrides})
    message = str(err.value)
    assert "\n" not in message and f"ExpMAEConfig.{field}=" in message


def test_create_model_rejects_unknown_name_and_field():
    with pytest.raises(ValueError, match=r"unknown expMAE model 'gigantic'.*'tiny'"):
        create_model("gigantic")
    with pytest.raises(ValueError, match=r"unknown ExpMAEConfig field\(s\) \['img_sz'\]"):
        create_model("tiny", img_sz=112)


def test_config_coerces_yaml_values():
    cfg = ExpMAEConfig(**{**TINY, "mae_mask_ratio": 1 - 0.25, "mae_loss_weight": 2, "mean": [0.5, 0.5, 0.5]})
    assert cfg.mae_loss_weight == 2.0 and isinstance(cfg.mae_loss_weight, float) and cfg.mean == (0.5,) * 3


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large"])
def test_named_sizes_match_timm_architectures(name):
    """Each registry entry's exported frame encoder has exactly the parameter shapes of timm's
    vit_<name>_patch16_224 with its OWN defaults (built on the meta device: no memory, no init)."""
    timm = pytest.importorskip("timm")
    assert name in list_models()
    cfg = get_config(name)
    with torch.device("meta"):
        model = ExpMAE(cfg)
    ours = {k: tuple(v.shape) for k, v in frame_encoder_timm_state_dict(model).items()}
    reference = timm.create_model(f"vit_{name}_patch16_224", pretrained=False, device="meta", num_classes=0,
                                  class_token=False, global_pool="avg", fc_norm=False)
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert timm_create_kwargs(cfg)[0] == f"vit_{name}_patch16_224"


# ---- position embeddings ---------------------------------------------------------------------------------------
def test_sincos_codes_match_reference_implementations():
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    # HF's 1-D table interleaves sin/cos (even/odd channels); MAE's layout concatenates them.
    table = get_sinusoid_encoding_table(10, 32)[0]
    ours = get_1d_sincos_pos_embed(32, 10)
    torch.testing.assert_close(ours, torch.cat([table[:, 0::2], table[:, 1::2]], dim=1), atol=1e-6, rtol=0)
    # HF ViT-MAE 2-D code is [y-code | x-code]; MAE's original (ours) is [x-code | y-code].
    hf2d = build_2d_sinusoidal_position_embedding(3, 5, 16)
    torch.testing.assert_close(get_2d_sincos_pos_embed(16, (3, 5)), torch.cat([hf2d[:, 8:], hf2d[:, :8]], 1),
                               atol=1e-6, rtol=0)
    # 3-D = the same spatial code at every time step + a per-time code
    spatial, temporal = get_2d_sincos_pos_embed(16, 4), get_1d_sincos_pos_embed(16, 3)
    code = spatiotemporal_pos_embed(spatial, temporal).reshape(3, 16, 16)
    torch.testing.assert_close(code[2, 5], spatial[5] + temporal[2])


@pytest.mark.parametrize("num_positions, dim", [(32, 64), (1568, 768), (8 * 196, 1024)])
def test_videomae_table_is_bit_for_bit_transformers(num_positions, dim):
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    assert torch.equal(get_videomae_sincos_table(num_positions, dim), get_sinusoid_encoding_table(num_positions, dim))


def test_videomae_position_code_in_encoder_and_decoders():
    """position_code="videomae": the clip code is VideoMAE's table over all tubelets (encoder and clip decoder),
    a frame gets the table's first time step (a one-tubelet clip), the frame decoder keeps MAE's 2-D code."""
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    model = tiny_model(position_code="videomae")
    enc = model.encoder
    assert enc.time_embed is None and model.video_decoder.time_embed is None
    assert torch.equal(enc.clip_pos_embed(2), get_sinusoid_encoding_table(32, 64))
    assert torch.equal(model.video_decoder.pos_embed, get_sinusoid_encoding_table(32, 32))
    assert torch.equal(model.mae_decoder.pos_embed[0], get_2d_sincos_pos_embed(32, 4))
    randomize_(model).eval()
    image = torch.randn(2, 3, 32, 32)
    one_tubelet = image[:, :, None].expand(-1, -1, 2, -1, -1)  # the frame as a static 2-frame clip
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_frames(image), enc.forward_clips(one_tubelet), atol=1e-5, rtol=1e-5)
    out = model(clips_like(model))
    assert torch.isfinite(out["loss"]) and out["loss_video"] > 0 and out["loss_mae"] > 0


def test_patchify_round_trips_and_matches_unfold():
    x = torch.randn(2, 3, 4, 16, 16)
    p, t = 8, 2
    torch.testing.assert_close(unpatchify_clips(patchify_clips(x, t, p), t, p, 16), x, atol=0, rtol=0)
    frames = x[:, :, 0]
    torch.testing.assert_close(unpatchify_frames(patchify_frames(frames, p), p, 16), frames, atol=0, rtol=0)
    # independent layout check: F.unfold gives (C, p, p) per patch, MAE wants (p, p, C)
    unfolded = torch.nn.functional.unfold(frames, p, stride=p).transpose(1, 2).reshape(2, 4, 3, p, p)
    torch.testing.assert_close(patchify_frames(frames, p), unfolded.permute(0, 1, 3, 4, 2).reshape(2, 4, -1))


# ---- forward: shapes, masks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pack", [True, False])
def test_forward_shapes_mask_ratios_and_visible_token_counts(pack):
    model = tiny_model(pack_branches=pack)
    clips = clips_like(model, batch=16)
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    out = model(clips, generator=torch.Generator().manual_seed(0))

    B, N, T2 = 16, 16, 2
    # predictions cover the masked tokens only: 16 - 4 of the frame's, 2 x 14 of the clip's
    assert out["pred_mae"].shape == (B, N - 4, 8 * 8 * 3) and out["pred_video"].shape == (B, T2 * 14, 2 * 8 * 8 * 3)
    assert out["mask_mae"].dtype == torch.bool and out["mask_mae"].shape == (B, N)
    assert out["mask_video"].shape == (B, T2 * N)
    # MAE keeps int(16 * 0.25) = 4 patches; VideoMAE masks int(0.9 * 16) = 14 positions at each time step
    assert (out["mask_mae"].sum(1) == N - 4).all()
    assert (out["mask_video"].sum(1) == T2 * 14).all()
    # the encoder ran on exactly the visible tokens: 4 for the frame, 2 x 2 tubelets for the clip
    # (packed: both branches' visible tokens in one pass through the shared blocks)
    assert seen == ([(B, 4 + 4, 64)] if pack else [(B, 4, 64), (B, 4, 64)])
    tube = out["mask_video"].reshape(B, T2, N)
    assert torch.equal(tube[:, 0], tube[:, 1])
    assert len({tuple(m.tolist()) for m in out["mask_mae"]}) > 1 and len({tuple(m.tolist()) for m in tube[:, 0]}) > 1
    assert out["frame_idx"].shape == (B,) and out["frame_idx"].min() >= 0 and out["frame_idx"].max() < 4
    assert len(set(out["frame_idx"].tolist())) > 1
    for key in ("loss", "loss_mae", "loss_video"):
        assert out[key].shape == () and out[key].dtype == torch.float32 and torch.isfinite(out[key])
    torch.testing.assert_close(out["loss"], out["loss_mae"] + out["loss_video"])


def test_default_size_mask_counts():
    """The default 224 px / 16 frames geometry: MAE keeps 49 of 196 patches, VideoMAE keeps 20 x 8 tubelets."""
    from expmae.model import random_masking
    cfg = get_config("base")
    assert (cfg.num_patches, cfg.num_time) == (196, 8)
    m = random_masking(3, cfg.num_patches, cfg.mae_mask_ratio)
    assert m.ids_keep.shape == (3, 49) and (m.mask.sum(1) == 147).all()
    v = tube_masking(3, cfg.num_time, cfg.num_patches, cfg.video_mask_ratio)
    assert v.ids_keep.shape == (3, 160) and (v.mask.sum(1) == 8 * 176).all()
    # ids_keep really are the unmasked tokens, and ids_restore inverts the [keep, masked] order
    assert not v.mask.gather(1, v.ids_keep).any()
    # ids_masked lists the masked tokens in token order, the order of x[mask] (where predictions go)
    for masking in (m, v, masking_from_mask(v.mask, 3, v.mask.shape[1], "mask")):
        assert torch.equal(masking.ids_masked, masking.mask.nonzero()[:, 1].reshape(3, -1))


def test_loss_weights_and_single_branch_modes():
    clips = clips_like(tiny_model())
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    both = tiny_model(mae_loss_weight=0.5, video_loss_weight=2.0)(clips, generator=g())
    torch.testing.assert_close(both["loss"], 0.5 * both["loss_mae"] + 2.0 * both["loss_video"])

    mae = tiny_model(mode="mae")
    out = mae(clips)
    assert mae.video_decoder is None and not any(k.startswith("video_decoder") for k in mae.state_dict())
    assert {"loss_video", "pred_video", "mask_video"}.isdisjoint(out) and torch.equal(out["loss"], out["loss_mae"])

    video = tiny_model(mode="videomae")
    out = video(clips)
    assert video.mae_decoder is None and {"loss_mae", "pred_mae", "mask_mae", "frame_idx"}.isdisjoint(out)
    assert torch.equal(out["loss"], out["loss_video"])


def test_bad_inputs_give_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"clips: expected a float tensor \(B, 3, T, 32, 32\)"):
        model(torch.zeros(2, 3, 4, 64, 64))
    with pytest.raises(ValueError, match=r"clips: expected a float tensor"):
        model(torch.zeros(2, 3, 4, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"mask_video: expected shape \(2, 32\)"):
        model(clips_like(model), mask_video=torch.zeros(2, 16, dtype=torch.bool))
    uneven = torch.zeros(2, 16, dtype=torch.bool)
    uneven[0, :12], uneven[1, :11] = True, True
    with pytest.raises(ValueError, match=r"mask_mae: every sample needs the same number.*\[12, 11\]"):
        model(clips_like(model), mask_mae=uneven)


# ---- the encoder never sees masked tokens ----------------------------------------------------------------------
@pytest.mark.parametrize("pack", [True, False])
def test_encoder_output_ignores_masked_pixels(pack):
    model = randomize_(tiny_model(pack_branches=pack)).eval()
    clips = clips_like(model)
    B, p = 2, 8
    mask_mae = tube_masking(B, 1, 16, 0.75, generator=torch.Generator().manual_seed(1)).mask
    mask_video = tube_masking(B, 2, 16, 0.9, generator=torch.Generator().manual_seed(2)).mask
    frame_idx = torch.tensor([1, 3])
    latents = []
    model.encoder.norm.register_forward_hook(lambda module, args, output: latents.append(output))

    def run(x):
        latents.clear()
        out = model(x, frame_idx=frame_idx, mask_mae=mask_mae, mask_video=mask_video)
        if pack:  # one pass: [MAE frame's 4 visible tokens | clip's 4 visible tubelets]
            return out, latents[0][:, :4], latents[0][:, 4:]
        return out, latents[0], latents[1]  # MAE branch runs first

    out, mae_latent, video_latent = run(clips)
    # scramble the masked patches of the chosen frames only -> the MAE latent must not move
    patches = patchify_frames(clips[torch.arange(B), :, frame_idx], p)
    patches = torch.where(mask_mae[..., None], torch.randn_like(patches) * 5, patches)
    scrambled = clips.clone()
    scrambled[torch.arange(B), :, frame_idx] = unpatchify_frames(patches, p, 32)
    out2, mae_latent2, _ = run(scrambled)
    torch.testing.assert_close(mae_latent2, mae_latent, atol=0, rtol=0)
    assert not torch.allclose(out2["loss_mae"], out["loss_mae"])  # the change was real: the targets moved
    # scramble the masked tubelets -> the video latent must not move
    tubelets = patchify_clips(clips, 2, p)
    tubelets = torch.where(mask_video[..., None], torch.randn_like(tubelets) * 5, tubelets)
    out3, _, video_latent3 = run(unpatchify_clips(tubelets, 2, p, 32))
    torch.testing.assert_close(video_latent3, video_latent, atol=0, rtol=0)
    assert not torch.allclose(out3["loss_video"], out["loss_video"])


# ---- oracles ---------------------------------------------------------------------------------------------------
def _copy_into_hf_videomae(model: ExpMAE, hf) -> None:
    """Same weights: ours (timm names, fused qkv) -> HF VideoMAEForPreTraining (separate q/k/v, no k bias)."""
    enc, dec = model.encoder, model.video_decoder
    state = {}

    def block(prefix, blk, dim):
        w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        state.update({
            f"{prefix}.layernorm_before.weight": blk.norm1.weight, f"{prefix}.layernorm_before.bias": blk.norm1.bias,
            f"{prefix}.attention.attention.query.weight": w[:dim], f"{prefix}.attention.attention.query.bias": b[:dim],
            f"{prefix}.attention.attention.key.weight": w[dim:2 * dim],
            f"{prefix}.attention.attention.value.weight": w[2 * dim:],
            f"{prefix}.attention.attention.value.bias": b[2 * dim:],
            f"{prefix}.attention.output.dense.weight": blk.attn.proj.weight,
            f"{prefix}.attention.output.dense.bias": blk.attn.proj.bias,
            f"{prefix}.layernorm_after.weight": blk.norm2.weight, f"{prefix}.layernorm_after.bias": blk.norm2.bias,
            f"{prefix}.intermediate.dense.weight": blk.mlp.fc1.weight,
            f"{prefix}.intermediate.dense.bias": blk.mlp.fc1.bias,
            f"{prefix}.output.dense.weight": blk.mlp.fc2.weight, f"{prefix}.output.dense.bias": blk.mlp.fc2.bias,
        })

    state["videomae.embeddings.patch_embeddings.projection.weight"] = enc.patch_embed.proj.weight
    state["videomae.embeddings.patch_embeddings.projection.bias"] = enc.patch_embed.proj.bias
    for i, blk in enumerate(enc.blocks):
        block(f"videomae.encoder.layer.{i}", blk, model.cfg.embed_dim)
    state["videomae.layernorm.weight"], state["videomae.layernorm.bias"] = enc.norm.weight, enc.norm.bias
    state["encoder_to_decoder.weight"] = dec.embed.weight
    state["mask_token"] = dec.mask_token
    for i, blk in enumerate(dec.blocks):
        block(f"decoder.decoder_layers.{i}", blk, model.cfg.video_decoder_embed_dim)
    state["decoder.norm.weight"], state["decoder.norm.bias"] = dec.norm.weight, dec.norm.bias
    state["decoder.head.weight"], state["decoder.head.bias"] = dec.head.weight, dec.head.bias
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    # position codes are plain tensors in HF (1-D tables); put ours in
    hf.videomae.embeddings.position_embeddings = spatiotemporal_pos_embed(enc.pos_embed, enc.time_embed).clone()
    hf.position_embeddings = spatiotemporal_pos_embed(dec.pos_embed, dec.time_embed).clone()
    hf.decoder.norm.eps = 1e-6  # HF leaves this one LayerNorm at torch's 1e-5; VideoMAE / timm use 1e-6


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_videomae_branch_matches_hf_videomae_for_pretraining(norm_pix_loss):
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    model = randomize_(tiny_model(mode="videomae", norm_pix_loss=norm_pix_loss)).eval()
    D = model.cfg.embed_dim
    with torch.no_grad():
        for blk in model.encoder.blocks:
            blk.attn.qkv.bias[D:2 * D] = 0  # HF has no key bias
        for blk in model.video_decoder.blocks:
            blk.attn.qkv.bias[32:64] = 0
    hf_cfg = VideoMAEConfig(
        image_size=32, patch_size=8, num_channels=3, num_frames=4, tubelet_size=2, hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, decoder_hidden_size=32,
        decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=128,
        norm_pix_loss=norm_pix_loss, use_mean_pooling=False, layer_norm_eps=1e-6, qv_bias=True,
        attn_implementation="eager")
    hf = VideoMAEForPreTraining(hf_cfg).eval()
    _copy_into_hf_videomae(model, hf)

    clips = clips_like(model, batch=3)
    mask = tube_masking(3, 2, 16, 0.75, generator=torch.Generator().manual_seed(0)).mask
    with torch.no_grad():
        ours = model(clips, mask_video=mask)
        ref = hf(clips.transpose(1, 2), bool_masked_pos=mask)
    torch.testing.assert_close(ours["loss_video"], ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["pred_video"], ref.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_matches_mae_reference(norm_pix_loss):
    """Given the same prediction and mask, our MAE-branch loss is MAE's forward_loss (as in HF ViT-MAE)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    model = tiny_model(mode="mae", norm_pix_loss=norm_pix_loss)
    clips = clips_like(model, batch=3)
    frame_idx = torch.tensor([0, 2, 3])
    out = model(clips, frame_idx=frame_idx)
    frames = clips[torch.arange(3), :, frame_idx]

    hf = ViTMAEForPreTraining(ViTMAEConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, intermediate_size=64, decoder_hidden_size=32,
                                           decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
                                           decoder_intermediate_size=64, norm_pix_loss=norm_pix_loss))
    target = hf.patchify(frames)
    if norm_pix_loss:  # MAE's forward_loss, verbatim
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    mask = out["mask_mae"].float()
    pred = torch.zeros_like(target).masked_scatter(out["mask_mae"][..., None], out["pred_mae"])  # token order
    reference = (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(out["loss_mae"], reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("learn_pos_embed, position_code", [(False, "separable"), (True, "separable"),
                                                            (False, "videomae"), (True, "videomae")])
def test_frame_path_exports_to_timm_exactly(learn_pos_embed, position_code):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_(create_model("tiny", img_size=64, num_frames=4, depth=2, learn_pos_embed=learn_pos_embed,
                                    position_code=position_code))
    name, kwargs = timm_create_kwargs(model.cfg)
    assert name == "vit_tiny_patch16_224"
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    reference.load_state_dict(frame_encoder_timm_state_dict(model), strict=True)
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.encoder.forward_frames(images)
        torch.testing.assert_close(reference.forward_features(images), tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reference(images), tokens.mean(dim=1), atol=1e-5, rtol=1e-5)
    assert timm.data.resolve_data_config({}, model=reference)["mean"] == model.cfg.mean
    # eps 1e-5 vs 1e-6 would hide inside the tolerance above: compare it directly
    eps = lambda module: {m.eps for m in module.modules() if isinstance(m, torch.nn.LayerNorm)}  # noqa: E731
    assert eps(reference) == eps(model.encoder) == {1e-6}


def test_frame_is_a_static_tubelet():
    """The frame stem equals the Conv3d stem on the frame repeated over time (what makes export exact)."""
    model = randomize_(tiny_model())
    image = torch.randn(2, 3, 32, 32)
    static_clip = image[:, :, None].expand(-1, -1, 4, -1, -1)
    with torch.no_grad():
        per_time = model.encoder.patch_embed(static_clip).reshape(2, 2, 16, -1)
        frame = model.encoder.patch_embed.forward_frames(image)
    torch.testing.assert_close(per_time[:, 0], frame, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_time[:, 1], frame, atol=1e-5, rtol=1e-5)


# ---- training behaviour ----------------------------------------------------------------------------------------
def test_both_losses_reach_the_shared_encoder():
    model = tiny_model()
    out = model(clips_like(model))
    shared = [p for n, p in model.encoder.named_parameters() if n.startswith(("blocks", "norm", "patch_embed"))]
    for key in ("loss_mae", "loss_video"):
        grads = torch.autograd.grad(out[key], shared, retain_graph=True)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), key


def test_gradient_checkpointing_and_drop_path():
    clips = clips_like(tiny_model())

    def loss_and_grads(checkpointing):
        model = tiny_model(drop_path_rate=0.2)
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)  # the same drop-path draws; checkpointing recomputes with the saved RNG state
        out = model(clips, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        assert model.encoder.grad_checkpointing == model.video_decoder.grad_checkpointing == checkpointing
        return out["loss"].detach(), [p.grad for p in model.parameters()]

    (loss, grads), (loss_ckpt, grads_ckpt) = loss_and_grads(False), loss_and_grads(True)
    torch.testing.assert_close(loss_ckpt, loss)
    for a, b in zip(grads_ckpt, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # drop-path is active in train mode and off in eval mode
    model = tiny_model(drop_path_rate=0.5)
    tokens = lambda: model.encoder.forward_clips(clips)  # noqa: E731
    assert not torch.equal(tokens(), tokens())
    model.eval()
    assert torch.equal(tokens(), tokens())


def test_runs_in_bfloat16():
    model = tiny_model().to(torch.bfloat16)
    out = model(clips_like(model))  # float32 clips are cast to the model's dtype
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert out["pred_mae"].dtype == torch.bfloat16
    out["loss"].backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.dtype == torch.bfloat16
    out = model(clips_like(model).double())
    assert torch.isfinite(out["loss"])


def test_tiny_model_overfits_one_clip(single_thread):
    model = tiny_model(video_decoder_depth=1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    clip = torch.stack([torch.stack([torch.sin(6 * xx * (c + 1) + 3 * yy + 0.5 * t) for t in range(4)])
                        for c in range(3)])[None]

    def evaluate():  # the same 32 random frames / masks before and after training
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return torch.stack([model(clip.expand(8, -1, -1, -1, -1), generator=g)["loss"] for _ in range(4)]).mean()

    before = evaluate()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = model(clip.expand(4, -1, -1, -1, -1), generator=g)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.1 * before, (before.item(), after.item())


# ---- visualisation and training helpers ------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_reconstruct_returns_images_and_inverts_the_targets(norm_pix_loss, monkeypatch):
    model = tiny_model(norm_pix_loss=norm_pix_loss)
    clips = clips_like(model) * 0.5
    images = reconstruct(model, clips, generator=torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in images.items()} == {
        "mae_target": (2, 3, 32, 32), "mae_masked": (2, 3, 32, 32), "mae_pred": (2, 3, 32, 32),
        "video_target": (2, 3, 4, 32, 32), "video_masked": (2, 3, 4, 32, 32), "video_pred": (2, 3, 4, 32, 32)}
    assert all(v.dtype == torch.float32 and v.min() >= 0 and v.max() <= 1 for v in images.values())
    assert model.training  # restored after the eval-mode pass

    # A decoder that predicts its targets perfectly must reconstruct the input exactly.
    frame_idx = torch.tensor([2, 1])
    frames = clips[torch.arange(2), :, frame_idx]
    mask_mae = tube_masking(2, 1, 16, 0.75, generator=torch.Generator().manual_seed(1)).mask
    monkeypatch.setattr(model.mae_decoder, "forward", lambda latent, ids_keep, ids_masked: model.mae_target(frames, ids_masked))
    monkeypatch.setattr(model.video_decoder, "forward",
                        lambda latent, ids_keep, ids_masked: model.video_target(clips, ids_masked))
    images = reconstruct(model, clips, frame_idx=frame_idx, mask_mae=mask_mae)
    mean = torch.tensor(model.cfg.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(model.cfg.std).view(1, 3, 1, 1, 1)
    expected = (clips * std + mean).clamp(0, 1)
    expected_frames = expected[torch.arange(2), :, frame_idx]
    torch.testing.assert_close(images["video_target"], expected)
    torch.testing.assert_close(images["video_pred"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(images["mae_target"], expected_frames)
    torch.testing.assert_close(images["mae_pred"], expected_frames, atol=1e-5, rtol=0)
    # masked patches show the mean colour, visible ones the input
    masked_pixels = unpatchify_frames(mask_mae[..., None].expand(-1, -1, 8 * 8 * 3).float(), 8, 32).bool()
    fill = mean.view(1, 3, 1, 1).expand_as(expected_frames)
    torch.testing.assert_close(images["mae_masked"][masked_pixels], fill[masked_pixels], atol=1e-6, rtol=0)
    torch.testing.assert_close(images["mae_masked"][~masked_pixels], expected_frames[~masked_pixels])
    assert not torch.allclose(images["video_masked"], expected)


def test_no_weight_decay_names_real_parameters():
    names = dict(tiny_model().named_parameters())
    assert tiny_model().no_weight_decay() == {"mae_decoder.mask_token", "video_decoder.mask_token"}
    learned = tiny_model(learn_pos_embed=True)
    skip = learned.no_weight_decay()
    assert {"encoder.pos_embed", "encoder.time_embed", "video_decoder.time_embed"} <= skip
    assert skip <= set(dict(learned.named_parameters())) and "mae_decoder.mask_token" in names


def test_state_dict_keys_follow_timm_naming():
    keys = set(tiny_model().state_dict())
    assert {"encoder.patch_embed.proj.weight", "encoder.blocks.1.attn.qkv.weight", "encoder.blocks.0.mlp.fc2.bias",
            "encoder.norm.weight", "mae_decoder.head.weight", "video_decoder.blocks.1.norm2.weight"} <= keys
    assert not any("pos_embed" in k or "time_embed" in k for k in keys)  # fixed codes are not checkpointed


def test_model_module_import_is_light():
    code = ("import sys, expmae.model; "
            "print([m for m in ('timm', 'transformers', 'deepspeed', 'accelerate') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
