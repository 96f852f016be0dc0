"""An expMAE encoder out as transformers folders: the clip encoder as a VideoMAEModel (``hf/``: videomae code, no
class token), the frame encoder as a ViTMAEModel (``hf_vitmae/``: a class token, any frame code, as ViTMAE stores
its code). transformers writes the files itself after a strict load; each folder gets a model card.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from expmae.pos_embed import get_videomae_sincos_table
from expmae.weights.folder import commit_folder
from expmae.weights.hf_cards import videomae_model_card, vitmae_model_card
from expmae.weights.hf_import import LAYER_NAMES
from expmae.weights.timm_frame import frame_encoder_timm_state_dict

HF_FOLDER = "hf"  # the clip encoder as a transformers VideoMAEModel
HF_VITMAE_FOLDER = "hf_vitmae"  # the frame encoder as a transformers ViTMAEModel


def hf_videomae_config(cfg) -> dict[str, Any]:
    """VideoMAEConfig arguments reproducing an expMAE clip encoder (use_mean_pooling=False keeps the final norm
    as ``layernorm`` on every token, eps 1e-6 as expMAE's, the decoder sizes those of the clip decoder)."""
    return dict(image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
                num_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size, hidden_size=cfg.embed_dim,
                num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-6,
                qv_bias=cfg.qkv_bias, use_mean_pooling=False, norm_pix_loss=cfg.norm_pix_loss,
                decoder_hidden_size=cfg.video_decoder_embed_dim,
                decoder_num_hidden_layers=cfg.video_decoder_depth,
                decoder_num_attention_heads=cfg.video_decoder_num_heads,
                decoder_intermediate_size=int(cfg.video_decoder_embed_dim * cfg.mlp_ratio))


def hf_videomae_state(encoder) -> dict[str, torch.Tensor]:
    """VideoMAEModel keys for an ExpMAEEncoder. The key bias is dropped: transformers' VideoMAE has none, and it
    adds the same constant to every attention score of a query, which softmax ignores (exact)."""
    check_hf_exportable(encoder)
    src = {k: v.detach().to("cpu", torch.float32) for k, v in encoder.state_dict().items()}
    out = {"embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
           "layernorm.weight": src["norm.weight"], "layernorm.bias": src["norm.bias"]}
    out.update(_layers(src, encoder.cfg, "encoder.layer.", key_bias=False))
    return {k: v.contiguous() for k, v in out.items()}


def _layers(src: dict, cfg, prefix: str, key_bias: bool) -> dict[str, torch.Tensor]:
    """The blocks of a timm-keyed state dict under transformers' layer names (LAYER_NAMES[prefix]); attn.qkv split
    into q, k, v (its rows, or bias entries, come in that order)."""
    D, names, out = cfg.embed_dim, LAYER_NAMES[prefix], {}
    for i in range(cfg.depth):
        b, h = f"blocks.{i}.", f"{prefix}{i}."
        for ours in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                out[f"{h}{names[ours]}.{kind}"] = src[f"{b}{ours}.{kind}"]
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            for j, part in enumerate("qkv"):
                if kind == "weight" or part != "k" or key_bias:
                    out[f"{h}{names[part]}.{kind}"] = src[f"{b}attn.qkv.{kind}"][j * D:(j + 1) * D]
    return out


def check_hf_exportable(encoder) -> None:
    """One-line error for an encoder transformers' VideoMAE cannot express."""
    cfg = encoder.cfg
    if cfg.position_code != "videomae":
        raise ValueError(f"--hf: this encoder uses position_code={cfg.position_code!r} (the 2-D + temporal code), "
                         "which transformers' VideoMAE cannot express (it adds VideoMAE's fixed 1-D table); "
                         "pretrain or import with position_code=videomae to export it to transformers")
    if cfg.class_token:
        raise ValueError("--hf: this encoder has a class token (class_token=True), which transformers' VideoMAE "
                         "cannot express (it has none); --hf-vitmae exports its frame encoder as a ViTMAEModel")
    fixed = get_videomae_sincos_table(cfg.num_time * cfg.num_patches, cfg.embed_dim)
    if cfg.learn_pos_embed and not torch.allclose(encoder.pos_embed.detach().cpu().float(), fixed, atol=1e-6):
        raise ValueError("--hf: this encoder learned its position table (learn_pos_embed=True); transformers' "
                         "VideoMAE only has the fixed sin-cos table")


def hf_vitmae_config(cfg) -> dict[str, Any]:
    """ViTMAEConfig arguments reproducing an expMAE frame encoder (eps 1e-6 as expMAE's); mask ratio, norm_pix_loss
    and decoder sizes are the MAE frame branch's, so ViTMAEForPreTraining gets a (fresh) decoder of that shape."""
    return dict(image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
                hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-6,
                qkv_bias=cfg.qkv_bias, mask_ratio=cfg.mae_mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
                decoder_hidden_size=cfg.mae_decoder_embed_dim, decoder_num_hidden_layers=cfg.mae_decoder_depth,
                decoder_num_attention_heads=cfg.mae_decoder_num_heads,
                decoder_intermediate_size=int(cfg.mae_decoder_embed_dim * cfg.mlp_ratio))


def check_vitmae_exportable(encoder) -> None:
    """One-line error for an encoder transformers' ViTMAE cannot express. Any frame position code can be: ViTMAE
    stores its code (position_embeddings), so the frame code goes in as it is, behind a zero class slot."""
    if not encoder.cfg.class_token:
        raise ValueError("--hf-vitmae: this encoder has no class token (class_token=False), and transformers' ViTMAE "
                         "always prepends one, which every patch attends to; pretrain or import with class_token=true "
                         "to export it as a ViTMAEModel (the timm export has no such limit)")


def hf_vitmae_state(encoder, prefix: str = "layers.") -> dict[str, torch.Tensor]:
    """ViTMAEModel keys (layer names after ``prefix``, see hf_import.LAYER_NAMES) for the frame encoder of an
    ExpMAEEncoder: its timm state dict (Conv2d stem, cls_token, pos_embed with the class slot) renamed."""
    check_vitmae_exportable(encoder)
    src = {k: v.to("cpu", torch.float32) for k, v in frame_encoder_timm_state_dict(encoder).items()}
    out = {"embeddings.cls_token": src["cls_token"], "embeddings.position_embeddings": src["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
           "layernorm.weight": src["norm.weight"], "layernorm.bias": src["norm.bias"]}
    out.update(_layers(src, encoder.cfg, prefix, key_bias=True))
    return {k: v.contiguous() for k, v in out.items()}


def _transformers(name: str):
    # deferred: optional dependency: transformers (+0.4 s after torch), only the --hf / --hf-vitmae exports need it
    import transformers

    return getattr(transformers, name)


def _save(model, card: str, out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    model.save_pretrained(tmp)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    commit_folder(tmp, out_dir, overwrite=True)
    return out_dir


def save_hf_videomae(encoder, out_dir: str | os.PathLike, *, source: dict | None = None,
                     encoder_folder: str | os.PathLike | None = None) -> Path:
    """Write ``out_dir`` as a transformers VideoMAEModel folder (config.json + model.safetensors, written by
    transformers itself after a strict load) and a model card README.md."""
    state = hf_videomae_state(encoder)
    model = _transformers("VideoMAEModel")(_transformers("VideoMAEConfig")(**hf_videomae_config(encoder.cfg)))
    model.load_state_dict(state, strict=True)
    return _save(model, videomae_model_card(encoder.cfg, source or {}, Path(out_dir), encoder_folder), out_dir)


def save_hf_vitmae(encoder, out_dir: str | os.PathLike, *, source: dict | None = None,
                   encoder_folder: str | os.PathLike | None = None) -> Path:
    """Write ``out_dir`` as a transformers ViTMAEModel folder of the frame encoder (config.json + model.safetensors,
    written by transformers itself after a strict load) and a model card README.md."""
    model = _transformers("ViTMAEModel")(_transformers("ViTMAEConfig")(**hf_vitmae_config(encoder.cfg)))
    prefix = "layers." if any(k.startswith("layers.") for k in model.state_dict()) else "encoder.layer."
    model.load_state_dict(hf_vitmae_state(encoder, prefix), strict=True)
    return _save(model, vitmae_model_card(encoder.cfg, source or {}, Path(out_dir), encoder_folder), out_dir)


def _compare(folder, what: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> float:
    diff = (got - want).abs().max().item()
    if not diff <= atol:
        raise RuntimeError(f"{folder}: the {what} export differs from the encoder by {diff:.3g} (> {atol})")
    return diff


@torch.no_grad()
def verify_hf_folder(folder: str | os.PathLike, encoder, atol: float = 1e-4) -> float:
    """Max |VideoMAEModel.from_pretrained(folder) - encoder| over a random clip; raises above atol."""
    cfg = encoder.cfg
    clips = torch.randn(1, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size,
                        generator=torch.Generator().manual_seed(0))
    hf = _transformers("VideoMAEModel").from_pretrained(str(folder)).eval()
    return _compare(folder, "transformers", hf(clips.transpose(1, 2)).last_hidden_state,
                    encoder.float().eval().forward_clips(clips), atol)


@torch.no_grad()
def verify_hf_vitmae_folder(folder: str | os.PathLike, encoder, atol: float = 1e-4) -> float:
    """Max |ViTMAEModel.from_pretrained(folder) - encoder.forward_frames| over random images, all patches kept in
    token order (mask_ratio=0, noise = the token index); raises above atol."""
    cfg = encoder.cfg
    images = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    hf = _transformers("ViTMAEModel").from_pretrained(str(folder), mask_ratio=0.0).eval()
    noise = torch.arange(cfg.num_patches, dtype=torch.float32).expand(len(images), -1)
    return _compare(folder, "ViTMAE", hf(images, noise=noise).last_hidden_state,
                    encoder.float().eval().forward_frames(images), atol)
