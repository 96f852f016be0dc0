"""The frame path of an expMAE encoder as a timm VisionTransformer: its state dict and the timm.create_model call."""
from __future__ import annotations

import torch
from torch import nn

from expmae.model import ExpMAEConfig, unwrap_encoder

_TIMM_FAMILIES = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large"}  # by embed_dim


def frame_encoder_timm_state_dict(model_or_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the frame encoder in timm VisionTransformer keys (see timm_create_kwargs).

    The stem's Conv3d kernel is summed over time (a static tubelet), the frame position code becomes pos_embed (with
    a zero row first for the class token's slot when cfg.class_token: its code is zero, as in MAE).
    Under ZeRO-3 pass a model whose parameters are gathered (e.g. after accelerator.get_state_dict + load).
    """
    encoder = unwrap_encoder(model_or_encoder)
    state = {}
    for key, value in encoder.state_dict().items():
        if key == "time_embed":  # a learned temporal code has no place in an image model
            continue
        if key == "patch_embed.proj.weight":
            value = value.sum(dim=2)
        state[key] = value.detach().clone()
    pos_embed = encoder.frame_pos_embed().detach()
    if encoder.cls_token is not None:  # (1, N, D) -> (1, 1 + N, D)
        pos_embed = torch.cat([pos_embed.new_zeros(1, 1, pos_embed.shape[2]), pos_embed], dim=1)
    state["pos_embed"] = pos_embed.clone()
    return state


def timm_create_kwargs(cfg: ExpMAEConfig | nn.Module) -> tuple[str, dict]:
    """(model_name, kwargs) such that timm.create_model(model_name, pretrained=False, **kwargs) strict-loads
    frame_encoder_timm_state_dict(model) and reproduces encoder.forward_frames (forward_features) and the
    mean-pooled feature (forward / forward_head): global_pool="avg" averages the patch tokens only, also with a class
    token (pass global_pool="token" for the class token instead). Every architecture argument is explicit, so the
    name only picks the closest standard family. Replace num_classes=0 to add a fresh classifier head."""
    cfg = getattr(cfg, "cfg", cfg)
    family = _TIMM_FAMILIES.get(cfg.embed_dim, "vit_base")
    kwargs = dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        # average pooling of the final-normed patch tokens: with fc_norm=False timm keeps `norm` on the tokens and
        # makes fc_norm an Identity (fc_norm=None would move the norm after the pooling instead)
        class_token=cfg.class_token, global_pool="avg", fc_norm=False, num_classes=0,
        # so timm.data.resolve_data_config normalises inputs the way this encoder was trained
        pretrained_cfg_overlay=dict(mean=tuple(cfg.mean), std=tuple(cfg.std)),
    )
    return f"{family}_patch16_224", kwargs
