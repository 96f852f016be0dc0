"""Crash-safe training checkpoints on top of ``accelerate.save_state`` (DeepSpeed-sharded under DeepSpeed).

Layout of a run's ``checkpoints/`` folder::

    step_0001000/            a complete checkpoint (the rename is the commit)
        (accelerate state)   model/optimizer/scaler/RNG states of every rank; pytorch_model/ under DeepSpeed
        weights.safetensors  the unwrapped model's state dict (timm-style keys): what export reads
        model_config.json    the resolved ExpMAEConfig fields, to rebuild the model without the run's YAML
        train_state.json     step counters, data position, non-finite counters: written last
    step_0002000.tmp/        a save in progress (or killed mid-way): never read, removed on the next start
    latest                   text file naming the newest complete checkpoint (for people and scripts)

Every rank calls :func:`save_checkpoint` (DeepSpeed needs all of them); the main process renames
``.tmp`` to final, repoints ``latest`` and prunes old checkpoints only after the new one is complete, so a
kill at any moment leaves the previous checkpoint usable. Assumes the run folder is on a filesystem that
all ranks share (true for one machine; on a cluster use shared storage).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from expmae.jobs import atomic_path

WEIGHTS_NAME = "weights.safetensors"
MODEL_CONFIG_NAME = "model_config.json"
TRAIN_STATE_NAME = "train_state.json"
LATEST_NAME = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")


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
    from safetensors.torch import save_file

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
        _write_json(tmp / MODEL_CONFIG_NAME, model_config)
        _write_json(tmp / TRAIN_STATE_NAME, train_state)
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
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    config = json.loads((path / MODEL_CONFIG_NAME).read_text(encoding="utf-8"))
    return config, load_file(str(path / WEIGHTS_NAME))
