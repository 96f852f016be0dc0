"""Crash-safe training checkpoints on top of ``accelerate.save_state`` (DeepSpeed-sharded under DeepSpeed).

Every rank calls :func:`save_checkpoint`; a checkpoint is written to ``step_N.tmp/`` and renamed when complete, so
a kill at any moment leaves the previous one usable. :func:`read_model_checkpoint` / :func:`read_checkpoint` read a
run folder, its ``checkpoints/`` or one ``step_*`` folder, ZeRO shards included, safely. The folder's layout and
the order weights are read in: docs/guides/pretraining.md ("The checkpoints folder").
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors.torch import load_file, save_file

from expmae.files import atomic_path, write_json
from expmae.model import ExpMAEConfig, ExpMAEEncoder, get_config, upgrade_state_dict
from expmae.model_config import upgrade_config_dict

WEIGHTS_NAME = "weights.safetensors"
MODEL_CONFIG_NAME = "model_config.json"
TRAIN_STATE_NAME = "train_state.json"
LATEST_NAME = "latest"
WEIGHT_SOURCES = ("auto", "weights", "zero", "accelerate")
ACCELERATE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # accelerate's save_state outside DeepSpeed
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / TRAIN_STATE_NAME).is_file()]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None. Scans rather than trusting ``latest``, which a kill between
    the rename and the pointer update can leave one checkpoint behind."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoint folder from a checkpoint, a ``checkpoints/`` folder or a run folder."""
    path = Path(path)
    if (path / TRAIN_STATE_NAME).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path}: no complete checkpoint here (expected step_*/{TRAIN_STATE_NAME})")


def remove_partial(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Delete leftovers of saves or prunes that were killed mid-way (main process only)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    stale = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.suffix in (".tmp", ".old")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def save_checkpoint(
    accelerator,
    model,
    ckpt_dir: str | os.PathLike,
    step: int,
    train_state: dict,
    model_config: dict,
    keep_last: int,
) -> Path:
    """Save the full training state as ``ckpt_dir/step_XXXXXXX``; call on every rank. Returns the folder."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_dir_name(step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(tmp))
    # Collective under ZeRO-3 (gathers the 16-bit weights), so every rank calls it.
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "step": str(step)})
        write_json(tmp / MODEL_CONFIG_NAME, model_config, indent=1, sort_keys=True, newline=False)
        write_json(tmp / TRAIN_STATE_NAME, train_state, indent=1, sort_keys=True, newline=False)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        if final.exists():  # a rerun reaching the same step: park the old copy before replacing it
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        with atomic_path(ckpt_dir / LATEST_NAME) as ptr:
            ptr.write_text(final.name + "\n", encoding="utf-8")
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            parked = old.with_name(old.name + ".old")  # rename first: a half-deleted folder is never "complete"
            os.replace(old, parked)
            shutil.rmtree(parked, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict:
    """Restore model, optimizer, scaler and every rank's RNG states; return the saved ``train_state``."""
    path = resolve_checkpoint(path)
    accelerator.load_state(str(path))
    return json.loads((path / TRAIN_STATE_NAME).read_text(encoding="utf-8"))


def load_model_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(model_config, state_dict)`` of a checkpoint (or the newest one under a run folder), read safely
    from safetensors: everything an exporter needs, no accelerate or DeepSpeed required."""
    path = resolve_checkpoint(path)
    return read_model_config(path), upgrade_state_dict(load_file(str(path / WEIGHTS_NAME)))


def read_model_config(ckpt: Path) -> dict:
    """A checkpoint's saved ExpMAEConfig fields, an earlier expmae's field names under today's."""
    path = ckpt / MODEL_CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    return upgrade_config_dict(data) if isinstance(data, dict) else data


# ----------------------------------------------------------------------------------------------- reading
def encoder_shapes(cfg: ExpMAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no init
        return {k: tuple(v.shape) for k, v in ExpMAEEncoder(cfg).state_dict().items()}


def describe_config(cfg: ExpMAEConfig) -> str:
    return (f"embed_dim={cfg.embed_dim}, depth={cfg.depth}, num_heads={cfg.num_heads}, patch_size={cfg.patch_size}, "
            f"tubelet_size={cfg.tubelet_size}, img_size={cfg.img_size}")


def config_from_dict(data: Mapping[str, Any], where: str) -> ExpMAEConfig:
    """ExpMAEConfig from saved JSON (fields an earlier version named otherwise are renamed; fields this version does
    not know are ignored with a warning)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object of ExpMAEConfig fields, got {type(data).__name__}")
    data = upgrade_config_dict(dict(data))
    known = {f.name for f in fields(ExpMAEConfig)}
    unknown = sorted(set(data) - known)
    if unknown:  # written by another expmae version; the weights' shapes are still checked strictly on load
        warnings.warn(f"{where}: ignoring unknown ExpMAEConfig field(s) {unknown}", stacklevel=2)
    return ExpMAEConfig(**{k: v for k, v in data.items() if k in known})


def strip_wrappers(key: str) -> str:
    # DDP / DeepSpeed ("module."), torch.compile ("_orig_mod."), detection-style ("backbone.")
    while True:
        for prefix in ("module.", "_orig_mod.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key


_WRAPPER_KEYS = ("model", "module", "state_dict", "model_state", "model_state_dict")


def unwrap_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: ``{'model': ...}`` (MAE, VideoMAE), ``{'module': ...}`` (DeepSpeed,
    VideoMAE V2), ``{'state_dict': ...}``, nested any number of times."""
    seen = []
    while isinstance(obj, Mapping) and not any(torch.is_tensor(v) for v in obj.values()):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise ValueError(f"{where}: no state dict found (top-level keys {sorted(map(str, obj))[:8]}; "
                             f"expected tensors or one of {list(_WRAPPER_KEYS)})")
        seen.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a dict of tensors, got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if torch.is_tensor(v)}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, loaded safely: safetensors, or torch.load(weights_only=True) (MAE /
    VideoMAE .pth files store their argparse Namespace beside the weights: that class alone is allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle / zip errors of many kinds
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot be loaded safely with torch.load(weights_only=True) ({reason}); "
                         "re-save its state dict (e.g. as .safetensors) where you trust the file") from None
    return unwrap_state_dict(obj, str(path))


@dataclass
class PretrainCheckpoint:
    config: ExpMAEConfig
    encoder_state: dict[str, torch.Tensor]  # ExpMAEEncoder keys, float32
    info: dict[str, Any]  # where it came from: checkpoint, weights, dtype, step, model_name, sample_stride


def _zero_tag(ckpt: Path) -> str | None:
    """The DeepSpeed tag folder holding ZeRO shards (accelerate names it pytorch_model), or None."""
    latest = ckpt / "latest"
    tags = [latest.read_text(encoding="utf-8").strip()] if latest.is_file() else []
    for tag in [*tags, "pytorch_model"]:
        if tag and (ckpt / tag).is_dir() and any((ckpt / tag).glob("*optim_states.pt")):
            return tag
    return None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a step_* folder, a ``checkpoints/`` folder or a run folder (the newest one)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    try:
        return resolve_checkpoint(path)
    except FileNotFoundError:
        pass
    # A folder of weights without train_state.json (an accelerate save_state made elsewhere) is fine too.
    if path.is_dir() and (_zero_tag(path) or any((path / n).is_file() for n in (WEIGHTS_NAME, *ACCELERATE_WEIGHTS))):
        return path
    raise FileNotFoundError(f"{path}: not a pretraining checkpoint (expected a run folder, its checkpoints/ or a "
                            f"step_* folder holding {WEIGHTS_NAME}, model.safetensors or DeepSpeed ZeRO shards)")


def _run_config(ckpt: Path) -> dict:
    """The run's saved config.yaml (run/checkpoints/step_*/ -> run/config.yaml), or {}."""
    path = ckpt.parent.parent / "config.yaml"
    if ckpt.parent.name != "checkpoints" or not path.is_file():  # only a run folder's own config counts
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    return data if isinstance(data, dict) else {}


def _checkpoint_config(ckpt: Path, run_cfg: dict) -> ExpMAEConfig:
    path = ckpt / MODEL_CONFIG_NAME
    if path.is_file():
        return config_from_dict(read_model_config(ckpt), str(path))
    model = run_cfg.get("model") if isinstance(run_cfg.get("model"), dict) else None
    if model and model.get("name"):  # an older checkpoint: rebuild from the run's training config
        fields = upgrade_config_dict({k: v for k, v in model.items() if k != "name" and v is not None})
        return get_config(model["name"], **fields)
    raise FileNotFoundError(f"{ckpt}: no {MODEL_CONFIG_NAME} and no run config.yaml beside it: the model config "
                            "is needed to rebuild the encoder")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: cannot read as safetensors ({str(exc).splitlines()[0]})") from None


def _consolidate_zero(ckpt: Path, tag: str) -> dict[str, torch.Tensor]:
    # DeepSpeed's own reader: fp32 master weights merged from every rank's shard, on the CPU, any world size.
    # It unpickles DeepSpeed's files (weights_only=False): only point it at checkpoints you trust.
    # deferred: optional dependency: DeepSpeed (+0.2 s and its start-up log lines), only for ZeRO shards
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # it prints progress: keep stdout for our JSON summary
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{ckpt / tag}: cannot consolidate the DeepSpeed ZeRO shards ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None


def _checkpoint_weights(ckpt: Path, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    if weights not in WEIGHT_SOURCES:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_SOURCES}")
    tag = _zero_tag(ckpt)
    plain = ckpt / WEIGHTS_NAME
    accelerate = next((ckpt / n for n in ACCELERATE_WEIGHTS if (ckpt / n).is_file()), None)
    if weights == "weights" or (weights == "auto" and plain.is_file()):
        if not plain.is_file():
            raise FileNotFoundError(f"{ckpt}: no {WEIGHTS_NAME}")
        state = load_safetensors(plain)
        # Under bf16 / fp16 training this file holds 16-bit weights: the fp32 master copy in the shards is better.
        if weights == "weights" or tag is None or all(v.dtype == torch.float32 for v in state.values()
                                                      if v.is_floating_point()):
            return state, WEIGHTS_NAME
    if weights == "zero" or (weights == "auto" and tag is not None):
        if tag is None:
            raise FileNotFoundError(f"{ckpt}: no DeepSpeed ZeRO shards (*optim_states.pt in a tag folder)")
        return _consolidate_zero(ckpt, tag), f"deepspeed-zero:{tag}"
    if accelerate is None:
        raise FileNotFoundError(f"{ckpt}: no model weights ({WEIGHTS_NAME}, {', '.join(ACCELERATE_WEIGHTS)} or "
                                "DeepSpeed shards)")
    if accelerate.suffix == ".safetensors":
        return load_safetensors(accelerate), accelerate.name
    return read_state_dict(accelerate), accelerate.name


def encoder_state_from_model_state(state: Mapping[str, torch.Tensor], cfg: ExpMAEConfig,
                                   where: str) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` part of an ExpMAE state dict (any wrapper prefix), checked against ``cfg``; float32."""
    state = {strip_wrappers(k): v for k, v in state.items()}
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        heads = sorted({k.split(".")[0] for k in state})[:6]
        raise ValueError(f"{where}: no encoder.* weights (top-level names: {heads}); not an expMAE checkpoint")
    expected = encoder_shapes(cfg)
    missing, unexpected = sorted(set(expected) - set(encoder)), sorted(set(encoder) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: encoder weights do not match the model config ({describe_config(cfg)}): "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for k, shape in expected.items():
        if tuple(encoder[k].shape) != shape:
            raise ValueError(f"{where}: encoder.{k} has shape {tuple(encoder[k].shape)}, the model config "
                             f"({describe_config(cfg)}) expects {shape}")
    return {k: encoder[k].detach().to("cpu", torch.float32).contiguous() for k in expected}


def read_model_checkpoint(path: str | os.PathLike, weights: str = "auto") -> tuple[ExpMAEConfig, dict, dict]:
    """(config, the whole ExpMAE state dict with wrapper prefixes stripped, info) of a pretraining checkpoint:
    what rebuilding the full model (decoders too) needs. info: checkpoint, weights, dtype and, where the run
    recorded them, step, model_name, sample_stride. ``weights`` as in :func:`read_checkpoint`."""
    ckpt = find_checkpoint(path)
    run_cfg = _run_config(ckpt)
    cfg = _checkpoint_config(ckpt, run_cfg)
    state, source = _checkpoint_weights(ckpt, weights)
    state = upgrade_state_dict({strip_wrappers(k): v for k, v in state.items()})
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()})
    info: dict[str, Any] = {"checkpoint": str(ckpt.resolve()), "weights": source, "dtype": ",".join(dtypes)}
    train_state = ckpt / "train_state.json"
    if train_state.is_file():
        info["step"] = json.loads(train_state.read_text(encoding="utf-8")).get("step")
    model = run_cfg.get("model") if isinstance(run_cfg.get("model"), dict) else {}
    data = run_cfg.get("data") if isinstance(run_cfg.get("data"), dict) else {}
    if model.get("name"):
        info["model_name"] = model["name"]
    if data.get("sample_stride"):
        info["sample_stride"] = int(data["sample_stride"])
    return cfg, state, info


def read_checkpoint(path: str | os.PathLike, weights: str = "auto") -> PretrainCheckpoint:
    """Config + float32 encoder weights of a pretraining checkpoint (plain, DDP or DeepSpeed ZeRO-1/2/3).

    ``weights``: "auto" (weights.safetensors if float32, else the consolidated ZeRO shards, else accelerate's
    model.safetensors), or force one: "weights", "zero", "accelerate".
    """
    cfg, state, info = read_model_checkpoint(path, weights)
    where = f"{info['checkpoint']} ({info['weights']})"
    return PretrainCheckpoint(cfg, encoder_state_from_model_state(state, cfg, where), info)
