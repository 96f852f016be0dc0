"""Foreign weights into expMAE, through one path: read the source (a file, a transformers folder, an expmae
encoder folder), convert it (layouts.convert), fit it to the model (layouts.fit), load. ``expmae-export``,
``train.init_from`` and :func:`load_pretrained_weights` all come through here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from expmae.checkpoint import config_from_dict, find_checkpoint, read_model_checkpoint, read_state_dict
from expmae.model import ExpMAEEncoder, get_config, unwrap_model
from expmae.weights.folder import CONFIG_NAME, ENCODER_WEIGHTS, read_encoder_config
from expmae.weights.convert import convert
from expmae.weights.hf_import import config_from_hf, hf_weights_file, read_hf_config
from expmae.weights.layouts import ImportReport, check_class_token, check_position_code, fit


@dataclass
class Source:
    state: Mapping[str, Any]  # as read: a state dict, possibly wrapped ({'model': ...})
    name: str
    config: dict[str, Any] | None  # ExpMAEConfig fields from the source's own config, where it has one


def is_weights_source(path: str | os.PathLike) -> bool:
    """A weights file, a transformers VideoMAE / ViTMAE folder or an expmae encoder folder (not a run)."""
    path = Path(path)
    return path.is_file() or (path.is_dir() and (read_hf_config(path) is not None or (path / ENCODER_WEIGHTS).is_file()))


def read_source(source: str | os.PathLike | Mapping[str, Any]) -> Source:
    if isinstance(source, Mapping):
        return Source(source, "state dict", None)
    path = Path(source)
    if path.is_dir():
        hf = read_hf_config(path)
        if hf is not None:
            return Source(read_state_dict(hf_weights_file(path)), str(path), config_from_hf(hf, str(path / CONFIG_NAME)))
        if (path / ENCODER_WEIGHTS).is_file():
            config = read_encoder_config(path)["expmae"]["config"]
            return Source(read_state_dict(path / ENCODER_WEIGHTS), str(path), dict(config))
        raise FileNotFoundError(f"{path}: not a weights file, a transformers VideoMAE / ViTMAE folder or an expmae "
                                "encoder folder")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    hf = read_hf_config(path.parent) if path.name in ("model.safetensors", "pytorch_model.bin") else None
    return Source(read_state_dict(path), str(path), config_from_hf(hf, str(path.parent / CONFIG_NAME)) if hf else None)


def _load(target: torch.nn.Module, source: Source, strict: bool) -> ImportReport:
    converted, report = convert(source.state, source.name)
    if converted.position_code is None and source.config:  # fixed codes are not stored: the config says which
        converted.position_code = report.position_code = source.config.get("position_code", "separable")
    tensors = fit(converted, target, report, source.name)
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"{source.name}: {report.layout} checkpoint leaves encoder weights {report.missing[:4]} unset "
                         f"and has keys of unknown meaning {report.unexpected[:4]} (strict=False loads the rest)")
    result = target.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:  # cannot happen: fit() checks the keys against the model's
        raise RuntimeError(f"{source.name}: unexpected keys {result.unexpected_keys[:4]}")
    return report


def load_pretrained_weights(model: torch.nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                            strict: bool = True) -> ImportReport:
    """Initialise ``model`` (ExpMAE or ExpMAEEncoder) from MAE / VideoMAE / VideoMAE V2 / transformers VideoMAE /
    ViTMAE / timm ViT / expMAE weights (a path, a transformers folder or a state dict).

    The encoder is loaded strictly; each decoder of an ExpMAE is loaded when the checkpoint has it in the same
    shapes (VideoMAE's -> the clip decoder, MAE's -> the frame decoder), else it keeps its init. Weights trained
    with another position code than ``model.cfg.position_code``, or with a class token where ``model.cfg.class_token``
    is False (or the reverse), are a one-line ValueError naming both. Classifier heads are dropped. All of it is
    listed in the returned report."""
    target = unwrap_model(model)
    return _load(target, read_source(source), strict)


def import_encoder(source: str | os.PathLike, model: str | None = None,
                   overrides: Mapping[str, Any] | None = None) -> tuple[ExpMAEEncoder, ImportReport]:
    """A new ExpMAEEncoder from foreign weights. Its size comes from the source's own config (a transformers or
    expmae folder), else from the registry entry ``model``; ``overrides`` (ExpMAEConfig fields) win over both.
    The position code and the class token are the weights' own unless an override says otherwise (an error)."""
    src = read_source(source)
    if src.config is None and model is None:
        raise ValueError(f"{src.name}: a weights file without a config needs model=NAME (the expMAE size to import it "
                         "into, e.g. --model base)")
    converted, _ = convert(src.state, src.name)
    fields = dict(src.config or {})
    code = converted.position_code or fields.get("position_code")
    if code is not None:
        fields["position_code"] = code
    fields["class_token"] = converted.class_token
    fields.update(overrides or {})
    cfg = config_from_dict(fields, src.name) if model is None else get_config(model, **fields)
    encoder = ExpMAEEncoder(cfg)
    return encoder, _load(encoder, src, strict=True)


def init_from(model: torch.nn.Module, source: str | os.PathLike) -> str:
    """Initialise an ExpMAE for (continued) pretraining from ``source``; returns a one-line description.

    - an expMAE pretraining checkpoint or run folder: the whole model, encoder and decoders (a decoder the
      checkpoint's mode lacks keeps its fresh init; img_size, num_frames and the objective may differ, the
      weight shapes may not);
    - foreign weights (see :func:`load_pretrained_weights`): the encoder, and each decoder whose shapes match.
    Errors are single-line ``FileNotFoundError`` / ``ValueError`` (a position code other than the model's names
    the option to set) and come before any training.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    target = unwrap_model(model)
    if is_weights_source(path):
        report = load_pretrained_weights(model, path, strict=True)
        parts = [p for p in ("mae_decoder", "video_decoder") if getattr(target, p, None) is not None]
        loaded = [p for p in parts if report.decoders.get(p) == "loaded"]
        fresh = [p for p in parts if p not in loaded]
        return (f"encoder from {path} ({report.layout} layout, {len(report.loaded)} tensors)"
                + "".join(f"; {p} from it too" for p in loaded)
                + (f"; {', '.join(fresh)} freshly initialised" if fresh else ""))
    find_checkpoint(path)
    cfg, state, info = read_model_checkpoint(path)
    check_position_code(cfg.position_code, target.cfg, info["checkpoint"])
    check_class_token(cfg.class_token, target.cfg, info["checkpoint"])
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: one line per tensor, keep the first
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise ValueError(f"{info['checkpoint']}: its weights do not fit this model ({detail})") from None
    if any(k.startswith("encoder.") for k in result.missing_keys):
        raise ValueError(f"{info['checkpoint']}: no encoder weights for {result.missing_keys[:4]}")
    fresh = sorted({k.split(".")[0] for k in result.missing_keys})
    step = f" at step {info['step']}" if info.get("step") is not None else ""
    return (f"whole model from {info['checkpoint']}{step}"
            + (f"; {', '.join(fresh)} freshly initialised (not in the checkpoint)" if fresh else ""))


def convert_state_dict(state: Mapping[str, torch.Tensor], cfg, source: str = "state dict"
                       ) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """The ExpMAEEncoder tensors for ``cfg`` of any supported checkpoint, and the report (nothing is loaded)."""
    converted, report = convert(state, source)
    return fit(converted, ExpMAEEncoder(cfg), report, source), report
