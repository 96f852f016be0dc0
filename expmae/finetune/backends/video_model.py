"""The model of end-to-end finetuning: a pretrained encoder under a fusion head (:class:`VideoFusionModel`), which of
its blocks learn, and its AdamW groups with layer-wise lr decay (as MAE / VideoMAE finetuning)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Mapping

import torch
from torch import nn

from expmae.model import ExpMAEEncoder
from expmae.vit import LayerNorm
from expmae.weights import load_encoder

VIDEO_BRANCH = "visual"  # the head's input branch fed by the encoder


# ----------------------------------------------------------------------------------------------- model
class VideoFusionModel(nn.Module):
    """Encoder -> mean-pooled tokens (all tokens for a head with ``token_inputs``, e.g. ``attentive``) -> LayerNorm
    (``fc_norm``) -> fusion head (the "visual" branch, beside precomputed feature branches).

    ``fc_norm`` is VideoMAE's / MAE's norm after mean pooling. It stands in for the per-dimension standardisation
    the head applies to precomputed features: statistics measured once would go stale as the encoder (and
    augmentation) moves the pooled features, and dimensions of small spread would then blow up.

    ``unfreeze_blocks`` N >= 0 trains only the encoder's last N blocks and its final norm (MAE's partial
    finetuning); the rest gets no gradients and stays in eval mode (no drop-path). 0 (or ``freeze_encoder``):
    the whole encoder is frozen and only fc_norm and the head learn (probing, end to end); -1: all of it learns.
    """

    def __init__(self, encoder: ExpMAEEncoder, head: nn.Module, *, freeze_encoder: bool = False,
                 unfreeze_blocks: int = -1):
        super().__init__()
        self.unfreeze_blocks = check_unfreeze_blocks(unfreeze_blocks, len(encoder.blocks), freeze_encoder)
        self.encoder, self.head, self.freeze_encoder = encoder, head, self.unfreeze_blocks == 0
        self.fc_norm = LayerNorm(encoder.cfg.embed_dim)
        if self.unfreeze_blocks >= 0:
            encoder.requires_grad_(False)
            for module in self.trained_encoder_modules():
                module.requires_grad_(True)
            self.train(self.training)

    def trained_encoder_modules(self) -> list[nn.Module]:
        """The encoder's modules that learn: its last unfreeze_blocks blocks + final norm (all with -1)."""
        n = self.unfreeze_blocks
        if n < 0:
            return [self.encoder]
        return [*self.encoder.blocks[len(self.encoder.blocks) - n:], self.encoder.norm] if n else []

    def pool(self, clips: torch.Tensor) -> torch.Tensor:
        """Normalised clips (B, C, T, H, W) -> the mean of the encoder's tubelet tokens (B, D), or the tokens
        themselves (B, T'*S, D) for a head with ``token_inputs``; before fc_norm."""
        tokens = self.encoder.forward_clips(clips)[:, self.encoder.num_prefix_tokens:]
        return tokens if getattr(self.head, "token_inputs", False) else tokens.mean(dim=1)

    def forward(self, clips: torch.Tensor, features: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad() if self.freeze_encoder else contextlib.nullcontext():
            pooled = self.pool(clips)
        return self.head({**(features or {}), VIDEO_BRANCH: self.fc_norm(pooled)})

    def train(self, mode: bool = True) -> "VideoFusionModel":
        super().train(mode)
        if self.unfreeze_blocks >= 0:  # frozen parts run as the pretrained encoder did at export: eval mode
            self.encoder.eval()
            for module in self.trained_encoder_modules():
                module.train(mode)
        return self

    def no_weight_decay(self) -> set[str]:
        """Position codes (when learned) and the class token, as in timm's ViT; norms and biases by shape."""
        names = ("pos_embed", "time_embed", "cls_token")
        return {f"encoder.{n}" for n, _ in self.encoder.named_parameters() if n in names}


def check_unfreeze_blocks(unfreeze_blocks: int, depth: int, freeze_encoder: bool = False) -> int:
    """The encoder blocks that learn (-1: all, stem included; 0: none), checked; ``freeze_encoder`` means 0."""
    if not -1 <= unfreeze_blocks <= depth or (freeze_encoder and unfreeze_blocks > 0):
        raise ValueError(f"unfreeze_blocks={unfreeze_blocks}: expected -1 (all) or 0..{depth} (the encoder's depth)"
                         + (", and not above 0 with freeze_encoder" if freeze_encoder else ""))
    return 0 if freeze_encoder else unfreeze_blocks


def load_finetune_encoder(path: str | os.PathLike, drop_path: float = -1.0) -> ExpMAEEncoder:
    """The encoder of an expmae-export folder (or pretraining checkpoint) with stochastic depth ``drop_path``
    (linearly increasing over the blocks); ``drop_path < 0`` keeps the encoder config's ``drop_path_rate``."""
    encoder = load_encoder(path)
    if drop_path >= 0 and drop_path != encoder.cfg.drop_path_rate:
        state = encoder.state_dict()
        encoder = ExpMAEEncoder(dataclasses.replace(encoder.cfg, drop_path_rate=float(drop_path)))
        encoder.load_state_dict(state, strict=True)
    return encoder.train()


# ----------------------------------------------------------------------------------------------- optimisation
def layer_id(name: str, depth: int) -> int:
    """Layer index of a VideoFusionModel parameter for lr decay (MAE's ``get_layer_id_for_vit``, timm's
    ViT group_matcher): 0 for the stem (patch embedding, class token) and position codes, i + 1 for encoder
    block i, depth + 1 for the rest (final norm, fc_norm, head)."""
    if name.startswith("encoder."):
        rest = name[len("encoder."):]
        if rest.startswith(("patch_embed.", "pos_embed", "time_embed", "cls_token")):
            return 0
        if rest.startswith("blocks."):
            return int(rest.split(".")[1]) + 1
    return depth + 1


def layer_decay_param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups, one per (layer, decay or not), each with ``lr_scale = layer_decay ** (depth + 1 - layer)``.

    No weight decay on 1-D parameters (norms, biases) and ``model.no_weight_decay()`` names (position codes, class
    token).
    Frozen parameters are left out. Each group lists its ``param_names``, in model order.
    """
    depth = len(model.encoder.blocks)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip
        group = groups.setdefault((layer, no_decay), {
            "params": [], "param_names": [], "lr_scale": layer_decay ** (depth + 1 - layer),
            "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
