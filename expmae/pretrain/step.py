"""One optimizer step: an accumulation window of micro-batches, with the cross-rank non-finite guard.

Per micro-step the host waits for the device once: one all-reduce of a few numbers (the losses, a non-finite
flag and a data-stall flag) and their read-back, which lets every rank take the same decision (drop, stop)
without waiting in a collective that another rank skipped. Everything else stays on the device until the
logger reads it (expmae.pretrain.logger).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from expmae.data import batch_to_device, normalize_clips
from expmae.optim import set_lr
from expmae.pretrain.debug import dump_inputs
from expmae.pretrain.loader import DataStall

LOSS_KEYS = ("loss", "loss_mae", "loss_video")


@dataclass
class StepContext:
    """What a step needs from the run (built once by expmae.pretrain.train)."""

    accelerator: Any
    model: Any
    optimizer: Any
    grad_accum_steps: int
    clip_grad: float
    mean: tuple
    std: tuple
    input_size: int  # device-side augmentation's output side (data.augment_on=device)
    faults: Any  # expmae.pretrain.debug.Faults
    deepspeed: bool = False  # model is a DeepSpeedEngine: it clips and steps inside the window's last backward
    syncs: Any = None  # expmae.pretrain.debug.SyncCounter under debug.count_syncs
    dump_to: Any = None  # debug.dump_inputs: where micro-step 0's inputs go


@dataclass
class StepResult:
    """What a step did. ``losses`` average the window's finite micro-batches over all ranks."""

    step: int  # the optimizer step this window was (1-based)
    lr: float
    taken: bool = False  # False: every micro-batch was non-finite (skipped), or the data stalled
    losses: dict = field(default_factory=dict)
    dropped: int = 0  # non-finite micro-batches left out of a taken step
    grad_norm: Any = None  # a device tensor (or float): read back only when logged
    data_s: float = 0.0  # time blocked on the loader
    stall: str | None = None  # set when a rank's loader timed out: the one-line reason


def _inputs(ctx: StepContext, clips):
    # float32 into the model: it casts its own inputs (bf16 under DeepSpeed bf16) but builds the norm-pix targets
    # from the clips as given, so they are not rounded to bf16.
    return normalize_clips(clips, mean=ctx.mean, std=ctx.std)


def _reduce(ctx: StepContext, loss, out, stalled: bool) -> list[float]:
    """The one all-reduce (+ read-back) per micro-step: [loss, loss_mae, loss_video, #non-finite, #stalled]."""
    device = ctx.accelerator.device
    zero = torch.zeros((), device=device)
    parts = [zero, zero, zero] if loss is None else [
        loss.detach().float(), *(out[k].detach().float() if k in out else zero for k in LOSS_KEYS[1:])]
    bad = zero if loss is None else (~torch.isfinite(parts[0])).float()
    stats = torch.stack([*parts, bad, torch.full((), float(stalled), device=device)])
    if ctx.accelerator.num_processes > 1:
        torch.distributed.all_reduce(stats)  # sum over ranks
    return stats.tolist()


def train_step(ctx: StepContext, state, data, lr: float) -> StepResult:
    """Run one accumulation window from ``data``; advance ``state`` (micro-step, data position, counters; step
    only when taken). A non-finite micro-batch is dropped on every rank; a window with none finite is skipped."""
    accelerator, model = ctx.accelerator, ctx.model
    result = StepResult(step=state.step + 1, lr=lr)
    set_lr(ctx.optimizer, lr)  # before backward: under DeepSpeed the step runs inside accelerator.backward
    sums, good, last_good, stall = [0.0, 0.0, 0.0], 0, None, None
    for _ in range(ctx.grad_accum_steps):
        wait_start = time.perf_counter()
        try:
            # uint8 clips on the device; with data.augment_on=device they are cropped, resized and flipped there
            clips = batch_to_device(next(data), accelerator.device, ctx.input_size)
        except DataStall as exc:
            clips, stall = None, str(exc)
        result.data_s += time.perf_counter() - wait_start
        with accelerator.accumulate(model):
            out = loss = None
            if clips is not None:
                inputs = _inputs(ctx, clips)
                out = model(inputs)
                loss = ctx.faults.apply(out["loss"], state.micro_step)
                if ctx.dump_to is not None and state.micro_step == 0:
                    dump_inputs(ctx.dump_to, inputs, out)
            *losses, nonfinite, stalled = _reduce(ctx, loss, out, stall is not None)
            if stalled:  # a rank's loader timed out: every rank stops here, with no backward
                result.stall = stall or "another rank's DataLoader timed out"
                return result
            if nonfinite == 0:
                accelerator.backward(loss)
                sums = [s + v / accelerator.num_processes for s, v in zip(sums, losses)]
                good, last_good = good + 1, clips
            else:  # dropped on every rank: adds no gradient
                state.nonfinite_losses += 1
                result.dropped += 1
                if accelerator.sync_gradients and good:
                    # The window's last backward is the one that all-reduces the gradients and, under DeepSpeed,
                    # takes the optimizer step. Give it a zero loss on a finite graph (the last good micro-batch
                    # again), so the step uses the window's finite micro-batches. fork_rng: the extra forward draws
                    # no masks from the training stream.
                    device = accelerator.device
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        accelerator.backward(model(_inputs(ctx, last_good))["loss"] * 0.0)
        state.micro_step += 1
        if ctx.syncs is not None and not accelerator.sync_gradients:
            ctx.syncs.mark(state.micro_step - 1, False)
    _finish_window(ctx, state, result, good)
    if ctx.syncs is not None:
        ctx.syncs.mark(state.micro_step - 1, True)
    if result.taken:
        result.losses = {k: s / good for k, s in zip(LOSS_KEYS, sums) if k == "loss" or k in out}
    return result


def _grad_norm(ctx: StepContext):
    """The step's gradient norm, left on the device."""
    if ctx.deepspeed:  # clipped inside DeepSpeed's step; accelerate's getter would read the norm back (.item())
        norm = ctx.model.get_global_grad_norm()
        return norm.detach().clone() if hasattr(norm, "detach") else norm
    return ctx.accelerator.clip_grad_norm_(ctx.model.parameters(), ctx.clip_grad if ctx.clip_grad > 0 else math.inf)


def _finish_window(ctx: StepContext, state, result: StepResult, good: int) -> None:
    """Step the optimizer on the window's finite micro-batches, or skip a window that has none."""
    if not good:  # every micro-batch of the window was non-finite: no backward ran, nothing to undo
        ctx.optimizer.zero_grad(set_to_none=True)
        state.skipped_steps += 1
        state.consecutive_nonfinite += 1
        return
    result.grad_norm = _grad_norm(ctx)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.consecutive_nonfinite = 0
    result.taken = True
