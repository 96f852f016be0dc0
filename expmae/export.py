"""The pretrained encoder out of a checkpoint, public MAE / VideoMAE weights into expMAE, and loading it back.

Encoder folder (written by ``expmae-export`` / :func:`export_encoder`, read by :func:`load_encoder` and timm)::

    encoder.safetensors   the clip encoder: tubelet Conv3d stem + blocks + final norm (ExpMAEEncoder keys)
    model.safetensors     the frame encoder as a timm VisionTransformer state dict (strict load)
    config.json           timm's hub config (architecture, model_args, pretrained_cfg with input size and
                          mean/std), so ``timm.create_model("local-dir:FOLDER", pretrained=True)`` works, plus
                          an "expmae" section: the full ExpMAEConfig, the exact explicit timm.create_model call,
                          the clip sampling used in pretraining, the source checkpoint, a weights hash.

Checkpoints (see expmae.checkpoint): a run folder, its ``checkpoints/`` or one ``step_*`` folder. Weights come
from ``weights.safetensors`` when it holds float32, else from the DeepSpeed ZeRO shards, consolidated to fp32
on the CPU for any world size (``deepspeed.utils.zero_to_fp32``), else from accelerate's ``model.safetensors``.

Import (:func:`load_pretrained_weights`): facebookresearch/mae (``checkpoint['model']``: Conv2d stem, cls
token, fixed sin-cos ``pos_embed`` with a cls slot, ``decoder_*``), MCG-NJU/VideoMAE and OpenGVLab/VideoMAEv2
(``model`` / ``module`` wrappers, ``encoder.`` prefixes, Conv3d stem, ``attn.q_bias`` / ``attn.v_bias`` and
no key bias, optional layer scale ``gamma_1`` / ``gamma_2``, ``fc_norm`` + ``head`` after finetuning) and
timm ViTs. Decoders, class tokens and classifier heads are dropped and reported.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from expmae import add_version_argument
from expmae.model import (ExpMAEConfig, ExpMAEEncoder, frame_encoder_timm_state_dict, get_config,
                          timm_create_kwargs)

ENCODER_WEIGHTS = "encoder.safetensors"
TIMM_WEIGHTS = "model.safetensors"  # the name timm's local-dir / hub loader looks for
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
WEIGHT_SOURCES = ("auto", "weights", "zero", "accelerate")
ACCELERATE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # accelerate's save_state outside DeepSpeed


# ----------------------------------------------------------------------------------------------- helpers
def unwrap_encoder(model: torch.nn.Module) -> ExpMAEEncoder:
    """The ExpMAEEncoder of an ExpMAE model (DDP / DeepSpeed-wrapped or not), or the encoder itself."""
    model = getattr(model, "module", model)  # DistributedDataParallel / DeepSpeed engine
    encoder = getattr(model, "encoder", model)
    if not isinstance(encoder, ExpMAEEncoder):
        raise TypeError(f"expected an ExpMAE model or ExpMAEEncoder, got {type(model).__name__}")
    return encoder


def _encoder_shapes(cfg: ExpMAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no init
        return {k: tuple(v.shape) for k, v in ExpMAEEncoder(cfg).state_dict().items()}


def _describe(cfg: ExpMAEConfig) -> str:
    return (f"embed_dim={cfg.embed_dim}, depth={cfg.depth}, num_heads={cfg.num_heads}, patch_size={cfg.patch_size}, "
            f"tubelet_size={cfg.tubelet_size}, img_size={cfg.img_size}")


def config_from_dict(data: Mapping[str, Any], where: str) -> ExpMAEConfig:
    """ExpMAEConfig from saved JSON (fields this version does not know are ignored with a warning)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object of ExpMAEConfig fields, got {type(data).__name__}")
    known = {f.name for f in fields(ExpMAEConfig)}
    unknown = sorted(set(data) - known)
    if unknown:  # written by another expmae version; the weights' shapes are still checked strictly on load
        warnings.warn(f"{where}: ignoring unknown ExpMAEConfig field(s) {unknown}", stacklevel=2)
    return ExpMAEConfig(**{k: v for k, v in data.items() if k in known})


def _strip_wrappers(key: str) -> str:
    # DDP / DeepSpeed ("module."), torch.compile ("_orig_mod."), detection-style ("backbone.")
    while True:
        for prefix in ("module.", "_orig_mod.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- checkpoints
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
    from expmae.checkpoint import WEIGHTS_NAME, resolve_checkpoint

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
    import yaml

    path = ckpt.parent.parent / "config.yaml"
    if ckpt.parent.name != "checkpoints" or not path.is_file():  # only a run folder's own config counts
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    return data if isinstance(data, dict) else {}


def _checkpoint_config(ckpt: Path, run_cfg: dict) -> ExpMAEConfig:
    from expmae.checkpoint import MODEL_CONFIG_NAME

    path = ckpt / MODEL_CONFIG_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON ({exc})") from None
        return config_from_dict(data, str(path))
    model = run_cfg.get("model") if isinstance(run_cfg.get("model"), dict) else None
    if model and model.get("name"):  # an older checkpoint: rebuild from the run's training config
        return get_config(model["name"], **{k: v for k, v in model.items() if k != "name" and v is not None})
    raise FileNotFoundError(f"{ckpt}: no {MODEL_CONFIG_NAME} and no run config.yaml beside it: the model config "
                            "is needed to rebuild the encoder")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: cannot read as safetensors ({str(exc).splitlines()[0]})") from None


def _consolidate_zero(ckpt: Path, tag: str) -> dict[str, torch.Tensor]:
    # DeepSpeed's own reader: fp32 master weights merged from every rank's shard, on the CPU, any world size.
    # It unpickles DeepSpeed's files (weights_only=False): only point it at checkpoints you trust.
    import contextlib
    import logging

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # it prints progress: keep stdout for our JSON summary
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{ckpt / tag}: cannot consolidate the DeepSpeed ZeRO shards ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None


def _checkpoint_weights(ckpt: Path, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    from expmae.checkpoint import WEIGHTS_NAME

    if weights not in WEIGHT_SOURCES:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_SOURCES}")
    tag = _zero_tag(ckpt)
    plain = ckpt / WEIGHTS_NAME
    accelerate = next((ckpt / n for n in ACCELERATE_WEIGHTS if (ckpt / n).is_file()), None)
    if weights == "weights" or (weights == "auto" and plain.is_file()):
        if not plain.is_file():
            raise FileNotFoundError(f"{ckpt}: no {WEIGHTS_NAME}")
        state = _load_safetensors(plain)
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
        return _load_safetensors(accelerate), accelerate.name
    return read_state_dict(accelerate), accelerate.name


def encoder_state_from_model_state(state: Mapping[str, torch.Tensor], cfg: ExpMAEConfig,
                                   where: str) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` part of an ExpMAE state dict (any wrapper prefix), checked against ``cfg``; float32."""
    state = {_strip_wrappers(k): v for k, v in state.items()}
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        heads = sorted({k.split(".")[0] for k in state})[:6]
        raise ValueError(f"{where}: no encoder.* weights (top-level names: {heads}); not an expMAE checkpoint")
    expected = _encoder_shapes(cfg)
    missing, unexpected = sorted(set(expected) - set(encoder)), sorted(set(encoder) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: encoder weights do not match the model config ({_describe(cfg)}): "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for k, shape in expected.items():
        if tuple(encoder[k].shape) != shape:
            raise ValueError(f"{where}: encoder.{k} has shape {tuple(encoder[k].shape)}, the model config "
                             f"({_describe(cfg)}) expects {shape}")
    return {k: encoder[k].detach().to("cpu", torch.float32).contiguous() for k in expected}


def read_model_checkpoint(path: str | os.PathLike, weights: str = "auto") -> tuple[ExpMAEConfig, dict, dict]:
    """(config, the whole ExpMAE state dict with wrapper prefixes stripped, info) of a pretraining checkpoint:
    what rebuilding the full model (decoders too) needs. info: checkpoint, weights, dtype and, where the run
    recorded them, step, model_name, sample_stride. ``weights`` as in :func:`read_checkpoint`."""
    ckpt = find_checkpoint(path)
    run_cfg = _run_config(ckpt)
    cfg = _checkpoint_config(ckpt, run_cfg)
    state, source = _checkpoint_weights(ckpt, weights)
    state = {_strip_wrappers(k): v for k, v in state.items()}
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


# ----------------------------------------------------------------------------------------------- encoder folder
def timm_model_args(cfg: ExpMAEConfig) -> tuple[str, dict, dict]:
    """(timm model name, architecture kwargs, pretrained_cfg) of the exported frame encoder."""
    name, kwargs = timm_create_kwargs(cfg)
    kwargs = dict(kwargs)
    kwargs.pop("pretrained_cfg_overlay", None)  # normalisation goes into pretrained_cfg instead
    pretrained_cfg = {
        "input_size": [cfg.in_chans, cfg.img_size, cfg.img_size], "mean": list(cfg.mean), "std": list(cfg.std),
        # face crops are used whole (no border crop), resized bilinearly as in expmae.data
        "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear", "fixed_input_size": True,
        "first_conv": "patch_embed.proj", "classifier": "head", "num_classes": 0,
    }
    return name, kwargs, pretrained_cfg


def timm_create_call(folder: str | os.PathLike, cfg: ExpMAEConfig) -> str:
    """The explicit ``timm.create_model(...)`` call that strict-loads the folder's frame encoder."""
    name, kwargs, pcfg = timm_model_args(cfg)
    overlay = {"file": str(Path(folder) / TIMM_WEIGHTS), "mean": tuple(pcfg["mean"]), "std": tuple(pcfg["std"]),
               "input_size": tuple(pcfg["input_size"]), "crop_pct": 1.0, "interpolation": "bilinear"}
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay={overlay!r}, {args})"


def _commit_folder(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move a finished temp folder into place; an existing export is replaced only after the new one is whole."""
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def save_encoder(model: torch.nn.Module, out_dir: str | os.PathLike, *, source: Mapping[str, Any] | None = None,
                 sample_stride: int | None = None, model_name: str | None = None, overwrite: bool = False) -> Path:
    """Write an encoder folder for an ExpMAE model or ExpMAEEncoder (its current weights, as float32)."""
    from safetensors.torch import save_file

    encoder = unwrap_encoder(model)
    cfg = encoder.cfg
    out_dir = Path(out_dir)
    clip_state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in encoder.state_dict().items()}
    frame_state = {k: v.detach().to("cpu", torch.float32).contiguous()
                   for k, v in frame_encoder_timm_state_dict(encoder).items()}
    name, kwargs, pcfg = timm_model_args(cfg)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(clip_state, str(tmp / ENCODER_WEIGHTS), metadata={"format": "pt", "expmae": "clip-encoder"})
        save_file(frame_state, str(tmp / TIMM_WEIGHTS), metadata={"format": "pt", "expmae": "timm-frame-encoder"})
        config = {
            # timm's hub / local-dir format: timm.create_model("local-dir:<folder>", pretrained=True)
            "architecture": name, "num_classes": 0, "num_features": cfg.embed_dim, "global_pool": "avg",
            "model_args": kwargs, "pretrained_cfg": pcfg,
            "expmae": {
                "format_version": FORMAT_VERSION,
                "model_name": model_name,
                "config": cfg.to_dict(),
                "encoder_weights": ENCODER_WEIGHTS,
                "encoder_weights_sha256": _sha256(tmp / ENCODER_WEIGHTS),
                "feature_dim": cfg.embed_dim,
                "clip": {"num_frames": cfg.num_frames, "tubelet_size": cfg.tubelet_size, "img_size": cfg.img_size,
                         "patch_size": cfg.patch_size, "sample_stride": sample_stride,
                         "mean": list(cfg.mean), "std": list(cfg.std)},
                "timm": {"weights": TIMM_WEIGHTS, "model_name": name, "kwargs": kwargs,
                         "create_model": timm_create_call(out_dir.resolve(), cfg),
                         "create_model_local_dir": f"timm.create_model('local-dir:{out_dir.resolve()}', pretrained=True)"},
                "source": dict(source or {}),
            },
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # safetensors writes 0600 files; give them what open() would
            os.chmod(f, 0o666 & ~umask)
        _commit_folder(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _folder_of(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent if path.is_file() and path.name in (CONFIG_NAME, ENCODER_WEIGHTS, TIMM_WEIGHTS) else path


def read_encoder_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of an encoder folder (one-line errors for anything else)."""
    folder = _folder_of(path)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: not an expmae encoder folder (no {CONFIG_NAME}; make one with expmae-export)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path}: invalid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("expmae"), dict) or "config" not in config["expmae"]:
        raise ValueError(f"{cfg_path}: no 'expmae' section: not written by expmae-export")
    version = config["expmae"].get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: encoder folder format_version={version!r}, this expmae reads {FORMAT_VERSION}")
    return config


def load_encoder(path: str | os.PathLike, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> ExpMAEEncoder:
    """The clip encoder (tubelet stem + blocks + norm) of an encoder folder, in eval mode.

    Also accepts a pretraining checkpoint / run folder (exported on the fly). ``encoder.forward_clips(clips)``
    gives tokens (B, T/t * N, D), ``encoder.forward_frames(images)`` (B, N, D); ``encoder.cfg`` has the rest.
    Call ``.train()`` to finetune it.
    """
    folder = _folder_of(path)
    if not (folder / CONFIG_NAME).is_file() and folder.is_dir():
        try:
            ckpt = read_checkpoint(folder)
        except FileNotFoundError:
            ckpt = None
        if ckpt is not None:
            encoder = ExpMAEEncoder(ckpt.config)
            encoder.load_state_dict(ckpt.encoder_state, strict=True)
            return encoder.to(device=device, dtype=dtype).eval()
    config = read_encoder_config(folder)
    cfg = config_from_dict(config["expmae"]["config"], str(folder / CONFIG_NAME))
    weights = folder / config["expmae"].get("encoder_weights", ENCODER_WEIGHTS)
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: {weights.name} is missing")
    state = _load_safetensors(weights)
    expected = _encoder_shapes(cfg)
    bad = [k for k in expected if k not in state or tuple(state[k].shape) != expected[k]]
    bad += sorted(set(state) - set(expected))
    if bad:
        k = bad[0]
        got = tuple(state[k].shape) if k in state else "absent"
        raise ValueError(f"{weights}: key {k!r} is {got}, the config in {CONFIG_NAME} expects "
                         f"{expected.get(k, 'no such key')} ({len(bad)} mismatching keys)")
    encoder = ExpMAEEncoder(cfg)
    encoder.load_state_dict(state, strict=True)
    return encoder.to(device=device, dtype=dtype).eval()


def create_timm_model(path: str | os.PathLike, **kwargs):
    """The folder's frame encoder as a timm VisionTransformer (strict load; eval mode).

    ``kwargs`` go to timm.create_model, e.g. ``num_classes=6`` for a fresh classifier head.
    """
    import timm

    folder = _folder_of(path)
    read_encoder_config(folder)
    return timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True, **kwargs).eval()


def export_encoder(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, weights: str = "auto",
                   model: str | None = None, overrides: Mapping[str, Any] | None = None, overwrite: bool = False,
                   verify: bool = True) -> dict:
    """Write an encoder folder from a pretraining checkpoint, or from public MAE / VideoMAE weights.

    A checkpoint file (.pth/.pt/.bin/.safetensors) is imported with :func:`load_pretrained_weights` into the
    registry model ``model`` (+ ExpMAEConfig ``overrides``). With ``verify``, the written folder is loaded back
    (expmae and timm) and compared with the source encoder. Returns a summary dict.
    """
    source = Path(checkpoint)
    summary: dict[str, Any] = {"out_dir": str(out_dir)}
    if source.is_file():
        if model is None:
            raise ValueError(f"{source}: a weights file needs model=NAME (the expMAE size to import it into)")
        cfg = get_config(model, **dict(overrides or {}))
        encoder = ExpMAEEncoder(cfg)
        report = load_pretrained_weights(encoder, source, strict=True)
        info = {"checkpoint": str(source.resolve()), "weights": f"import:{report.layout}", "dtype": report.dtype}
        summary["import"] = report.as_dict()
        model_name, stride = model, None
    else:
        if overrides:
            raise ValueError("overrides apply to imported weights files; a pretraining checkpoint has its own config")
        ckpt = read_checkpoint(source, weights)
        encoder = ExpMAEEncoder(ckpt.config)
        encoder.load_state_dict(ckpt.encoder_state, strict=True)
        info, model_name, stride = ckpt.info, ckpt.info.get("model_name", model), ckpt.info.get("sample_stride")
    encoder.eval()
    out = save_encoder(encoder, out_dir, source=info, sample_stride=stride, model_name=model_name, overwrite=overwrite)
    summary.update(source=info, feature_dim=encoder.cfg.embed_dim)
    if verify:
        summary["verify"] = verify_encoder_folder(out, encoder)
    return summary


@torch.no_grad()
def verify_encoder_folder(folder: str | os.PathLike, encoder: ExpMAEEncoder, atol: float = 1e-4) -> dict:
    """Load the folder back (expmae clip path, timm frame path) and compare with ``encoder`` on random input."""
    cfg = encoder.cfg
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    clips = torch.randn(1, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)
    reference = encoder.float().eval()
    clip_diff = (load_encoder(folder).forward_clips(clips) - reference.forward_clips(clips)).abs().max().item()
    result = {"clip_max_abs_diff": clip_diff}
    try:
        timm_model = create_timm_model(folder)
    except ImportError:  # timm is a dependency, but the clip path is verified either way
        timm_model = None
    if timm_model is not None:
        frame_diff = (timm_model.forward_features(images) - reference.forward_frames(images)).abs().max().item()
        result["timm_frame_max_abs_diff"] = frame_diff
    worst = max(result.values())
    if not worst <= atol:
        raise RuntimeError(f"{folder}: the exported encoder differs from the source by {worst:.3g} (> {atol})")
    return result


# ----------------------------------------------------------------------------------------------- import
@dataclass
class ImportReport:
    """What :func:`convert_state_dict` did with each key of a foreign checkpoint."""

    source: str
    layout: str = ""  # "mae" (Conv2d stem, image ViT), "videomae" (q_bias/v_bias), "expmae" (qkv bias, Conv3d)
    dtype: str = ""
    loaded: list[str] = field(default_factory=list)  # encoder keys filled from the checkpoint
    dropped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it has no place in the encoder
    missing: list[str] = field(default_factory=list)  # encoder keys the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys of unknown meaning
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"source": self.source, "layout": self.layout, "dtype": self.dtype, "loaded": len(self.loaded),
                "dropped": self.dropped, "missing": self.missing, "unexpected": self.unexpected, "notes": self.notes}

    def __str__(self) -> str:
        parts = [f"{self.source}: {self.layout} layout, {len(self.loaded)} encoder tensors loaded"]
        groups: dict[str, int] = {}
        for reason in self.dropped.values():
            groups[reason] = groups.get(reason, 0) + 1
        parts += [f"dropped {n} ({reason})" for reason, n in groups.items()]
        if self.missing:
            parts.append(f"missing {self.missing}")
        if self.unexpected:
            parts.append(f"unexpected {self.unexpected}")
        return "; ".join(parts + self.notes)


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
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle / zip errors of many kinds
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot be loaded safely with torch.load(weights_only=True) ({reason}); "
                         "re-save its state dict (e.g. as .safetensors) where you trust the file") from None
    return unwrap_state_dict(obj, str(path))


_DECODER = re.compile(r"^(decoder|video_decoder|encoder_to_decoder|mask_token)")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LAYER_SCALE = {"gamma_1": "attn.proj", "ls1.gamma": "attn.proj", "gamma_2": "mlp.fc2", "ls2.gamma": "mlp.fc2"}
_UNSUPPORTED = {  # block parameters of architectures this encoder cannot represent
    "attn.scale": "cosine attention (VideoMAE V2 cos_attn)",
    "attn.q_norm.weight": "query/key normalisation", "attn.relative_position_bias_table": "relative position bias",
}


def _drop_encoder_prefix(key: str) -> str:
    # VideoMAE pretraining / expMAE keys: encoder.blocks.0... ("encoder_to_decoder" is not the encoder)
    return key[len("encoder."):] if key.startswith("encoder.") else key


def convert_state_dict(state: Mapping[str, torch.Tensor], cfg: ExpMAEConfig,
                       source: str = "state dict") -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Map a MAE / VideoMAE / VideoMAE V2 / timm ViT / expMAE state dict onto ExpMAEEncoder keys for ``cfg``.

    Returns the encoder tensors (float32) and a report. Raises a one-line ValueError naming the key and both
    shapes when the checkpoint is of another size (e.g. ViT-B weights into a ViT-S config).
    """
    state = unwrap_state_dict(state, source)
    report = ImportReport(source=source)
    keys: dict[str, torch.Tensor] = {}
    raw_of: dict[str, str] = {}  # normalised key -> the checkpoint's own name (for reports and errors)
    for raw, value in state.items():
        key = _drop_encoder_prefix(_strip_wrappers(raw))
        if key in keys:
            raise ValueError(f"{source}: two keys map to {key!r} ({raw_of[key]!r} and {raw!r}); pass the wanted sub-dict")
        keys[key], raw_of[key] = value, raw
    report.dtype = ",".join(sorted({str(v.dtype).replace("torch.", "") for v in keys.values() if v.is_floating_point()}))
    expected = _encoder_shapes(cfg)
    blocks = {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}
    if blocks and len(blocks) != cfg.depth:
        raise ValueError(f"{source}: the checkpoint has {len(blocks)} encoder blocks (blocks.0-{max(blocks)}), "
                         f"the expMAE config has depth={cfg.depth}")

    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # encoder key -> checkpoint key it came from (for error messages)

    def put(target: str, value: torch.Tensor, src: str) -> None:
        out[target], origin[target] = value.detach().to("cpu", torch.float32), src

    stem = keys.get("patch_embed.proj.weight")
    report.layout = ("mae" if stem is not None and stem.ndim == 4 else
                     "videomae" if any(k.endswith("attn.q_bias") for k in keys) else "expmae")
    layer_scales: list[tuple[str, str, torch.Tensor]] = []
    for key, value in keys.items():
        m = _BLOCK.match(key)
        sub = m.group(2) if m else None
        if _DECODER.match(key):
            report.dropped[key] = "decoder (pretraining only)"
        elif key in ("cls_token", "dist_token", "reg_token"):
            report.dropped[key] = "class token (the expMAE encoder has none)"
        elif key.startswith(("head.", "head_dist.", "pre_logits.")):
            report.dropped[key] = "classifier head"
        elif key == "pos_embed":
            _import_pos_embed(value, cfg, expected, report, put)
        elif key == "time_embed":  # expMAE's own learned temporal code
            if "time_embed" in expected:
                put(key, value, key)
            else:
                report.dropped[key] = "learned temporal code (this config uses the fixed sin-cos code)"
        elif key.startswith("fc_norm."):
            if "norm.weight" in keys:
                report.dropped[key] = "norm after pooling (the encoder's own norm is loaded)"
            else:  # finetuned with mean pooling: the only final norm there is
                put("norm." + key.split(".", 1)[1], value, key)
                if key.endswith("weight"):
                    report.notes.append("fc_norm (applied after mean pooling in the source) loaded as the final "
                                        "per-token norm")
        elif key == "patch_embed.proj.weight":
            put(key, _inflate_stem(value, cfg, expected[key], source, raw_of[key]), key)
        elif sub in ("attn.q_bias", "attn.v_bias"):
            if sub == "attn.q_bias":
                v_bias = keys.get(f"blocks.{m.group(1)}.attn.v_bias")
                if v_bias is None:
                    raise ValueError(f"{source}: {raw_of[key]!r} has no matching attn.v_bias")
                # VideoMAE: q and v biases, none for the keys (a zero key bias changes nothing in softmax)
                put(f"blocks.{m.group(1)}.attn.qkv.bias", torch.cat([value, torch.zeros_like(v_bias), v_bias]), key)
        elif sub in _LAYER_SCALE:
            layer_scales.append((key, f"blocks.{m.group(1)}.{_LAYER_SCALE[sub]}", value))
        elif sub in _UNSUPPORTED:
            raise ValueError(f"{source}: {raw_of[key]!r} is {_UNSUPPORTED[sub]}, which the expMAE encoder does not have")
        elif key in expected:
            put(key, value, key)
        else:
            report.unexpected.append(key)

    # Layer scale gamma * f(x) folds exactly into the last linear layer of f.
    for key, target, gamma in layer_scales:
        if f"{target}.weight" not in out:
            raise ValueError(f"{source}: {raw_of[key]!r} without {target}.weight to fold it into")
        gamma = gamma.detach().to("cpu", torch.float32)
        out[f"{target}.weight"] = out[f"{target}.weight"] * gamma[:, None]
        out[f"{target}.bias"] = out[f"{target}.bias"] * gamma
    if layer_scales:
        report.notes.append("layer scale (gamma) folded into attn.proj / mlp.fc2")

    for k in list(out):
        if k not in expected:  # e.g. a qkv bias for a config with qkv_bias=False
            report.unexpected.append(origin[k])
            del out[k]
        elif tuple(out[k].shape) != expected[k]:
            src = origin[k]
            got = tuple(keys[src].shape) if src in keys else tuple(out[k].shape)
            raise ValueError(f"{source}: checkpoint key {raw_of.get(src, src)!r} has shape {got} but the expMAE encoder "
                             f"({_describe(cfg)}) expects {expected[k]}{'' if src == k else f' for {k!r}'}")
    for k in expected:
        if k in out:
            continue
        if k.endswith("attn.qkv.bias") and k.replace("bias", "weight") in out:
            out[k] = torch.zeros(expected[k])  # a source without attention biases
            report.notes.append(f"{k}: zero (the checkpoint has no attention bias)")
        elif k in ("pos_embed", "time_embed"):
            report.notes.append(f"{k}: kept at its sin-cos initialisation")
        else:
            report.missing.append(k)
    report.loaded = sorted(out)
    report.dropped = {raw_of.get(k, k): reason for k, reason in report.dropped.items()}
    report.unexpected = [raw_of.get(k, k) for k in report.unexpected]
    return out, report


def _inflate_stem(weight: torch.Tensor, cfg: ExpMAEConfig, expected: tuple[int, ...], source: str,
                  name: str = "patch_embed.proj.weight") -> torch.Tensor:
    """A Conv2d stem (D, C, p, p) becomes the Conv3d (D, C, t, p, p) whose static tubelet is that Conv2d:
    w / t at every time step, so the frame path reproduces the image model exactly."""
    if weight.ndim != 4:
        return weight
    D, C, t, p, _ = expected
    if tuple(weight.shape) != (D, C, p, p):
        raise ValueError(f"{source}: checkpoint key {name!r} has shape {tuple(weight.shape)} but "
                         f"the expMAE encoder ({_describe(cfg)}) expects {(D, C, p, p)} (a Conv2d stem, inflated "
                         f"to {expected})")
    return (weight.float() / t).unsqueeze(2).repeat(1, 1, t, 1, 1)


def _import_pos_embed(value, cfg: ExpMAEConfig, expected: dict, report: ImportReport, put) -> None:
    from expmae.pos_embed import get_2d_sincos_pos_embed

    N, D = cfg.num_patches, cfg.embed_dim
    spatial = value[:, 1:] if value.ndim == 3 and value.shape[1] == N + 1 else value  # MAE: a cls slot first
    if tuple(spatial.shape) != (1, N, D):
        # VideoMAE's table spans all T' x N tubelets: it does not split into our spatial + temporal codes
        report.dropped["pos_embed"] = f"position table of shape {tuple(value.shape)} (not a {N}-patch 2-D code)"
        return
    if "pos_embed" in expected:
        put("pos_embed", spatial, "pos_embed")
        return
    ours = get_2d_sincos_pos_embed(D, cfg.grid_size)[None]
    diff = (spatial.float() - ours).abs().max().item()
    report.dropped["pos_embed"] = "fixed sin-cos position code (recomputed by expMAE)"
    if diff > 1e-4:
        report.notes.append(f"pos_embed differs from expMAE's sin-cos code by up to {diff:.3g} (a learned code?); "
                            "use learn_pos_embed=True to load it")


def load_pretrained_weights(model: torch.nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                            strict: bool = True) -> ImportReport:
    """Initialise the encoder of ``model`` (ExpMAE or ExpMAEEncoder) from a MAE / VideoMAE / VideoMAE V2 / timm
    ViT / expMAE checkpoint (path or state dict), e.g. to continue pretraining from public weights.

    Decoders, class tokens and classifier heads are dropped (listed in the report). With ``strict``, encoder
    weights the checkpoint lacks, or keys of unknown meaning, are an error; otherwise they are only reported.
    """
    encoder = unwrap_encoder(model)
    name = str(source) if isinstance(source, (str, os.PathLike)) else "state dict"
    state = read_state_dict(source) if isinstance(source, (str, os.PathLike)) else source
    converted, report = convert_state_dict(state, encoder.cfg, name)
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"{name}: {report.layout} checkpoint leaves encoder weights {report.missing[:4]} unset and "
                         f"has keys of unknown meaning {report.unexpected[:4]} (strict=False loads the rest)")
    result = encoder.load_state_dict(converted, strict=False)
    if result.unexpected_keys:  # cannot happen: converted keys are checked against the encoder's
        raise RuntimeError(f"{name}: unexpected encoder keys {result.unexpected_keys[:4]}")
    return report


def init_from(model: torch.nn.Module, source: str | os.PathLike) -> str:
    """Initialise an ExpMAE for (continued) pretraining from ``source``; returns a one-line description.

    - an expMAE pretraining checkpoint or run folder: the whole model, encoder and decoders (a decoder the
      checkpoint's mode lacks keeps its fresh init; img_size, num_frames and the objective may differ, the
      weight shapes may not);
    - a MAE / VideoMAE / VideoMAE V2 / timm ViT / expMAE weights file: the encoder only
      (:func:`load_pretrained_weights`, strict), the decoders keep their fresh init.
    Errors are single-line ``FileNotFoundError`` / ``ValueError``.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    try:
        find_checkpoint(path)
        is_checkpoint = True
    except FileNotFoundError:
        is_checkpoint = False
    if not is_checkpoint:
        report = load_pretrained_weights(model, path, strict=True)
        return f"encoder from {path} ({report.layout} layout, {len(report.loaded)} tensors); decoders freshly initialised"
    _, state, info = read_model_checkpoint(path)
    target = getattr(model, "module", model)
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


# ----------------------------------------------------------------------------------------------- CLI
def _parse_overrides(items: Sequence[str]) -> dict:
    import yaml

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
        description="Export the pretrained expMAE encoder (clip encoder + timm frame encoder + config.json), "
                    "or import public MAE / VideoMAE weights into an expMAE encoder folder.")
    add_version_argument(p)
    p.add_argument("checkpoint", help="pretraining run / checkpoints / step_* folder, or a MAE / VideoMAE weights file")
    p.add_argument("out_dir", type=Path, help="encoder folder to write")
    p.add_argument("--weights", choices=WEIGHT_SOURCES, default="auto",
                   help="which weights of a checkpoint: auto (fp32 weights.safetensors, else the consolidated "
                        "DeepSpeed shards, else accelerate's model.safetensors) or force one")
    p.add_argument("--model", default=None, help="registry size for a weights file (tiny, small, base, large)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="ExpMAEConfig overrides for a weights file, e.g. img_size=224 num_frames=16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the reload-and-compare check")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from expmae.jobs import one_line

    args = build_parser().parse_args(argv)
    try:
        summary = export_encoder(args.checkpoint, args.out_dir, weights=args.weights, model=args.model,
                                 overrides=_parse_overrides(args.set), overwrite=args.overwrite, verify=args.verify)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        print(f"expmae-export: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
