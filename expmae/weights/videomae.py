"""MCG-NJU/VideoMAE and OpenGVLab/VideoMAEv2 checkpoints (one key layout): ``encoder.`` prefixed blocks with
``attn.qkv.weight`` and separate ``attn.q_bias`` / ``attn.v_bias`` (no key bias), optional layer scale
``gamma_1`` / ``gamma_2``; pretraining adds ``encoder_to_decoder`` (no bias), ``mask_token``, ``decoder.blocks``,
``decoder.norm``, ``decoder.head`` (-> the clip decoder); finetuning ``fc_norm`` + ``head``. The position code is
VideoMAE's 1-D sin-cos table over all tubelets (not stored unless learned): position_code="videomae".
"""
from __future__ import annotations

from expmae.weights.layouts import Collector, block_key
from expmae.weights.mae import fc_norm

_DECODER = {"encoder_to_decoder.": "video_decoder.embed.", "mask_token": "video_decoder.mask_token",
            "decoder.": "video_decoder."}


def convert_videomae(keys: dict, c: Collector) -> str:
    has_norm = any(k in keys for k in ("norm.weight", "encoder.norm.weight"))
    for key, value in keys.items():
        if key.startswith("head."):
            c.drop(key, "classifier head")
        elif key.startswith("fc_norm."):
            fc_norm(key, value, has_norm, c)
        else:
            target = next((new + key[len(old):] for old, new in _DECODER.items() if key.startswith(old)), None)
            if target is None:
                target = key if key.startswith("encoder.") else f"encoder.{key}"
            blk = block_key(target)
            c.block(*blk, value, key) if blk else c.put(target, value, key)
    return "videomae"
