"""Any supported checkpoint into expMAE keys: detect its layout from the key names, run that layout's converter."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from expmae.checkpoint import strip_wrappers, unwrap_state_dict
from expmae.model import upgrade_state_dict
from expmae.weights.hf_import import convert_hf_videomae, convert_hf_vitmae
from expmae.weights.layouts import Collector, Converted, ImportReport, block_key
from expmae.weights.mae import convert_mae
from expmae.weights.videomae import convert_videomae


def detect_layout(keys: Mapping[str, torch.Tensor]) -> str:
    """One of LAYOUTS, from the key names and the stem's rank (Conv2d: an image model, Conv3d: a video model)."""
    stem = next((v for k, v in keys.items() if k.endswith(("patch_embed.proj.weight",
                                                            "patch_embeddings.projection.weight"))), None)
    video = stem is not None and stem.ndim == 5
    if any(k.endswith(("attention.attention.query.weight", "attention.q_proj.weight")) for k in keys):
        return "transformers-videomae" if video else "transformers-vitmae"
    if stem is not None and not video:
        return "mae" if any(k.startswith(("decoder_", "mask_token")) for k in keys) else "timm"
    if any(k.endswith("attn.q_bias") or k.startswith("encoder_to_decoder") for k in keys):
        return "videomae"  # MCG-NJU/VideoMAE and OpenGVLab/VideoMAEv2 share one key layout
    return "expmae"


def convert(state: Mapping[str, torch.Tensor], source: str = "state dict") -> tuple[Converted, ImportReport]:
    """Any supported checkpoint -> expMAE keys + a report (layout, dtype, dropped and unknown keys)."""
    keys = {strip_wrappers(k): v for k, v in unwrap_state_dict(state, source).items()}
    report = ImportReport(source=source, layout=detect_layout(keys))
    report.dtype = ",".join(sorted({str(v.dtype).replace("torch.", "") for v in keys.values() if v.is_floating_point()}))
    collector = Collector(source, report)
    code = CONVERTERS[report.layout](keys, collector)
    converted = Converted(collector.finish(), collector.origin, code, collector.merged)
    report.position_code, report.class_token = code, converted.class_token
    return converted, report


def convert_expmae(keys: dict, c: Collector) -> str | None:
    """expMAE's own keys: a model state dict (encoder. / mae_decoder. / video_decoder.; an earlier expMAE's names
    upgraded) or a bare encoder."""
    keys = upgrade_state_dict(dict(keys))
    full = any(k.startswith(("encoder.", "mae_decoder.", "video_decoder.")) for k in keys)
    for key, value in keys.items():
        key = key if full else f"encoder.{key}"
        if (blk := block_key(key)) is not None:
            c.block(*blk, value, key)
        else:
            c.put(key, value, key)
    if "encoder.time_embed" in c.state:
        return "separable"
    return "videomae" if "encoder.pos_embed" in c.state else None  # fixed codes are not stored


CONVERTERS: dict[str, Callable[[dict, Collector], str | None]] = {
    "mae": convert_mae, "timm": convert_mae, "videomae": convert_videomae,
    "transformers-videomae": convert_hf_videomae, "transformers-vitmae": convert_hf_vitmae, "expmae": convert_expmae}
