"""A fold's resume state in the end-to-end backend: one file per fold, written atomically after every epoch."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from expmae.files import atomic_path
from expmae.finetune.common import log
from expmae.finetune.training import LOOP_KEYS
from expmae.jobs import one_line


class FoldCheckpoint:
    """One fold's training state after its last finished epoch, in one file written atomically (so it is
    always one complete epoch's, never half of two): model, optimizer, the optimizer step counter, fit_epochs'
    loop state (best so far, history), the torch RNG states (CPU, and the model's CUDA device when it is on
    one) and the fold's fingerprint. Read back only with ``torch.load(weights_only=True)``; a file of another
    fingerprint, or one that cannot be read or does not fit the model, is reported in one line and ignored
    (the fold starts over and overwrites it)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str, *, tag: str = ""):
        self.path, self.fingerprint, self.tag = Path(path), fingerprint, tag

    def save(self, loop: dict, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After an epoch: ``loop`` is fit_epochs' state (LOOP_KEYS), ``step`` the optimizer steps so far."""
        loop = _plain(loop)
        # Usually the best epoch is this one: its state is then the model's, and is not stored twice.
        best_is_model = loop["best_epoch"] == loop["epoch"] and loop["best_state"] is not None
        state = {
            "fingerprint": self.fingerprint,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": int(step),
            "loop": {**loop, "best_state": None if best_is_model else loop["best_state"]},
            "best_is_model": best_is_model,
            "rng": {"cpu": torch.get_rng_state(), **_cuda_rng_state(model)},
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, int] | None:
        """Restore model, optimizer and RNG from the checkpoint and return (fit_epochs' loop state, step);
        None (and one log line, unless there is no file) when there is nothing of this run to resume."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "fingerprint" not in state:
                raise ValueError("not a fold checkpoint")
            if state["fingerprint"] != self.fingerprint:
                log(f"[{self.tag}] ignoring {self.path}: written with other settings or data; starting at epoch 0")
                return None
            loop, step, rng = state["loop"], int(state["step"]), state["rng"]
            if set(loop) != set(LOOP_KEYS):
                raise ValueError(f"its loop state has keys {sorted(loop)}, expected {sorted(LOOP_KEYS)}")
            ours = torch.get_rng_state()
            if not (isinstance(rng["cpu"], torch.Tensor) and (rng["cpu"].dtype, rng["cpu"].shape) == (ours.dtype, ours.shape)):
                raise ValueError("its CPU RNG state is not a torch generator state")
            _check_fits(state, model, optimizer)
            optimizer.load_state_dict(state["optimizer"])  # validates the groups before changing anything
            model.load_state_dict(state["model"])
        except Exception as exc:  # noqa: BLE001 - a bad checkpoint costs the fold's progress, never the run
            log(f"[{self.tag}] cannot resume from {self.path} ({one_line(exc)}); starting at epoch 0")
            return None
        if state["best_is_model"]:
            loop["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and _cuda_rng_state(model):
            torch.cuda.set_rng_state(rng["cuda"], next(model.parameters()).device)
        log(f"[{self.tag}] resuming at epoch {loop['epoch'] + 1} from {self.path} (epochs 0-{loop['epoch']} done before)")
        return loop, step


def _plain(obj):
    """numpy scalars (metrics) -> Python numbers, recursively: what torch.load(weights_only=True) accepts."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj.item() if isinstance(obj, np.generic) else obj


def _cuda_rng_state(model: nn.Module) -> dict:
    device = next(model.parameters()).device
    return {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}


def _check_fits(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError unless the checkpoint's tensors fit ``model`` and ``optimizer`` (checked before
    anything is loaded, so that a misfit leaves both as built)."""
    ours, theirs = model.state_dict(), state["model"]
    if theirs.keys() != ours.keys() or any(theirs[k].shape != v.shape for k, v in ours.items()):
        raise ValueError("its model tensors differ from this model's (names or shapes)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in state["optimizer"]["param_groups"] for i in g["params"]]
    moments = state["optimizer"]["state"]
    if len(saved_ids) != len(params) or any(
            isinstance(t, torch.Tensor) and t.ndim and t.shape != p.shape
            for i, p in zip(saved_ids, params) for t in moments.get(i, {}).values()):
        raise ValueError("its optimizer state differs from this optimizer's (parameters or shapes)")
