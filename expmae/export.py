"""``expmae-export``: a pretraining checkpoint, or public MAE / VideoMAE / VideoMAE V2 / transformers / timm
weights, into an expmae encoder folder (clip encoder + timm frame encoder + config.json), and with ``--hf`` also
``OUT/hf/``, a transformers VideoMAEModel folder (the clip encoder), with ``--hf-vitmae`` ``OUT/hf_vitmae/``, a
transformers ViTMAEModel folder (the frame encoder), each with a model card.

The work is done by expmae.checkpoint (reading run checkpoints, ZeRO shards included) and expmae.weights
(foreign layouts in, timm and transformers folders out); their public functions are re-exported here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from expmae import add_version_argument
from expmae.checkpoint import WEIGHT_SOURCES, read_checkpoint, read_model_checkpoint  # noqa: F401 (public API)
from expmae.jobs import one_line
from expmae.model import ExpMAEEncoder
from expmae.weights import hf_export as hf_folders
from expmae.weights import (CONFIG_NAME, ENCODER_WEIGHTS, TIMM_WEIGHTS, ImportReport,  # noqa: F401
                            convert_state_dict, create_timm_model, import_encoder, init_from, is_weights_source,
                            load_encoder, load_pretrained_weights, read_encoder_config, save_encoder, unwrap_encoder,
                            verify_encoder_folder)


def export_encoder(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, weights: str = "auto",
                   model: str | None = None, overrides: Mapping[str, Any] | None = None, overwrite: bool = False,
                   verify: bool = True, hf: bool = False, hf_vitmae: bool = False) -> dict:
    """Write an encoder folder from a pretraining checkpoint, or from foreign weights (a file, a transformers
    folder, an encoder folder), imported at the size of the source's own config, else of registry entry ``model``
    (+ ExpMAEConfig ``overrides``). ``hf``: also ``out_dir/hf`` (transformers VideoMAE), ``hf_vitmae``: also
    ``out_dir/hf_vitmae`` (transformers ViTMAE). With ``verify``, the written
    folders are loaded back (expmae, timm, transformers) and compared with the encoder. Returns a summary dict."""
    source = Path(checkpoint)
    summary: dict[str, Any] = {"out_dir": str(out_dir)}
    if is_weights_source(source):
        encoder, report = import_encoder(source, model, overrides)
        info = {"checkpoint": str(source.resolve()), "weights": f"import:{report.layout}", "dtype": report.dtype}
        summary["import"] = report.as_dict()
        model_name, stride = model, None
    else:
        if overrides:
            raise ValueError("overrides apply to imported weights; a pretraining checkpoint has its own config")
        ckpt = read_checkpoint(source, weights)
        encoder = ExpMAEEncoder(ckpt.config)
        encoder.load_state_dict(ckpt.encoder_state, strict=True)
        info, model_name, stride = ckpt.info, ckpt.info.get("model_name", model), ckpt.info.get("sample_stride")
    encoder.eval()
    if hf:  # fail before writing anything
        hf_folders.check_hf_exportable(encoder)
    if hf_vitmae:
        hf_folders.check_vitmae_exportable(encoder)
    out = save_encoder(encoder, out_dir, source=info, sample_stride=stride, model_name=model_name, overwrite=overwrite)
    summary.update(source=info, feature_dim=encoder.cfg.embed_dim)
    if verify:
        summary["verify"] = verify_encoder_folder(out, encoder)
    if hf:
        folder = hf_folders.save_hf_videomae(encoder, out / hf_folders.HF_FOLDER, source=info, encoder_folder=out)
        summary["hf"] = str(folder)
        if verify:
            summary["verify"]["hf_max_abs_diff"] = hf_folders.verify_hf_folder(folder, encoder)
    if hf_vitmae:
        folder = hf_folders.save_hf_vitmae(encoder, out / hf_folders.HF_VITMAE_FOLDER, source=info, encoder_folder=out)
        summary["hf_vitmae"] = str(folder)
        if verify:
            summary["verify"]["hf_vitmae_max_abs_diff"] = hf_folders.verify_hf_vitmae_folder(folder, encoder)
    return summary


# ----------------------------------------------------------------------------------------------- CLI
def _parse_overrides(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE (an ExpMAEConfig field, e.g. img_size=224)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="expmae-export",
        description="Export the pretrained expMAE encoder (clip encoder + timm frame encoder + config.json, and a "
                    "transformers VideoMAE folder with --hf, a ViTMAE one with --hf-vitmae), or import public MAE / "
                    "VideoMAE / transformers weights "
                    "into an expMAE encoder folder.")
    add_version_argument(p)
    p.add_argument("checkpoint", help="pretraining run / checkpoints / step_* folder, a MAE / VideoMAE weights file, "
                                      "a transformers VideoMAE / ViTMAE folder or an encoder folder")
    p.add_argument("out_dir", type=Path, help="encoder folder to write")
    p.add_argument("--weights", choices=WEIGHT_SOURCES, default="auto",
                   help="which weights of a checkpoint: auto (fp32 weights.safetensors, else the consolidated "
                        "DeepSpeed shards, else accelerate's model.safetensors) or force one")
    p.add_argument("--model", default=None, help="registry size for a weights file without a config "
                                                 "(tiny, small, base, large)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="ExpMAEConfig overrides for imported weights, e.g. img_size=224 num_frames=16")
    p.add_argument("--hf", action="store_true", help="also write OUT/hf: a transformers VideoMAEModel folder + model "
                                                     "card (needs position_code=videomae, no class token)")
    p.add_argument("--hf-vitmae", action="store_true", help="also write OUT/hf_vitmae: the frame encoder as a "
                                                            "transformers ViTMAEModel folder + model card (needs "
                                                            "class_token=true)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the reload-and-compare check")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = export_encoder(args.checkpoint, args.out_dir, weights=args.weights, model=args.model,
                                 overrides=_parse_overrides(args.set), overwrite=args.overwrite, verify=args.verify,
                                 hf=args.hf, hf_vitmae=args.hf_vitmae)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        print(f"expmae-export: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
