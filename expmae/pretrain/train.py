"""expMAE pretraining: the training loop behind ``accelerate launch -m expmae.pretrain`` (its CLI: expmae.pretrain.cli).

Reads as ``setup`` -> ``for each epoch: train_one_epoch`` -> ``finish``; its parts (state, resume, loader, step,
logger, online_eval, debug) are modules of their own. The training config is the one source of the batch size,
gradient accumulation and clipping that DeepSpeed is given. The CLI validates the config before it imports this
module (and torch). The run folder and resuming: docs/guides/pretraining.md; the parts: docs/architecture.md.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object, set_seed

from expmae.checkpoint import load_checkpoint, save_checkpoint
from expmae.config import ConfigError, PretrainConfig, save_config
from expmae.data import VideoClipDataset, resolve_augment_on
from expmae.flops import peak_bf16_flops, train_flops_per_clip
from expmae.model import ExpMAE, create_model
from expmae.optim import cosine_lr, create_optimizer
from expmae.pretrain.debug import Faults, SyncCounter
from expmae.pretrain.loader import Batches, make_loader
from expmae.pretrain.logger import TrainLogger
from expmae.pretrain.online_eval import OnlineEvaluator
from expmae.pretrain.resume import check_resumable, check_shared_output_dir, choose_resume, claim_output_dir
from expmae.pretrain.state import Plan, RngSnapshot, TrainState
from expmae.pretrain.step import StepContext, train_step
from expmae.shards import JsonlShards
from expmae.visualize import reconstruction_grid, save_png
from expmae.weights import init_from


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stopped after checkpointing its last good state."""


class DataStallError(RuntimeError):
    """A rank's DataLoader gave no batch within data.timeout: the run stopped after checkpointing its last good state."""


# ------------------------------------------------------------------------------------------ setup helpers


def make_accelerator(cfg: PretrainConfig):
    # A launched run without CUDA needs the gloo backend (NCCL needs GPUs), which DeepSpeed's CPU accelerator
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


def zero_defaults(stage: int, width: int) -> dict:
    """ZeRO communication sized to a ViT of this width. Gradients are reduced (and, at stage 3, parameters
    prefetched) in buckets of about two transformer blocks (24 x width^2 elements: 3.5 M for ViT-S, 14 M for ViT-B,
    25 M for ViT-L), overlapped with the backward pass. DeepSpeed's default 5e8-element buckets are larger than a
    whole ViT-L, so everything would be reduced after backward, with nothing to overlap."""
    bucket = 24 * width * width
    common = {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": bucket}
    if stage in (1, 2):
        return {**common, "reduce_scatter": True, "allgather_bucket_size": bucket}
    if stage == 3:  # parameters below 10 x width elements (norms, biases) stay whole: gathering them costs more
        return {**common, "stage3_prefetch_bucket_size": bucket, "stage3_param_persistence_threshold": 10 * width}
    return {}


def configure_deepspeed(accelerator, cfg: PretrainConfig, width: int | None = None) -> None:
    """Complete the DeepSpeed config from the training config (and the model ``width`` for the ZeRO buckets).

    The accelerate config file chooses the ZeRO stage, offload and precision; batch, accumulation and clipping
    belong to the training config alone (a launcher config that sets one to a different value is an error
    rather than a silent override). Entries the launcher leaves unset or "auto" get defaults that keep the
    device busy: DeepSpeed's throughput timer off (it synchronises the device in every forward and step),
    fp32 gradient accumulation under bf16, ZeRO buckets sized to the model (:func:`zero_defaults`).
    ZeRO-3 must gather 16-bit weights on save (the checkpoint's weights.safetensors), checked here, at start-up.
    """
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
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    zero = ds.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    bf16 = getattr(accelerator, "mixed_precision", "no") == "bf16" or ds.get("bf16", {}).get("enabled") is True
    if bf16 and stage in (1, 2):  # DeepSpeed accumulates in the model's dtype unless told otherwise
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    for key, value in (zero_defaults(stage, width) if width else {}).items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    if stage == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise ConfigError(
            "the launcher runs ZeRO-3 without 16-bit weight gathering, so the first checkpoint would fail; set "
            "zero3_save_16bit_model: true in the accelerate config (stage3_gather_16bit_weights_on_model_save: true "
            "under zero_optimization in a DeepSpeed JSON)"
        )


def save_reconstruction(model, clips_uint8, *, seed: int, device, path: Path | None):
    """The reconstruction grid of a fixed batch with fixed masks (expmae.visualize). Every rank runs it (ZeRO-3
    gathers parameters collectively); the main process writes ``path``. Returns the grid (3, H, W) in [0, 1]."""
    grid = reconstruction_grid(model, clips_uint8, seed=seed, device=device)
    if path is not None:
        save_png(grid, path)
    return grid


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything built once at start-up; the loop reads it, the TrainState is what changes."""

    cfg: PretrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared (DeepSpeed engine / DDP wrapper)
    raw_model: ExpMAE  # the model inside it
    plan: Plan
    step_context: StepContext  # what train_step needs (model, optimizer, accumulation, clipping, faults)
    logger: TrainLogger
    dataset: VideoClipDataset
    recon_clips: torch.Tensor  # uint8 (n, 3, T, S, S): the fixed batch of the reconstruction grids
    model_config: dict
    resumed_from: Path | None
    evaluator: OnlineEvaluator | None = None  # when eval.source is set
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


def train(cfg: PretrainConfig, resume: str = "none") -> Path:
    """Train (or continue) the run described by ``cfg``; returns the final checkpoint folder."""
    accelerator = make_accelerator(cfg)
    lock = claim_output_dir(accelerator, Path(cfg.train.output_dir))  # before any write: one live run per folder
    try:
        run, state = setup(cfg, resume, accelerator)
        data = Batches(make_run_loader(run, state), state, run.plan.batches_per_epoch)
        last_ckpt = run.resumed_from  # stays the answer when a finished run is resumed
        if run.evaluator is not None and state.step == 0:
            evaluate(run, 0)  # the random-init twin: every curve starts from it
        run.model.train()
        while state.step < run.plan.total_steps:
            last_ckpt = train_one_epoch(run, state, data) or last_ckpt
        return finish(run, state, last_ckpt)
    finally:
        if lock is not None:
            lock.release()


def train_one_epoch(run: Run, state: TrainState, data) -> Path | None:
    """Optimizer steps until the epoch's data (or the schedule) ends; returns the last checkpoint it wrote."""
    plan, cfg, epoch, saved = run.plan, run.cfg, state.epoch, None
    while state.epoch == epoch and state.step < plan.total_steps:
        window_start, rng_at_start = state.copy(), RngSnapshot()
        lr = cosine_lr(state.step, peak_lr=plan.peak_lr, min_lr=cfg.train.min_lr, warmup_steps=plan.warmup_steps,
                       total_steps=plan.total_steps)
        result = train_step(run.step_context, state, data, lr)
        if result.stall is not None:
            stop_on_stall(run, window_start, rng_at_start, result.stall)
        run.logger.log_step(result, state)
        if not result.taken:
            if state.consecutive_nonfinite >= cfg.train.max_nonfinite:
                stop_on_nonfinite(run, state, result.step)
            continue
        step = state.step
        if cfg.log.recon_every and step % cfg.log.recon_every == 0 and step != plan.total_steps:
            reconstruction(run, step)
        if run.evaluator is not None and (step % cfg.eval.every == 0 or step == plan.total_steps):
            evaluate(run, step)  # before the checkpoint, whose metrics flush then holds it: a resume never redoes it
        if step % cfg.checkpoint.every == 0 or step == plan.total_steps:
            saved = checkpoint(run, state)
    return saved


def checkpoint(run: Run, state: TrainState) -> Path:
    run.logger.flush()  # the metrics up to this step are on disk before the checkpoint that resumes after them
    return save_checkpoint(run.accelerator, run.model, run.out_dir / "checkpoints", state.step,
                           {**state.to_dict(), "run_shape": run.plan.run_shape}, run.model_config,
                           keep_last=run.cfg.checkpoint.keep_last)


def evaluate(run: Run, step: int) -> None:
    """The online evaluation (every rank encodes, rank 0 probes and logs), without touching the training RNGs."""
    snapshot = RngSnapshot()
    metrics = run.evaluator(run.raw_model.encoder)
    snapshot.restore()  # the probes draw random numbers; the training run must not see that they ran
    if metrics is not None:
        metrics["eval/time_share"] = run.evaluator.seconds / max(time.perf_counter() - run.started, 1e-9)
        run.logger.log_eval(step, metrics)


def reconstruction(run: Run, step: int) -> Path:
    path = run.out_dir / "recon" / f"step_{step:07d}.png"
    grid = save_reconstruction(run.raw_model, run.recon_clips, seed=run.cfg.train.seed, device=run.accelerator.device,
                               path=path if run.accelerator.is_main_process else None)
    run.logger.image("reconstruction", grid, step)
    return path


def stop_on_nonfinite(run: Run, state: TrainState, step: int):
    saved_at = checkpoint(run, state)
    run.logger.close()
    t = run.cfg.train
    raise NonFiniteLossError(
        f"{state.consecutive_nonfinite} non-finite losses in a row (train.max_nonfinite={t.max_nonfinite}) at step "
        f"{step}; stopped. Last good state saved to {saved_at}. Lower train.lr/base_lr, set train.clip_grad, or "
        f"check the data"
    )


def stop_on_stall(run: Run, window_start: TrainState, rng_at_start: RngSnapshot, reason: str):
    """Every rank is here together (the stall flag travelled with the step's all-reduce): checkpoint the state at
    the start of the unfinished window, RNG states included (the ranks that got data drew masks before the stall
    was known), so a resume continues exactly; then stop with the stalled rank's reason."""
    reasons = [r for r in gather_object([reason]) if not r.startswith("another rank")]
    rng_at_start.restore()
    saved_at = checkpoint(run, window_start)
    run.logger.close()
    raise DataStallError(f"{reasons[0] if reasons else reason}; stopped. Last good state saved to {saved_at}. "
                         f"Check that clip (decord can hang on a corrupt file), or raise data.timeout")


def finish(run: Run, state: TrainState, last_ckpt: Path | None) -> Path:
    png = reconstruction(run, state.step)
    run.logger.close()
    if run.step_context.syncs is not None:
        run.step_context.syncs.save(run.out_dir / "debug" / f"syncs_rank{run.accelerator.process_index}.json")
    if run.accelerator.is_main_process:
        failures = JsonlShards(run.out_dir / "data_failures").read()
        if failures:
            print(f"{len(failures)} clip loads failed and were replaced; see {run.out_dir / 'data_failures'}")
        print(f"checkpoint: {last_ckpt}\ntensorboard: {run.out_dir / 'tensorboard'}\nreconstruction: {png}", flush=True)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return last_ckpt


def make_run_loader(run: Run, state: TrainState):
    cfg, accelerator = run.cfg, run.accelerator
    debug = cfg.debug
    return make_loader(run.dataset, plan=run.plan, state=state, rank=accelerator.process_index, seed=cfg.train.seed,
                       num_workers=cfg.data.num_workers, timeout=cfg.data.timeout,
                       pin_memory=accelerator.device.type == "cuda", repeated_samples=cfg.data.repeated_samples,
                       repeat_spread=cfg.data.repeat_spread,
                       hang=(debug.hang_clip, debug.hang_epoch) if debug.hang_clip >= 0 else None)


# ---------------------------------------------------------------------------------------------- set-up


def setup(cfg: PretrainConfig, resume: str, accelerator) -> tuple[Run, TrainState]:
    """Run-folder checks, model, data, plan, DeepSpeed, resume, logger: everything but the loop. The folder exists
    and this run owns it (expmae.pretrain.resume.claim_output_dir)."""
    t = cfg.train
    out_dir = Path(t.output_dir)
    check_shared_output_dir(accelerator, out_dir)
    resume_from = choose_resume(accelerator, resume, out_dir / "checkpoints")
    accelerator.wait_for_everyone()

    set_seed(t.seed)  # identical initial weights on every rank
    model, init_note = build_model(cfg, resume_from)
    model_config = dataclasses.asdict(model.cfg)
    dataset = build_dataset(cfg, model.cfg, accelerator.device)
    recon_clips = build_recon_clips(cfg, dataset)
    plan = Plan.from_config(cfg, len(dataset), accelerator.num_processes)
    num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them away
    model, optimizer, raw_model = prepare(accelerator, cfg, model, plan)
    set_seed(t.seed, device_specific=True)  # masking and drop-path must differ between ranks

    state = TrainState()
    if resume_from is not None:
        check_resumable(resume_from, model_config, plan.run_shape)
        state = TrainState.from_saved(load_checkpoint(accelerator, resume_from))  # also restores RNG states
    logger = build_logger(cfg, accelerator, raw_model, plan, state, resumed=resume_from is not None)
    if accelerator.is_main_process:
        save_config(cfg, out_dir / "config.yaml")
        accelerator.print(
            f"expMAE pretraining: {type(raw_model).__name__} {cfg.model.name} mode={raw_model.cfg.mode} "
            f"{num_params / 1e6:.2f}M params | {len(dataset)} clips | "
            f"{plan.world} x {accelerator.distributed_type.value} | global batch {plan.global_batch} | "
            f"lr {plan.peak_lr:.3g} | {plan.total_steps} steps ({plan.steps_per_epoch}/epoch, warmup {plan.warmup_steps})"
            + (f" | resumed from {resume_from}" if resume_from else "")
            + (f" | initialised: {init_note}" if init_note else "")
        )
    return Run(cfg=cfg, accelerator=accelerator, model=model, raw_model=raw_model, plan=plan,
               step_context=build_step_context(cfg, accelerator, model, optimizer, raw_model), logger=logger,
               dataset=dataset, recon_clips=recon_clips, model_config=model_config, resumed_from=resume_from,
               evaluator=build_evaluator(cfg, accelerator, raw_model)), state


def build_evaluator(cfg: PretrainConfig, accelerator, raw_model):
    """The online evaluation (eval.source set), its clips decoded now; None when it is off."""
    if cfg.eval.source is None:
        return None
    return OnlineEvaluator(cfg.eval, raw_model.encoder, sample_stride=cfg.data.sample_stride,
                           rank=accelerator.process_index, world=accelerator.num_processes, device=accelerator.device)


def build_model(cfg: PretrainConfig, resume_from: Path | None):
    try:  # the model's own checks (registry name, shapes) come back as config errors
        model = create_model(cfg.model.name, **cfg.model.overrides())
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    init_note = ""
    if cfg.train.init_from and resume_from is None:  # a resumed run continues from its own weights
        try:
            init_note = init_from(model, cfg.train.init_from)
        except (FileNotFoundError, ValueError) as exc:  # their messages are single lines naming the path
            raise ConfigError(f"train.init_from={cfg.train.init_from}: {exc}") from None
    return model, init_note


def build_dataset(cfg: PretrainConfig, mcfg, device):
    try:  # a clip that fails to load later is replaced (deterministically) and recorded in the run folder
        return VideoClipDataset(cfg.data.source, num_frames=mcfg.num_frames, sample_stride=cfg.data.sample_stride,
                                input_size=mcfg.img_size, train=True, seed=cfg.train.seed,
                                failure_log=Path(cfg.train.output_dir) / "data_failures",
                                repeated_samples=cfg.data.repeated_samples,  # k samples per decoded clip
                                augment_on=resolve_augment_on(cfg.data.augment_on, device))
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        raise ConfigError(f"data.source={cfg.data.source}: {exc}") from None


def build_recon_clips(cfg: PretrainConfig, dataset):
    return dataset.reference_clips(cfg.log.recon_samples)  # uint8 (n, 3, T, S, S), whatever augment_on


def prepare(accelerator, cfg: PretrainConfig, model, plan: Plan):
    """Optimizer, DeepSpeed config, accelerate.prepare; returns (prepared model, optimizer, raw model)."""
    t = cfg.train
    optimizer = create_optimizer(model, lr=plan.peak_lr, weight_decay=t.weight_decay, betas=t.betas)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, cfg, width=model.cfg.embed_dim)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    dtype = raw_model.dtype
    if dtype != torch.float32:
        # DeepSpeed casts parameters, not buffers: fixed float buffers (sin-cos position codes) follow here,
        # or bf16 tokens + fp32 codes would silently promote activations back to fp32.
        for buffer in raw_model.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(dtype)
    return model, optimizer, raw_model


def build_step_context(cfg: PretrainConfig, accelerator, model, optimizer, raw_model):
    rank, debug_dir = accelerator.process_index, Path(cfg.train.output_dir) / "debug"
    return StepContext(
        accelerator=accelerator, model=model, optimizer=optimizer, grad_accum_steps=cfg.train.grad_accum_steps,
        clip_grad=cfg.train.clip_grad, mean=raw_model.cfg.mean, std=raw_model.cfg.std, input_size=raw_model.cfg.img_size,
        faults=Faults.from_config(cfg.debug, rank), deepspeed=accelerator.distributed_type == DistributedType.DEEPSPEED,
        syncs=SyncCounter().install() if cfg.debug.count_syncs else None,
        dump_to=debug_dir / f"inputs_rank{rank}.safetensors" if cfg.debug.dump_inputs else None,
    )


def build_logger(cfg: PretrainConfig, accelerator, raw_model, plan: Plan, state: TrainState, resumed: bool):
    mcfg, device = raw_model.cfg, accelerator.device
    # Model FLOPs utilisation, as in bench_pretrain: against the device's dense bf16 peak when it computes in bf16
    bf16 = raw_model.dtype == torch.bfloat16 or accelerator.mixed_precision == "bf16"
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" and bf16 else None
    return TrainLogger(Path(cfg.train.output_dir), enabled=accelerator.is_main_process, plan=plan,
                       start_step=state.step, resumed=resumed, log_every=cfg.log.log_every,
                       flops_per_clip=train_flops_per_clip(mcfg), peak_flops=peak, device=device,
                       tokens_per_clip=(mcfg.num_frames // mcfg.tubelet_size) * (mcfg.img_size // mcfg.patch_size) ** 2)
