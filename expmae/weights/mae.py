"""facebookresearch/mae checkpoints and timm ViTs (an image ViT: Conv2d stem, class token, pos_embed with a
class slot; MAE adds decoder_embed / mask_token / decoder_pos_embed / decoder_blocks / decoder_norm /
decoder_pred). The encoder maps 1:1 (the stem is inflated to a static tubelet), the MAE decoder becomes the
frame decoder. The class token is kept (ExpMAEConfig.class_token; the code of its slot in pos_embed is folded into
it: exact, as its position never changes); distillation / register tokens have no place in expMAE: dropped.
"""
from __future__ import annotations

import math

from expmae.weights.layouts import Collector, block_key

_DECODER = {"decoder_embed.": "mae_decoder.embed.", "decoder_norm.": "mae_decoder.norm.",
            "decoder_pred.": "mae_decoder.head.", "decoder_blocks.": "mae_decoder.blocks."}
OTHER_TOKENS = ("dist_token", "reg_token")


def convert_mae(keys: dict, c: Collector) -> str:
    """MAE / timm ViT keys -> expMAE keys; the 2-D sin-cos code of MAE is expMAE's separable code."""
    for key, value in keys.items():
        if key == "cls_token":
            c.put("encoder.cls_token", with_slot_code(value, keys.get("pos_embed"), c), key)
        elif key in OTHER_TOKENS:
            c.drop(key, "distillation / register token (the expMAE encoder has only a class token)")
        elif key.startswith(("head.", "head_dist.", "pre_logits.")):
            c.drop(key, "classifier head")
        elif key in ("pos_embed", "decoder_pos_embed"):  # (1, 1 + N, D): a class slot first
            target = "encoder.pos_embed" if key == "pos_embed" else "mae_decoder.pos_embed"
            c.put(target, without_class_slot(value, "cls_token" in keys, key, c), key)
        elif key == "mask_token":
            c.put("mae_decoder.mask_token", value, key)
        elif key.startswith("fc_norm."):
            fc_norm(key, value, "norm.weight" in keys, c)
        else:
            target = next((new + key[len(old):] for old, new in _DECODER.items() if key.startswith(old)),
                          f"encoder.{key}")
            blk = block_key(target)
            c.block(*blk, value, key) if blk else c.put(target, value, key)
    return "separable"


def fc_norm(key: str, value, has_norm: bool, c: Collector) -> None:
    """A norm after mean pooling (finetuned models): the final per-token norm when the source has no other."""
    if has_norm:
        c.drop(key, "norm after pooling (the encoder's own norm is loaded)")
        return
    c.put("encoder.norm." + key.split(".")[-1], value, key)
    if key.endswith("weight"):
        c.report.notes.append("fc_norm (applied after mean pooling in the source) loaded as the final per-token norm")


def has_class_slot(pos_embed, has_class_token: bool) -> bool:
    """Whether the first row of a (1, 1 + N, D) code is a class token's slot (N a square grid)."""
    n = pos_embed.shape[1] - 1
    return has_class_token and n > 0 and math.isqrt(n) ** 2 == n


def with_slot_code(cls_token, pos_embed, c: Collector):
    """The class token with the code of its slot added (expMAE's class token has code zero, MAE's slot is zero)."""
    if pos_embed is None or not has_class_slot(pos_embed, True) or not pos_embed[:, :1].any():
        return cls_token
    c.report.notes.append("the class slot's position code folded into the class token (exact)")
    return cls_token + pos_embed[:, :1].to(cls_token.dtype)


def without_class_slot(pos_embed, has_class_token: bool, key: str, c: Collector):
    """(1, 1 + N, D) -> (1, N, D) when the first row is a class token's slot; the encoder's slot code goes into the
    class token (with_slot_code), a decoder's must be zero, as MAE's (expMAE's decoder gives the class token none)."""
    if not has_class_slot(pos_embed, has_class_token):
        return pos_embed
    if "decoder" in key and pos_embed[:, :1].any():
        c.report.notes.append(f"{key}: the class slot's nonzero code is dropped (the frame decoder gives it none)")
    return pos_embed[:, 1:]
