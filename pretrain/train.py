"""expMAE pretraining: one shared ViT encoder, an MAE frame decoder and a VideoMAE clip decoder.

    accelerate launch --config_file pretrain/configs/accelerate/<launcher>.yaml pretrain/train.py \
        --config pretrain/configs/<model>.yaml [--resume auto] [section.key=value ...]

The launcher config says where and how (GPUs, DDP or DeepSpeed ZeRO stage, bf16); the training config says
what (model, data, optimisation, logging, checkpoints) and is the one source of the batch size, gradient
accumulation and clipping that DeepSpeed is given. The config is validated before torch is imported.

A run folder (``train.output_dir``) holds ``config.yaml``, ``metrics.jsonl`` (one line per optimizer step),
``tensorboard/``, ``recon/step_*.png`` and ``checkpoints/`` (see expmae.checkpoint).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from expmae.config import ConfigError, PretrainConfig, describe, load_config, to_yaml  # light: no torch


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stopped after checkpointing its last good state."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training config YAML (pretrain/configs/*.yaml); defaults when omitted")
    p.add_argument("--resume", default="none", metavar="auto|none|PATH",
                   help="auto: continue from the newest checkpoint of train.output_dir if there is one; "
                        "PATH: a checkpoint or run folder; none (default): fresh run")
    p.add_argument("--check", action="store_true", help="validate the config, print it resolved and exit (no torch)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.batch_size=8")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    # Under a launcher every rank reaches the same verdict on these errors: say it once.
    say = (lambda msg: print(msg, file=sys.stderr)) if os.environ.get("RANK", "0") == "0" else (lambda msg: None)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        say(f"config error: {exc}")
        return 2
    if args.check:
        print(to_yaml(cfg).rstrip())
        return 0
    try:
        train(cfg, resume=args.resume)
    except (ConfigError, NonFiniteLossError, FileExistsError) as exc:
        say(f"error: {exc}")
        return 1
    return 0


# ------------------------------------------------------------------------------------------ setup helpers


def make_accelerator(cfg: PretrainConfig):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # A launched run without CUDA (ENVIRONMENT.md) needs the gloo backend, which DeepSpeed's CPU accelerator
    # speaks too; without DeepSpeed, accelerate also needs cpu=True to treat it as multi-CPU DDP (torchrun).
    # A plain `python train.py` stays single-process.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    on_cpu = launched and not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return Accelerator(
        cpu=on_cpu and not deepspeed,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        # accelerate compiles in prepare() (DeepSpeed: engine.compile()); None leaves it to the launcher's setting
        dynamo_backend="inductor" if cfg.train.compile else None,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu else [],
    )


def configure_deepspeed(accelerator, cfg: PretrainConfig) -> None:
    """Fill DeepSpeed's batch, accumulation and clipping entries from the training config.

    The accelerate config file chooses the ZeRO stage, offload and precision; these four values belong to
    the training config alone. A launcher config that sets one of them to a different value is an error
    rather than a silent override.
    """
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury the progress bar
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    t = cfg.train
    wanted = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size * t.grad_accum_steps * accelerator.num_processes,
        "gradient_clipping": t.clip_grad,
    }
    for key, value in wanted.items():
        current = ds.get(key, "auto")
        if current in ("auto", None):
            ds[key] = value
        elif float(current) != float(value):
            raise ConfigError(
                f"the DeepSpeed config sets {key}={current} but the training config implies {value}; "
                f"remove {key} from the accelerate/DeepSpeed config (or set it to auto): it comes from the training config"
            )
    ds.setdefault("steps_per_print", 10**9)  # progress goes to our bar and TensorBoard


def find_resume_checkpoint(resume: str, ckpt_dir: Path) -> Path | None:
    from expmae.checkpoint import latest_checkpoint, resolve_checkpoint

    existing = latest_checkpoint(ckpt_dir)
    if resume == "none":
        if existing is not None:
            raise FileExistsError(
                f"{ckpt_dir} already holds checkpoints (newest {existing.name}); pass --resume auto to continue "
                f"that run or set train.output_dir to a new folder"
            )
        return None
    if resume == "auto":
        return existing
    try:
        return resolve_checkpoint(resume)
    except FileNotFoundError as exc:
        raise ConfigError(f"--resume {resume}: {exc}") from None


def save_reconstruction(model, clips_uint8, *, seed: int, device, path: Path | None):
    """The reconstruction grid of a fixed batch with fixed masks (expmae.visualize). Every rank runs it (ZeRO-3
    gathers parameters collectively); the main process writes ``path``. Returns the grid (3, H, W) in [0, 1]."""
    from expmae.visualize import reconstruction_grid, save_png

    grid = reconstruction_grid(model, clips_uint8, seed=seed, device=device)
    if path is not None:
        save_png(grid, path)
    return grid


# ---------------------------------------------------------------------------------------------- training


def train(cfg: PretrainConfig, resume: str = "none") -> Path:
    """Train (or continue) the run described by ``cfg``; returns the final checkpoint folder."""
    import dataclasses
    import json

    import torch
    from accelerate.utils import DistributedType, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from expmae.checkpoint import (MODEL_CONFIG_NAME, TRAIN_STATE_NAME, load_checkpoint, remove_partial,
                                   save_checkpoint)
    from expmae.config import save_config
    from expmae.data import (EpochBatchSampler, EpochItems, VideoClipDataset, batch_to_device, collate_samples,
                             normalize_clips, resolve_augment_on)
    from expmae.flops import peak_bf16_flops, train_flops_per_clip
    from expmae.jobs import JsonlLog
    from expmae.model import create_model
    from expmae.optim import cosine_lr, create_optimizer, scaled_lr, set_lr

    t = cfg.train
    accelerator = make_accelerator(cfg)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    out_dir = Path(t.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    resume_from = find_resume_checkpoint(resume, ckpt_dir)
    if is_main:
        remove_partial(ckpt_dir)
    accelerator.wait_for_everyone()

    set_seed(t.seed)  # identical initial weights on every rank
    try:  # the model's own checks (registry name, shapes) come back as config errors
        model = create_model(cfg.model.name, **cfg.model.overrides())
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    mcfg = model.cfg
    model_config = dataclasses.asdict(mcfg)
    init_note = ""
    if t.init_from and resume_from is None:  # a resumed run continues from its own weights
        from expmae.export import init_from

        try:
            init_note = init_from(model, t.init_from)
        except (FileNotFoundError, ValueError) as exc:  # their messages are single lines naming the path
            raise ConfigError(f"train.init_from={t.init_from}: {exc}") from None
    try:  # a clip that fails to load later is replaced (deterministically) and recorded in the run folder
        dataset = VideoClipDataset(cfg.data.source, num_frames=mcfg.num_frames, sample_stride=cfg.data.sample_stride,
                                   input_size=mcfg.img_size, train=True, seed=t.seed,
                                   failure_log=out_dir / "data_failures.jsonl",
                                   repeated_samples=cfg.data.repeated_samples,  # issue 13: k samples per decode
                                   augment_on=resolve_augment_on(cfg.data.augment_on, accelerator.device))
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        raise ConfigError(f"data.source={cfg.data.source}: {exc}") from None
    recon_clips = dataset.reference_clips(cfg.log.recon_samples)  # uint8 (n, 3, T, S, S), whatever augment_on

    # Per rank, whole accumulation windows only (DistributedSampler drops the tail): an epoch is a whole
    # number of optimizer steps, so epoch-based schedules are exact and windows never straddle epochs.
    steps_per_epoch = len(dataset) // world // t.batch_size // t.grad_accum_steps
    batches_per_epoch = steps_per_epoch * t.grad_accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.source={cfg.data.source} has {len(dataset)} clips, fewer than one optimizer step needs "
            f"({world} ranks x train.batch_size={t.batch_size} x train.grad_accum_steps={t.grad_accum_steps})"
        )
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    warmup_steps = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_epochs * steps_per_epoch)
    global_batch = t.batch_size * t.grad_accum_steps * world
    peak_lr = t.lr if t.lr is not None else scaled_lr(t.base_lr, global_batch)
    tokens_per_clip = (mcfg.num_frames // mcfg.tubelet_size) * (mcfg.img_size // mcfg.patch_size) ** 2

    num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them away
    optimizer = create_optimizer(model, lr=peak_lr, weight_decay=t.weight_decay, betas=t.betas)
    if is_deepspeed:
        configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    dtype = next(raw_model.parameters()).dtype  # bf16 under DeepSpeed bf16: inputs must match
    if dtype != torch.float32:
        # DeepSpeed casts parameters, not buffers: fixed float buffers (sin-cos position codes) follow here,
        # or bf16 tokens + fp32 codes would silently promote activations back to fp32.
        for buffer in raw_model.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(dtype)
    device = accelerator.device
    set_seed(t.seed, device_specific=True)  # masking and drop-path must differ between ranks
    # Model FLOPs utilisation, as in bench_pretrain: against the device's dense bf16 peak when it computes in bf16
    flops_per_clip = train_flops_per_clip(mcfg)
    bf16 = dtype == torch.bfloat16 or accelerator.mixed_precision == "bf16"
    peak_flops = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" and bf16 else None

    state = {"step": 0, "micro_step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0,
             "nonfinite_losses": 0, "consecutive_nonfinite": 0}
    run_shape = {"world_size": world, "batch_size": t.batch_size, "grad_accum_steps": t.grad_accum_steps}
    if resume_from is not None:
        # Check before loading: a different model would otherwise fail deep inside load_state.
        saved_model = json.loads((resume_from / MODEL_CONFIG_NAME).read_text())
        changed = sorted(k for k in model_config if json.dumps(model_config[k]) != json.dumps(saved_model.get(k)))
        if changed:
            raise ConfigError(f"{resume_from}: the model config differs from the checkpoint's in {', '.join(changed)}")
        saved_shape = json.loads((resume_from / TRAIN_STATE_NAME).read_text()).get("run_shape")
        if saved_shape != run_shape:
            raise ConfigError(f"{resume_from}: written with {saved_shape}, this run is {run_shape}; "
                              f"an exact resume needs the same ranks, batch size and accumulation")
        saved = load_checkpoint(accelerator, resume_from)  # also restores every rank's RNG states
        state.update({k: saved[k] for k in state})
        state["consecutive_nonfinite"] = 0  # a run stopped by the guard resumes with a fresh allowance

    # ---- logging (main process): config, per-step jsonl, TensorBoard
    metrics = JsonlLog(out_dir / "metrics.jsonl")
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        # Steps after the checkpoint were not kept: drop them so the log is one trajectory.
        metrics.rewrite([r for r in metrics.read() if r.get("step", 0) <= state["step"]] if resume_from else [])
        writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=state["step"] + 1 if resume_from else None)
        accelerator.print(
            f"expMAE pretraining: {type(raw_model).__name__} {cfg.model.name} mode={mcfg.mode} "
            f"{num_params / 1e6:.2f}M params | {len(dataset)} clips | "
            f"{world} x {accelerator.distributed_type.value} | global batch {global_batch} | "
            f"lr {peak_lr:.3g} | {total_steps} steps ({steps_per_epoch}/epoch, warmup {warmup_steps})"
            + (f" | resumed from {resume_from}" if resume_from else "")
            + (f" | initialised: {init_note}" if init_note else "")
        )

    nan_steps, zero_steps = set(cfg.debug.nonfinite_steps), set(cfg.debug.zero_loss_steps)
    nan_here = cfg.debug.nonfinite_rank in (-1, rank)

    # Worker seeds come from the loader's own generator: the global RNG (masking) stays untouched.
    loader = DataLoader(EpochItems(dataset), num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                        batch_sampler=EpochBatchSampler(len(dataset), batch_size=t.batch_size,
                                                        batches_per_epoch=batches_per_epoch, rank=rank, world=world,
                                                        seed=t.seed, start_epoch=state["epoch"],
                                                        start_batch=state["batch_in_epoch"],
                                                        repeated_samples=cfg.data.repeated_samples),
                        collate_fn=collate_samples,
                        generator=torch.Generator().manual_seed(t.seed), persistent_workers=False)

    def batches():
        for clips in loader:
            state["batch_in_epoch"] += 1
            if state["batch_in_epoch"] == batches_per_epoch:
                state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
            yield clips

    def checkpoint() -> Path:
        return save_checkpoint(accelerator, model, ckpt_dir, state["step"], {**state, "run_shape": run_shape},
                               model_config, keep_last=cfg.checkpoint.keep_last)

    def reconstruction(step: int) -> Path:
        path = out_dir / "recon" / f"step_{step:07d}.png"
        grid = save_reconstruction(raw_model, recon_clips, seed=t.seed, device=device,
                                   path=path if is_main else None)
        if writer is not None:
            writer.add_image("reconstruction", grid, step)
        return path

    data = batches()
    last_ckpt = resume_from  # stays the answer when a finished run is resumed
    interval = {"t0": time.perf_counter(), "steps": 0, "loss": 0.0, "mae": 0.0, "video": 0.0, "data_s": 0.0}
    bar = tqdm(total=total_steps, initial=state["step"], disable=not is_main, desc="pretrain", unit="step",
               dynamic_ncols=True)
    model.train()
    while state["step"] < total_steps:
        step = state["step"]  # 0-based index of the optimizer step being taken
        lr = cosine_lr(step, peak_lr=peak_lr, min_lr=t.min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
        set_lr(optimizer, lr)  # before backward: under DeepSpeed the step runs inside accelerator.backward
        sums, good, dropped, last_good = torch.zeros(3, dtype=torch.float64), 0, 0, None
        for _ in range(t.grad_accum_steps):
            # time blocked on the loader: > 0 for long means the data path, not the model, sets the pace
            wait_start = time.perf_counter()
            clips = next(data)
            interval["data_s"] += time.perf_counter() - wait_start
            clips = batch_to_device(clips, device, mcfg.img_size)  # augment_on=device: cropped/resized here
            with accelerator.accumulate(model):
                out = model(normalize_clips(clips, dtype=dtype, mean=mcfg.mean, std=mcfg.std))
                loss = out["loss"]
                if state["micro_step"] in nan_steps and nan_here:
                    loss = loss * float("nan")
                elif state["micro_step"] in zero_steps:
                    loss = loss * 0.0
                # One all-reduce carries the losses and the non-finite count: every rank takes the same
                # decision to drop, so none is left waiting in a collective (DeepSpeed would deadlock).
                parts = [loss.detach().float(),
                         *(out[k].detach().float() if k in out else loss.new_zeros((), dtype=torch.float32)
                           for k in ("loss_mae", "loss_video"))]
                stats = torch.stack([*parts, (~torch.isfinite(parts[0])).float()])
                if world > 1:
                    torch.distributed.all_reduce(stats)  # sum over ranks
                stats = stats.tolist()
                if stats[3] == 0:
                    accelerator.backward(loss)
                    sums += torch.tensor(stats[:3], dtype=torch.float64) / world
                    good, last_good = good + 1, clips
                else:  # a non-finite micro-batch is dropped (on every rank): it adds no gradient
                    state["nonfinite_losses"] += 1
                    dropped += 1
                    if accelerator.sync_gradients and good:
                        # The window's last backward is the one that all-reduces the gradients and, under
                        # DeepSpeed, takes the optimizer step. Give it a zero loss on a finite graph (the last good
                        # micro-batch again), so the step uses the window's finite micro-batches. fork_rng: the
                        # extra forward draws no masks from the training stream.
                        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                            zero = model(normalize_clips(last_good, dtype=dtype, mean=mcfg.mean, std=mcfg.std))
                        accelerator.backward(zero["loss"] * 0.0)
            state["micro_step"] += 1

        if not good:  # every micro-batch of the window was non-finite: no backward ran, nothing to undo
            optimizer.zero_grad(set_to_none=True)
            state["skipped_steps"] += 1
            state["consecutive_nonfinite"] += 1
            if is_main:
                metrics.append({"step": step + 1, "skipped": True, "micro_step": state["micro_step"]})
                writer.add_scalar("train/skipped_steps", state["skipped_steps"], step + 1)
                bar.write(f"step {step + 1}: non-finite loss, step skipped "
                          f"({state['consecutive_nonfinite']} in a row, {state['skipped_steps']} in total)")
            if state["consecutive_nonfinite"] >= t.max_nonfinite:
                saved_at = checkpoint()
                bar.close()
                raise NonFiniteLossError(
                    f"{state['consecutive_nonfinite']} non-finite losses in a row (train.max_nonfinite="
                    f"{t.max_nonfinite}) at step {step + 1}; stopped. Last good state saved to {saved_at}. "
                    f"Lower train.lr/base_lr, set train.clip_grad, or check the data"
                )
            continue

        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.clip_grad if t.clip_grad > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step = step + 1
        state["consecutive_nonfinite"] = 0
        loss_avg = (sums / good).tolist()

        if is_main:
            record = {"step": step, "loss": loss_avg[0], "lr": lr, "epoch": state["epoch"]}
            if dropped:  # the step used the window's other (finite) micro-batches
                record["dropped_micro_batches"] = dropped
            if "loss_mae" in out:
                record["loss_mae"] = loss_avg[1]
            if "loss_video" in out:
                record["loss_video"] = loss_avg[2]
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            metrics.append(record)
            interval["steps"] += 1
            for key, v in zip(("loss", "mae", "video"), loss_avg):
                interval[key] += v
            if step % cfg.log.log_every == 0 or step == total_steps:
                n, elapsed = interval["steps"], time.perf_counter() - interval["t0"]
                writer.add_scalar("train/loss", interval["loss"] / n, step)
                if "loss_mae" in out:
                    writer.add_scalar("train/loss_mae", interval["mae"] / n, step)
                if "loss_video" in out:
                    writer.add_scalar("train/loss_video", interval["video"] / n, step)
                writer.add_scalar("train/lr", lr, step)
                if grad_norm is not None:
                    writer.add_scalar("train/grad_norm", float(grad_norm), step)
                writer.add_scalar("train/skipped_steps", state["skipped_steps"], step)
                clips_per_s = n * global_batch / elapsed
                writer.add_scalar("perf/clips_per_s", clips_per_s, step)
                writer.add_scalar("perf/tokens_per_s", clips_per_s * tokens_per_clip, step)  # input tubelet tokens
                writer.add_scalar("perf/data_wait_frac", interval["data_s"] / elapsed, step)
                device_flops = clips_per_s / world * flops_per_clip  # model FLOP/s of one device
                writer.add_scalar("perf/model_tflops_per_device", device_flops / 1e12, step)
                if peak_flops:
                    writer.add_scalar("perf/mfu", device_flops / peak_flops, step)
                if device.type == "cuda":
                    writer.add_scalar("perf/gpu_mem_peak_gib", torch.cuda.max_memory_allocated(device) / 2**30, step)
                    torch.cuda.reset_peak_memory_stats(device)
                bar.set_postfix(loss=f"{interval['loss'] / n:.4f}", lr=f"{lr:.2e}", clips_s=f"{clips_per_s:.1f}",
                                data_wait=f"{interval['data_s'] / elapsed:.0%}",
                                **({"mfu": f"{device_flops / peak_flops:.0%}"} if peak_flops else {}))
                interval.update(t0=time.perf_counter(), steps=0, loss=0.0, mae=0.0, video=0.0, data_s=0.0)
        bar.update(1)

        if cfg.log.recon_every and step % cfg.log.recon_every == 0 and step != total_steps:
            reconstruction(step)
        if step % cfg.checkpoint.every == 0 or step == total_steps:
            last_ckpt = checkpoint()
    bar.close()

    png = reconstruction(state["step"])
    if writer is not None:
        writer.close()
        failures = out_dir / "data_failures.jsonl"
        if failures.exists():
            print(f"{len(JsonlLog(failures).read())} clip loads failed and were replaced; see {failures}")
        print(f"checkpoint: {last_ckpt}\ntensorboard: {out_dir / 'tensorboard'}\nreconstruction: {png}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return last_ckpt


if __name__ == "__main__":
    sys.exit(main())
