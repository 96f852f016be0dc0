"""The model's speed paths against the plain paths they replace: visible-only patch embedding, the packed
two-branch encoder pass (pack_branches), segment attention and the VideoMAE target without un-normalisation."""
import pytest
import torch

from conftest import TINY_MODEL as TINY
from expmae.model import (create_model, gather_tokens, patchify_clips, patchify_frames, random_masking,
                          tube_masking)
from expmae.vit import Attention



def tiny_model(**overrides):
    torch.manual_seed(0)
    model = create_model("tiny", **{**TINY, **overrides})
    with torch.no_grad():  # norms and biases start at 1 / 0: perturb everything so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def clips_like(model, batch=3, seed=0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)


def test_gather_tokens_picks_rows_per_sample_and_from_a_shared_code():
    x = torch.randn(3, 10, 5, requires_grad=True)
    ids = torch.tensor([[9, 0, 4], [1, 1, 2], [5, 8, 3]])
    expected = torch.stack([x[b, ids[b]] for b in range(3)])
    torch.testing.assert_close(gather_tokens(x, ids), expected, atol=0, rtol=0)
    torch.testing.assert_close(gather_tokens(x[:1], ids), torch.stack([x[0, ids[b]] for b in range(3)]), atol=0, rtol=0)
    gather_tokens(x, ids).sum().backward()  # repeated ids accumulate their gradient
    assert x.grad[1, 1].eq(2).all() and x.grad[1, 0].eq(0).all() and x.grad.sum() == 9 * 5


def test_patchify_with_ids_gathers_exactly_those_patches():
    x = torch.randn(2, 3, 4, 32, 32)
    ids = tube_masking(2, 2, 16, 0.75, generator=torch.Generator().manual_seed(0)).ids_keep
    torch.testing.assert_close(patchify_clips(x, 2, 8, ids), gather_tokens(patchify_clips(x, 2, 8), ids),
                               atol=0, rtol=0)
    ids = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(1)).ids_keep
    frames = x[:, :, 1]
    torch.testing.assert_close(patchify_frames(frames, 8, ids), gather_tokens(patchify_frames(frames, 8), ids),
                               atol=0, rtol=0)


@pytest.mark.parametrize("learn_pos_embed", [False, True])
def test_visible_embedding_equals_the_convolution_stem(learn_pos_embed):
    """Embedding only the visible tubelets / patches (a matmul) gives the Conv3d / Conv2d stem's tokens at those
    positions, and the same stem (and position code) gradients."""
    enc = tiny_model(learn_pos_embed=learn_pos_embed).encoder
    clips = clips_like(tiny_model())
    ids = tube_masking(3, 2, 16, 0.75, generator=torch.Generator().manual_seed(0)).ids_keep
    frame_ids = random_masking(3, 16, 0.75, generator=torch.Generator().manual_seed(1)).ids_keep
    frames = clips[:, :, 2]
    params = [p for p in enc.parameters() if p.requires_grad]

    def tokens_and_grads(fast):
        clip_tokens = (enc.embed_visible_clips(clips, ids) if fast else gather_tokens(enc.embed_clips(clips), ids))
        frame_tokens = (enc.embed_visible_frames(frames, frame_ids) if fast
                        else gather_tokens(enc.embed_frames(frames), frame_ids))
        loss = (clip_tokens.sin().sum() + frame_tokens.cos().sum())
        return clip_tokens.detach(), frame_tokens.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    slow, fast = tokens_and_grads(False), tokens_and_grads(True)
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-5, rtol=1e-5)
    grads = {n: (a, b) for n, (a, b) in zip([n for n, p in enc.named_parameters() if p.requires_grad],
                                            zip(fast[2], slow[2]))}
    assert grads["patch_embed.proj.weight"][0].abs().sum() > 0
    if learn_pos_embed:
        assert grads["pos_embed"][0].abs().sum() > 0 and grads["time_embed"][0].abs().sum() > 0
    for name, (a, b) in grads.items():
        if b is None:
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


def test_segment_attention_is_attention_on_each_segment():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    a, b = torch.randn(2, 5, 32), torch.randn(2, 11, 32)
    packed = attn(torch.cat([a, b], dim=1), segments=[5, 11])
    torch.testing.assert_close(packed, torch.cat([attn(a), attn(b)], dim=1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(attn(torch.cat([a, b], dim=1)), packed, atol=1e-3)  # plain attention mixes them


@pytest.mark.parametrize("grad_checkpointing, class_token", [(False, False), (True, False), (False, True)])
def test_packed_branches_match_separate_passes(grad_checkpointing, class_token):
    """pack_branches runs the encoder once on [frame tokens | clip tokens] and is otherwise the same model:
    same losses, predictions and gradients as the two separate passes (the path the HF oracle checks). With a
    class token, each branch's sequence gets its own."""
    clips = clips_like(tiny_model(), batch=4)
    g = torch.Generator().manual_seed(0)
    mask_mae = random_masking(4, 16, 0.75, generator=g).mask
    mask_video = tube_masking(4, 2, 16, 0.75, generator=g).mask  # 4 kept per step: 8 clip tokens, 4 frame tokens
    frame_idx = torch.tensor([0, 3, 1, 2])

    def run(pack):
        model = tiny_model(pack_branches=pack, grad_checkpointing=grad_checkpointing, class_token=class_token)
        seen = []
        model.encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
        out = model(clips, frame_idx=frame_idx, mask_mae=mask_mae, mask_video=mask_video)
        forward_calls = list(seen)  # checkpointing calls the blocks again in backward
        out["loss"].backward()
        return out, {n: p.grad for n, p in model.named_parameters()}, forward_calls

    (out, grads, seen), (packed, packed_grads, packed_seen) = run(False), run(True)
    P = int(class_token)
    assert seen == [(4, P + 4, 64), (4, P + 8, 64)] and packed_seen == [(4, 2 * P + 12, 64)]
    for key in ("loss", "loss_mae", "loss_video", "pred_mae", "pred_video"):
        torch.testing.assert_close(packed[key], out[key], atol=1e-5, rtol=1e-5, msg=key)
    assert torch.equal(packed["mask_video"], out["mask_video"]) and torch.equal(packed["frame_idx"], frame_idx)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_pack_branches_is_a_no_op_for_single_branch_modes():
    clips = clips_like(tiny_model())
    for mode in ("mae", "videomae"):
        a = tiny_model(mode=mode)(clips, generator=torch.Generator().manual_seed(0))
        b = tiny_model(mode=mode, pack_branches=True)(clips, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a["loss"], b["loss"])


def _videomae_target_reference(clips, mean, std, t, p):
    """transformers' VideoMAEForPreTraining label computation (norm_pix_loss), step by step."""
    frames = clips.transpose(1, 2) * torch.tensor(std)[None, None, :, None, None] \
        + torch.tensor(mean)[None, None, :, None, None]
    B, T, C, H, W = frames.shape
    frames = frames.view(B, T // t, t, C, H // p, p, W // p, p).permute(0, 1, 4, 6, 2, 5, 7, 3).contiguous()
    frames = frames.view(B, T // t * H // p * W // p, t * p * p, C)
    normed = (frames - frames.mean(dim=-2, keepdim=True)) / (frames.var(dim=-2, unbiased=True, keepdim=True).sqrt()
                                                             + 1e-6)
    return normed.view(B, T // t * H // p * W // p, t * p * p * C)


def test_video_target_matches_videomae_including_near_constant_tubelets():
    """The target skips the un-normalisation (it cancels, but for eps, which becomes eps / std). A tubelet whose
    spread is ~eps tells eps from eps / std. std values are powers of two so that x * std is exact in float32."""
    mean, std = (0.0, 0.0, 0.0), (0.25, 0.5, 2.0)
    model = tiny_model(mean=mean, std=std)
    clips = clips_like(model, batch=2)
    clips[0, :, 0:2, 0:8, 0:8] = 1e-6 * torch.randn(3, 2, 8, 8)  # tubelet 0 of clip 0: std ~ 1e-6
    ours = model.video_target(clips)
    reference = _videomae_target_reference(clips, mean, std, 2, 8)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    assert reference[0, 0].abs().max() > 0.1  # the near-constant tubelet is really in the eps regime
    # targets of a subset of tubelets (the loss asks for the masked ones) are those rows of the full target
    ids = tube_masking(2, 2, 16, 0.75, generator=torch.Generator().manual_seed(0)).ids_masked
    torch.testing.assert_close(model.video_target(clips, ids), gather_tokens(ours, ids), atol=0, rtol=0)
    # non-normalised targets are the un-normalised tubelets
    plain = tiny_model(mean=(0.5, 0.25, 0.0), std=std, norm_pix_loss=False).video_target(clips)
    torch.testing.assert_close(plain, patchify_clips(clips * torch.tensor(std).view(1, 3, 1, 1, 1)
                                                     + torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1, 1), 2, 8))
