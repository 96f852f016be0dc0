"""The run's logs on the main process: ``metrics.jsonl`` (one line per optimizer step), TensorBoard scalars and
images, the progress bar. Records are buffered and written (one write, one fsync) every ``log.log_every`` steps
and before each checkpoint, so no rank waits on a network filesystem per step; device values (the grad norm)
are read back only then."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from expmae.files import JsonlLog


def _value(x) -> float:
    return float(x)  # a device tensor is read back here, at flush time


class TrainLogger:
    def __init__(self, out_dir: Path, *, enabled: bool, plan, start_step: int, resumed: bool, log_every: int,
                 flops_per_clip: float, tokens_per_clip: int, peak_flops: float | None, device):
        self.enabled, self.plan, self.log_every, self.device = enabled, plan, log_every, device
        self.flops_per_clip, self.tokens_per_clip, self.peak_flops = flops_per_clip, tokens_per_clip, peak_flops
        self.metrics, self.pending, self.writer = JsonlLog(Path(out_dir) / "metrics.jsonl"), [], None
        self.bar = tqdm(total=plan.total_steps, initial=start_step, disable=not enabled, desc="pretrain",
                        unit="step", dynamic_ncols=True)
        self._reset_interval()
        if enabled:
            # Steps after the checkpoint were not kept: drop them so the log is one trajectory.
            self.metrics.rewrite([r for r in self.metrics.read() if r.get("step", 0) <= start_step] if resumed else [])
            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"),
                                        purge_step=start_step + 1 if resumed else None)

    def _reset_interval(self) -> None:
        self.t0, self.steps, self.data_s, self.sums = time.perf_counter(), 0, 0.0, {}

    def log_step(self, result, state) -> None:
        """A step's record (buffered) and, every log_every steps, the interval's TensorBoard scalars."""
        if result.taken:
            self.bar.update(1)
        if not self.enabled:
            return
        self.data_s += result.data_s
        if not result.taken:
            self.pending.append({"step": result.step, "skipped": True, "micro_step": state.micro_step})
            self.writer.add_scalar("train/skipped_steps", state.skipped_steps, result.step)
            self.bar.write(f"step {result.step}: non-finite loss, step skipped "
                           f"({state.consecutive_nonfinite} in a row, {state.skipped_steps} in total)")
            return
        record = {"step": result.step, **result.losses, "lr": result.lr, "epoch": state.epoch}
        if result.dropped:  # the step used the window's other (finite) micro-batches
            record["dropped_micro_batches"] = result.dropped
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm  # still on the device
        self.pending.append(record)
        self.steps += 1
        for k, v in result.losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if result.step % self.log_every == 0 or result.step == self.plan.total_steps:
            self._scalars(record, state)
            self.flush()

    def _scalars(self, record, state) -> None:
        w, n, step = self.writer, self.steps, record["step"]
        elapsed = time.perf_counter() - self.t0
        for k, v in self.sums.items():
            w.add_scalar(f"train/{k}", v / n, step)
        w.add_scalar("train/lr", record["lr"], step)
        if "grad_norm" in record:
            w.add_scalar("train/grad_norm", _value(record["grad_norm"]), step)
        w.add_scalar("train/skipped_steps", state.skipped_steps, step)
        clips_per_s = n * self.plan.global_batch / elapsed
        w.add_scalar("perf/clips_per_s", clips_per_s, step)
        w.add_scalar("perf/tokens_per_s", clips_per_s * self.tokens_per_clip, step)  # input tubelet tokens
        # time blocked on the loader: > 0 for long means the data path, not the model, sets the pace
        w.add_scalar("perf/data_wait_frac", self.data_s / elapsed, step)
        device_flops = clips_per_s / self.plan.world * self.flops_per_clip  # model FLOP/s of one device
        w.add_scalar("perf/model_tflops_per_device", device_flops / 1e12, step)
        if self.peak_flops:
            w.add_scalar("perf/mfu", device_flops / self.peak_flops, step)
        if self.device.type == "cuda":
            w.add_scalar("perf/gpu_mem_peak_gib", torch.cuda.max_memory_allocated(self.device) / 2**30, step)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.bar.set_postfix(loss=f"{self.sums['loss'] / n:.4f}", lr=f"{record['lr']:.2e}",
                             clips_s=f"{clips_per_s:.1f}", data_wait=f"{self.data_s / elapsed:.0%}",
                             **({"mfu": f"{device_flops / self.peak_flops:.0%}"} if self.peak_flops else {}))
        self._reset_interval()

    def flush(self) -> None:
        """Write the buffered records (read back their device values) and TensorBoard's queue."""
        if not self.enabled:
            return
        if self.pending:
            self.metrics.extend([{k: _value(v) if k == "grad_norm" else v for k, v in r.items()} for r in self.pending])
            self.pending = []
        self.writer.flush()

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """An online evaluation's scores: their own metrics.jsonl record (no loss key), TensorBoard, one console line."""
        if not self.enabled:
            return
        self.pending.append({"step": step, **metrics})
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        shown = {k.removeprefix("eval/"): v for k, v in metrics.items()  # the headlines, not every layer's
                 if k.endswith(("knn_acc", "probe_acc", "attentive_acc")) and "/L" not in k}
        self.bar.write(f"step {step}: eval " + " ".join(f"{k} {v:.3f}" for k, v in shown.items())
                       + f" ({metrics.get('eval/seconds', 0):.0f} s)")
        self.flush()

    def image(self, tag: str, grid, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        self.flush()
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
