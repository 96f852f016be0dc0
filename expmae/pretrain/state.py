"""What a run is (its plan, fixed at start-up) and where it is (its state, saved in every checkpoint)."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch

from expmae.config import ConfigError, PretrainConfig
from expmae.optim import scaled_lr


@dataclass
class TrainState:
    """The counters that, with the weights, optimizer and RNG states, make a resume exact."""

    step: int = 0  # optimizer steps taken
    micro_step: int = 0  # micro-batches consumed (the debug.* hooks address these)
    epoch: int = 0  # data position: the epoch and the batch within it that come next
    batch_in_epoch: int = 0
    skipped_steps: int = 0  # windows whose every micro-batch was non-finite
    nonfinite_losses: int = 0  # micro-batches dropped for a non-finite loss
    consecutive_nonfinite: int = 0  # skipped windows in a row (train.max_nonfinite stops the run)

    def next_batch(self, batches_per_epoch: int) -> None:
        self.batch_in_epoch += 1
        if self.batch_in_epoch == batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def copy(self) -> "TrainState":
        return dataclasses.replace(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainState":
        """From a checkpoint's train_state.json; a run stopped by the non-finite guard resumes with a fresh allowance."""
        state = cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls)})
        state.consecutive_nonfinite = 0
        return state


@dataclass(frozen=True)
class Plan:
    """The run's shape in steps, from the config, the number of clips and the number of ranks."""

    world: int
    batch_size: int
    grad_accum_steps: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float

    @classmethod
    def from_config(cls, cfg: PretrainConfig, num_clips: int, world: int) -> "Plan":
        t = cfg.train
        # Per rank, whole accumulation windows only (DistributedSampler drops the tail): an epoch is a whole
        # number of optimizer steps, so epoch-based schedules are exact and windows never straddle epochs.
        steps_per_epoch = num_clips // world // t.batch_size // t.grad_accum_steps
        if steps_per_epoch == 0:
            raise ConfigError(
                f"data.source={cfg.data.source} has {num_clips} clips, fewer than one optimizer step needs "
                f"({world} ranks x train.batch_size={t.batch_size} x train.grad_accum_steps={t.grad_accum_steps})"
            )
        global_batch = t.batch_size * t.grad_accum_steps * world
        return cls(
            world=world, batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps,
            steps_per_epoch=steps_per_epoch,
            total_steps=t.max_steps or t.epochs * steps_per_epoch,
            warmup_steps=t.warmup_steps if t.warmup_steps is not None else round(t.warmup_epochs * steps_per_epoch),
            peak_lr=t.lr if t.lr is not None else scaled_lr(t.base_lr, global_batch),
        )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.world

    @property
    def batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.grad_accum_steps

    @property
    def num_epochs(self) -> int:
        return -(-self.total_steps // self.steps_per_epoch)  # the last one may be partial (train.max_steps)

    @property
    def run_shape(self) -> dict:
        """What an exact resume needs to be unchanged (saved in train_state.json)."""
        return {"world_size": self.world, "batch_size": self.batch_size, "grad_accum_steps": self.grad_accum_steps}


class RngSnapshot:
    """The random-number states a checkpoint saves (accelerate's save_state: Python, NumPy, torch CPU and CUDA),
    taken at a window's start so that a checkpoint written after the window went wrong (a data stall) resumes
    exactly where the window began. Host-side copies only: no device synchronisation."""

    def __init__(self):
        self.python, self.numpy, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
