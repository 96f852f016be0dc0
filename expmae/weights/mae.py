"""facebookresearch/mae checkpoints and timm ViTs (an image ViT: Conv2d stem, class token, pos_embed with a
class slot; MAE adds decoder_embed / mask_token / decoder_pos_embed / decoder_blocks / decoder_norm /
decoder_pred). The encoder maps 1:1 (the stem is inflated to a static tubelet), the MAE decoder becomes the
frame decoder. Class tokens have no place in expMAE (its frame encoder is a ViT without one): dropped and reported.
"""
from __future__ import annotations

import math

from expmae.weights.layouts import Collector, block_key

_DECODER = {"decoder_embed.": "decoder.embed.", "decoder_norm.": "decoder.norm.", "decoder_pred.": "decoder.head.",
            "decoder_blocks.": "decoder.blocks."}
CLASS_TOKENS = ("cls_token", "dist_token", "reg_token")


def convert_mae(keys: dict, c: Collector) -> str:
    """MAE / timm ViT keys -> expMAE keys; the 2-D sin-cos code of MAE is expMAE's separable code."""
    for key, value in keys.items():
        if key in CLASS_TOKENS:
            c.drop(key, "class token (the expMAE encoder has none)")
        elif key.startswith(("head.", "head_dist.", "pre_logits.")):
            c.drop(key, "classifier head")
        elif key in ("pos_embed", "decoder_pos_embed"):  # (1, 1 + N, D): a class slot first
            target = "encoder.pos_embed" if key == "pos_embed" else "decoder.pos_embed"
            c.put(target, without_class_slot(value, "cls_token" in keys), key)
        elif key == "mask_token":
            c.put("decoder.mask_token", value, key)
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


def without_class_slot(pos_embed, has_class_token: bool):
    """(1, 1 + N, D) -> (1, N, D) when the first row is a class token's slot (N a square grid)."""
    n = pos_embed.shape[1] - 1
    return pos_embed[:, 1:] if has_class_token and n > 0 and math.isqrt(n) ** 2 == n else pos_embed
