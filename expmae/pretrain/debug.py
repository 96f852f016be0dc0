"""The ``debug.*`` hooks: fault injection and probes that let tests check the real training path.

Nothing here runs unless a ``debug`` config field asks for it.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass
class Faults:
    """Loss faults by global micro-step: NaN (on one rank or all) or a zero loss (all ranks)."""

    nan_steps: frozenset
    zero_steps: frozenset
    nan_here: bool

    @classmethod
    def from_config(cls, debug, rank: int) -> "Faults":
        return cls(frozenset(debug.nonfinite_steps), frozenset(debug.zero_loss_steps),
                   debug.nonfinite_rank in (-1, rank))

    def apply(self, loss, micro_step: int):
        if micro_step in self.nan_steps and self.nan_here:
            return loss * float("nan")
        if micro_step in self.zero_steps:
            return loss * 0.0
        return loss


# Calls that make the host wait for the device: explicit synchronisations, and read-backs of a tensor's value.
SYNC_CALLS = ("torch.cuda.synchronize", "torch.cpu.synchronize", "deepspeed_accelerator.synchronize")
READ_BACKS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")
HOST_ONLY = ("torch.utils.data",)  # the samplers' and loader's own CPU tensors: never on the device, not counted


class SyncCounter:
    """Counts device synchronisations and tensor read-backs per micro-step (debug.count_syncs), by caller:
    ``expmae`` (this package) or ``other`` (DeepSpeed, accelerate, torch), and in detail under ``where``
    (module.function:line). A boundary micro-step's count includes the optimizer step after it. On a CPU run
    nothing actually waits, but the calls that would make a GPU wait are the same ones."""

    def __init__(self):
        self.now: Counter = Counter()
        self.where: Counter = Counter()  # by caller (module.function:line), this micro-step
        self.per_micro_step: list[dict] = []

    def install(self) -> "SyncCounter":
        # deferred: optional dependency: DeepSpeed serves debug.count_syncs only here; a run without DeepSpeed
        # would pay its import (0.2 s after torch) and its accelerator warning
        from deepspeed.accelerator import get_accelerator

        def counted(fn, name):
            def wrapper(*args, **kwargs):
                frame = sys._getframe(1)
                caller = frame.f_globals.get("__name__", "")
                if caller.startswith(HOST_ONLY):
                    return fn(*args, **kwargs)
                self.now[f"{name}:{'expmae' if caller.startswith('expmae') else 'other'}"] += 1
                self.where[f"{name}:{caller}.{frame.f_code.co_name}:{frame.f_lineno}"] += 1
                return fn(*args, **kwargs)
            return wrapper

        torch.cuda.synchronize = counted(torch.cuda.synchronize, "sync")
        torch.cpu.synchronize = counted(torch.cpu.synchronize, "sync")
        accelerator = get_accelerator()  # DeepSpeed's timers call get_accelerator().synchronize()
        accelerator.synchronize = counted(accelerator.synchronize, "sync")
        for name in READ_BACKS:
            setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), "read"))
        return self

    def mark(self, micro_step: int, boundary: bool) -> None:
        self.per_micro_step.append({"micro_step": micro_step, "boundary": boundary, **self.now,
                                    "where": dict(self.where)})
        self.now.clear()
        self.where.clear()

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.per_micro_step, indent=1))


def dump_inputs(path: Path, clips, out: dict) -> None:
    """What the model was given and what it drew (debug.dump_inputs): its input clips and masks, so a test can
    rebuild the targets a run trained on."""
    keep = {"clips": clips, **{k: out[k] for k in ("mask_mae", "frame_idx", "mask_video") if k in out}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in keep.items()}, str(path))
