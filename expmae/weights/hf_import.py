"""transformers' VideoMAE (VideoMAEModel / ForPreTraining / ForVideoClassification) and ViTMAE (ViTMAEModel /
ForPreTraining) into expMAE: their keys and config.json (hf_export.py writes such folders).

Keys: ``[videomae.]embeddings.patch_embeddings.projection`` (Conv3d), ``encoder.layer.i.attention.attention.
{query,key,value}`` (no key bias), ``attention.output.dense``, ``intermediate.dense``, ``output.dense``,
``layernorm_before / _after``, ``layernorm`` (absent with use_mean_pooling: then ``fc_norm`` after pooling);
pretraining adds ``encoder_to_decoder``, ``mask_token``, ``decoder.decoder_layers.i``, ``decoder.norm``,
``decoder.head``. ViTMAE (transformers 5: ``layers.i.attention.{q,k,v,o}_proj``, ``mlp.fc1 / fc2``; 4.x names as
VideoMAE) has a class token (kept: class_token=True, its slot's code folded into it) and stores its 2-D sin-cos code.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from expmae.weights.layouts import Collector
from expmae.weights.mae import OTHER_TOKENS, fc_norm, with_slot_code, without_class_slot

HF_MODEL_TYPES = ("videomae", "vit_mae")
# layers as named in memory (transformers 5), in hub / 4.x files, and as transformers 5's save_pretrained writes
# a ViTMAE decoder (decoder.decoder_encoder.layer)
_LAYER = re.compile(r"^(?:encoder\.layer|layers|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)\.(\d+)\."
                    r"(.+)\.(weight|bias)$")
# timm's names inside a block -> transformers': VideoMAE and 4.x ViTMAE, transformers 5's ViTMAE
LAYER_NAMES = {
    "encoder.layer.": {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                       "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "q": "attention.attention.query",
                       "k": "attention.attention.key", "v": "attention.attention.value"},
    "layers.": {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj"}}
_BLOCK_PARTS = {theirs: ours for names in LAYER_NAMES.values() for ours, theirs in names.items()}
_SAVED_BIASES = {"attention.attention.q_bias": "attention.attention.query.bias",
                 "attention.attention.v_bias": "attention.attention.value.bias"}
_VIDEOMAE = {"embeddings.patch_embeddings.projection.": "encoder.patch_embed.proj.", "layernorm.": "encoder.norm.",
             "encoder_to_decoder.": "video_decoder.embed.", "mask_token": "video_decoder.mask_token",
             "decoder.norm.": "video_decoder.norm.", "decoder.head.": "video_decoder.head."}
_VITMAE = {"embeddings.patch_embeddings.projection.": "encoder.patch_embed.proj.", "layernorm.": "encoder.norm.",
           "decoder.decoder_embed.": "mae_decoder.embed.", "decoder.mask_token": "mae_decoder.mask_token",
           "decoder.decoder_norm.": "mae_decoder.norm.", "decoder.decoder_pred.": "mae_decoder.head."}


def _layer(key: str, value: torch.Tensor, c: Collector, part: str, src: str) -> bool:
    """One tensor of a transformers layer -> the expMAE block; False if ``key`` is not a layer's."""
    for old, new in _SAVED_BIASES.items():  # the names save_pretrained / hub files use for VideoMAE's q / v biases
        key = key[:-len(old)] + new if key.endswith(old) else key
    m = _LAYER.match(key)
    if m is None or m.group(2) not in _BLOCK_PARTS:
        return False
    part = part if key.startswith("decoder.") else "encoder"
    c.block(f"{part}.blocks.{m.group(1)}", f"{_BLOCK_PARTS[m.group(2)]}.{m.group(3)}", value, src)
    return True


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def convert_hf_videomae(keys: dict, c: Collector) -> str:
    has_norm = any(_strip(k, "videomae.") == "layernorm.weight" for k in keys)
    for raw, value in keys.items():
        key = _strip(raw, "videomae.")
        target = next((new + key[len(old):] for old, new in _VIDEOMAE.items() if key.startswith(old)), None)
        if target is not None:
            c.put(target, value, raw)
        elif _layer(key, value, c, "video_decoder", raw):
            continue
        elif key.startswith("classifier."):
            c.drop(raw, "classifier head")
        elif key.startswith("fc_norm."):  # use_mean_pooling
            fc_norm(raw, value, has_norm, c)
        elif key.endswith("position_embeddings"):  # VideoMAE's fixed table (not saved by transformers itself)
            c.put("encoder.pos_embed" if not key.startswith("decoder") else "video_decoder.pos_embed", value, raw)
        else:
            c.unknown(raw)
    if not has_norm and not any(_strip(k, "videomae.").startswith("fc_norm.") for k in keys):
        c.report.notes.append("the source has no final norm (use_mean_pooling=True without its fc_norm, e.g. a bare "
                              "VideoMAEModel): norm.* stays unset")
    return "videomae"


def convert_hf_vitmae(keys: dict, c: Collector) -> str:
    pos_embed = next((v for k, v in keys.items() if _strip(k, "vit.") == "embeddings.position_embeddings"), None)
    for raw, value in keys.items():
        key = _strip(raw, "vit.")
        target = next((new + key[len(old):] for old, new in _VITMAE.items() if key.startswith(old)), None)
        if target is not None:
            c.put(target, value, raw)
        elif _layer(key, value, c, "mae_decoder", raw):
            continue
        elif key == "embeddings.cls_token":
            c.put("encoder.cls_token", with_slot_code(value, pos_embed, c), raw)
        elif key.split(".")[-1] in OTHER_TOKENS:
            c.drop(raw, "distillation / register token (the expMAE encoder has only a class token)")
        elif key in ("embeddings.position_embeddings", "decoder.decoder_pos_embed"):
            target = "encoder.pos_embed" if key.startswith("embeddings") else "mae_decoder.pos_embed"
            c.put(target, without_class_slot(value, True, raw, c), raw)
        elif key.startswith("classifier."):
            c.drop(raw, "classifier head")
        else:
            c.unknown(raw)
    return "separable"


# ----------------------------------------------------------------------------------------------- config.json
def read_hf_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed config.json of a transformers VideoMAE / ViTMAE folder, or None for any other folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    return data if isinstance(data, dict) and data.get("model_type") in HF_MODEL_TYPES else None


def config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """ExpMAEConfig fields of a transformers VideoMAE / ViTMAE config.json (the source's own size)."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r}; the expMAE encoder uses gelu")
    hidden, dec = hf["hidden_size"], hf["decoder_hidden_size"]
    fields = dict(img_size=hf["image_size"], patch_size=hf["patch_size"], in_chans=hf.get("num_channels", 3),
                  embed_dim=hidden, depth=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                  mlp_ratio=hf["intermediate_size"] / hidden, norm_pix_loss=hf.get("norm_pix_loss", True))
    if hf["model_type"] == "videomae":
        fields.update(num_frames=hf["num_frames"], tubelet_size=hf["tubelet_size"], qkv_bias=hf.get("qv_bias", True),
                      video_decoder_embed_dim=dec, video_decoder_depth=hf["decoder_num_hidden_layers"],
                      video_decoder_num_heads=hf["decoder_num_attention_heads"], mode="videomae",
                      position_code="videomae")
    else:
        fields.update(qkv_bias=hf.get("qkv_bias", True), mae_decoder_embed_dim=dec,
                      mae_decoder_depth=hf["decoder_num_hidden_layers"],
                      mae_decoder_num_heads=hf["decoder_num_attention_heads"],
                      mae_mask_ratio=hf.get("mask_ratio", 0.75), mode="mae", position_code="separable", class_token=True)
    return fields


def hf_weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: a transformers folder without model.safetensors or pytorch_model.bin "
                            "(sharded checkpoints: load and re-save them in one file)")
