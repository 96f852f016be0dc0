"""The expmae encoder folder: what ``expmae-export`` writes and :func:`load_encoder` / timm read.

    encoder.safetensors   the clip encoder: tubelet Conv3d stem + blocks + final norm (ExpMAEEncoder keys)
    model.safetensors     the frame encoder as a timm VisionTransformer state dict (strict load)
    config.json           timm's hub config (architecture, model_args, pretrained_cfg with input size and
                          mean/std), so ``timm.create_model("local-dir:FOLDER", pretrained=True)`` works, plus
                          an "expmae" section: the full ExpMAEConfig, the exact explicit timm.create_model call,
                          the clip sampling used in pretraining, the source checkpoint, a weights hash.
    hf/                   (``--hf``) the clip encoder as a transformers VideoMAEModel folder + model card
    hf_vitmae/            (``--hf-vitmae``) the frame encoder as a transformers ViTMAEModel folder + model card
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from expmae.checkpoint import config_from_dict, encoder_shapes, load_safetensors, read_checkpoint
from expmae.model import ExpMAEConfig, ExpMAEEncoder, unwrap_encoder
from expmae.model_config import upgrade_config_dict
from expmae.weights.timm_frame import frame_encoder_timm_state_dict, timm_create_kwargs

ENCODER_WEIGHTS = "encoder.safetensors"
TIMM_WEIGHTS = "model.safetensors"  # the name timm's local-dir / hub loader looks for
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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


def commit_folder(tmp: Path, out_dir: Path, overwrite: bool) -> None:
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
        commit_folder(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def folder_of(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent if path.is_file() and path.name in (CONFIG_NAME, ENCODER_WEIGHTS, TIMM_WEIGHTS) else path


def read_encoder_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of an encoder folder (one-line errors for anything else); its ExpMAEConfig fields
    (``["expmae"]["config"]``) under today's names, whichever expmae wrote it."""
    folder = folder_of(path)
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
    if isinstance(config["expmae"]["config"], dict):
        config["expmae"]["config"] = upgrade_config_dict(config["expmae"]["config"])
    return config


def load_encoder(path: str | os.PathLike, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> ExpMAEEncoder:
    """The clip encoder (tubelet stem + blocks + norm) of an encoder folder, in eval mode.

    Also accepts a pretraining checkpoint / run folder (exported on the fly). ``encoder.forward_clips(clips)``
    gives tokens (B, P + T/t * N, D), ``encoder.forward_frames(images)`` (B, P + N, D), P =
    ``encoder.num_prefix_tokens`` (1: a class token first, when cfg.class_token); ``encoder.cfg`` has the rest.
    Call ``.train()`` to finetune it.
    """
    folder = folder_of(path)
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
    state = load_safetensors(weights)
    expected = encoder_shapes(cfg)
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
    import timm  # deferred: optional dependency: timm (+1.4 s), which load_encoder (features, finetune) does not need

    folder = folder_of(path)
    read_encoder_config(folder)
    return timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True, **kwargs).eval()


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
