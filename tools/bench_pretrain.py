#!/usr/bin/env python
"""Pretraining step throughput: expMAE's modes against transformers' VideoMAEForPreTraining, in one process.

    python tools/bench_pretrain.py                   # CPU: ViT-S, 16 x 112, batch 4, fp32, 1 thread (~1 min)
    python tools/bench_pretrain.py --quick           # seconds: a toy size, for smoke tests
    python tools/bench_pretrain.py --device cuda     # GPU: ViT-B, 16 x 224, batch 16, bf16 autocast, MFU
    python tools/bench_pretrain.py --set mae_decoder_depth=1 --out runs/bench.jsonl

A step is what a training loop does: draw the masks, forward, backward, AdamW step (set_to_none zero_grad).
Configurations: expmae (both branches, the config's defaults), expmae_unpacked (the same with pack_branches=False:
a separate encoder pass per branch), mae and videomae (one branch each) and hf_videomae, the reference:
VideoMAEForPreTraining with the same encoder / VideoMAE-decoder sizes, tubelet, patch, norm_pix_loss, tube mask of
the same count, SDPA attention, the same AdamW (fused by default, for every configuration) and the same dtype.
Each model gets its input in its own layout (ours (B, C, T, H, W), HF's (B, T, C, H, W)), made once outside the
timed steps; both draw their masks inside the step.

Timing: every configuration runs `--warmup` steps, then `--repeats` rounds in which each configuration runs one step
in turn (interleaved), so load drifting on a shared machine hits all of them alike. Reported per configuration:
median step time (wall; and the process's CPU time, which ignores time spent descheduled by other work), clips/s,
tokens/s (clip tubelets per second), peak memory, model FLOPs (and MFU on GPUs of known peak) and the ratio of its
step time to the reference's: `ratio_to_reference` is the median over rounds of the per-round ratio (robust to
load changes between rounds), `ratio_of_medians` the plain quotient, `ratio_to_reference_cpu` the per-round ratio
of CPU times; `flops_ratio_to_reference` is the model-FLOP ratio and `efficiency_vs_reference` = FLOP ratio / time
ratio (> 1: more model FLOPs per second than the reference). Output: one JSON object per configuration per line
(JSON Lines) on stdout and, with --out, appended to a file, to compare across commits. GPU:
torch.cuda.synchronize() brackets each timed step (the steps themselves never sync), peak memory is the allocator's;
this path has not been run on a GPU yet.

Model FLOPs come from expmae.flops: counted from the algorithm (not from what an implementation happens to
compute), so implementations of the same algorithm get the same count, and our forward does exactly that many
(tests/test_bench.py checks it against torch's FLOP counter). Training = 3 x forward.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout that is not pip-installed

import torch  # noqa: E402
import yaml  # noqa: E402

from expmae import flops  # noqa: E402
from expmae.model import ExpMAE, ExpMAEConfig, get_config, tube_masking  # noqa: E402

REFERENCE = "hf_videomae"
CONFIGS = ("expmae", "expmae_unpacked", "mae", "videomae", REFERENCE)
MODES = {"expmae": "expmae", "expmae_unpacked": "expmae", "mae": "mae", "videomae": "videomae"}

# Defaults per preset. CPU: one thread, because single-thread step times (and CPU times) reproduce on shared and
# CI machines, where two OpenMP threads contend with other work; pass --threads to change it.
PRESETS = {
    "cpu": dict(model="small", img_size=112, num_frames=16, batch_size=4, warmup=2, repeats=9, threads=1),
    "cuda": dict(model="base", img_size=224, num_frames=16, batch_size=16, warmup=5, repeats=20, threads=None),
    # a toy size that still has >1 token kept and masked per branch
    "quick": dict(model="tiny", img_size=32, num_frames=4, batch_size=2, warmup=1, repeats=2, threads=1,
                  overrides=dict(patch_size=8, depth=2, mae_decoder_depth=1, video_decoder_depth=1)),
}


# ---------------------------------------------------------------------------------------------------------------
# FLOPs (expmae.flops) per benchmarked configuration
# ---------------------------------------------------------------------------------------------------------------
def train_flops_per_clip(cfg: ExpMAEConfig, name: str) -> float:
    return flops.train_flops_per_clip(cfg, MODES.get(name, "videomae"))  # the reference is a VideoMAE step


def encoder_tokens_per_clip(cfg: ExpMAEConfig, name: str) -> int:
    return flops.encoder_tokens_per_clip(cfg, MODES.get(name, "videomae"))


# ---------------------------------------------------------------------------------------------------------------
# The configurations
# ---------------------------------------------------------------------------------------------------------------
def hf_videomae_config(cfg: ExpMAEConfig):
    """The VideoMAEConfig of exactly our encoder + VideoMAE decoder (no dropout, SDPA, eps as timm)."""
    from transformers import VideoMAEConfig

    return VideoMAEConfig(
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans, num_frames=cfg.num_frames,
        tubelet_size=cfg.tubelet_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6, qv_bias=cfg.qkv_bias,
        use_mean_pooling=False, decoder_hidden_size=cfg.video_decoder_embed_dim,
        decoder_num_hidden_layers=cfg.video_decoder_depth, decoder_num_attention_heads=cfg.video_decoder_num_heads,
        decoder_intermediate_size=int(cfg.video_decoder_embed_dim * cfg.mlp_ratio), norm_pix_loss=cfg.norm_pix_loss,
        attn_implementation="sdpa")


class ConfigRun:
    """One benchmarked configuration: its model, optimizer and step, and what the report needs."""

    def __init__(self, name: str, cfg: ExpMAEConfig, args, device: torch.device):
        self.name = name
        if name == REFERENCE:
            from transformers import VideoMAEForPreTraining

            hf_cfg = hf_videomae_config(cfg)
            model = VideoMAEForPreTraining(hf_cfg)
            if cfg.grad_checkpointing:
                model.gradient_checkpointing_enable()
            self.implementation = "transformers.VideoMAEForPreTraining"
            # to_dict() leaves out the attention implementation the model really runs
            self.model_config = {**hf_cfg.to_dict(), "attn_implementation": model.config._attn_implementation}
        else:
            fields = {**cfg.to_dict(), "mode": MODES[name]}
            if name == "expmae_unpacked":
                fields["pack_branches"] = False
            model = ExpMAE(ExpMAEConfig(**fields))
            self.implementation = "expmae.model.ExpMAE"
            self.model_config = model.cfg.to_dict()
        self.model = model.to(device).train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95),
                                           **({"fused": True} if args.fused_adamw else {}))
        self.step_ms: list[float] = []
        self.cpu_ms: list[float] = []
        self.transient_bytes = 0
        # the model's own input layout, made once, outside the timed steps
        g = torch.Generator().manual_seed(0)
        clips = torch.randn(args.batch_size, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)
        clips = clips.to(device)
        forward_model = torch.compile(self.model) if args.compile else self.model
        if name == REFERENCE:
            videos = clips.transpose(1, 2).contiguous()
            B, T, N, ratio = args.batch_size, cfg.num_time, cfg.num_patches, cfg.video_mask_ratio
            # the same tube masking (same count) as ours, drawn every step as ours does
            self.forward: Callable[[], torch.Tensor] = lambda: forward_model(
                pixel_values=videos, bool_masked_pos=tube_masking(B, T, N, ratio, device).mask).loss
        else:
            self.forward = lambda: forward_model(clips)["loss"]
        amp = args.dtype == "bfloat16"
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext

    def step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.forward()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def persistent_bytes(self) -> int:
        """Parameters + optimizer state (what stays allocated between steps)."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        return total


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(config: ConfigRun, device: torch.device) -> None:
    """One step: wall ms and this process's CPU ms (all threads; on a shared machine it ignores the time spent
    descheduled). On CUDA, synchronize on both sides; the step itself never syncs (no .item())."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    config.step()
    synchronize(device)
    config.step_ms.append((time.perf_counter() - start) * 1e3)
    config.cpu_ms.append((time.process_time() - start_cpu) * 1e3)


def measure_transient_memory(config: ConfigRun, device: torch.device) -> tuple[int, str]:
    """Bytes a step needs on top of parameters + optimizer state. CUDA: the allocator's peak during a real step.
    CPU (no allocator statistics): the tensors saved for backward (deduplicated by storage, parameters excluded)
    + the gradients, which is what is alive at the start of backward."""
    if device.type == "cuda":
        config.optimizer.zero_grad(set_to_none=True)  # the step's own gradients count as transient
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        config.step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda_max_memory_allocated"
    param_storages = {p.untyped_storage().data_ptr() for p in config.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        config.step()
    grads = sum(p.numel() * p.element_size() for p in config.model.parameters() if p.requires_grad)
    return sum(saved.values()) + grads, "cpu_estimate_saved_activations_plus_grads"


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import transformers

    return dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                device=device.type, device_name=device_name(device), threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), cuda=torch.version.cuda if device.type == "cuda" else None,
                git_commit=git_commit(), time=datetime.now(timezone.utc).isoformat(timespec="seconds"))


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: expected key=value with key an ExpMAEConfig field")
        overrides[key] = yaml.safe_load(value)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="toy size, 1 warm-up + 2 rounds (smoke test)")
    parser.add_argument("--model", help="registry size: tiny | small | base | large (small on CPU, base on GPU)")
    parser.add_argument("--img-size", type=int)
    parser.add_argument("--num-frames", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--warmup", type=int, help="warm-up steps per configuration")
    parser.add_argument("--repeats", type=int, help="timed rounds (one step of each configuration per round)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="ExpMAEConfig field override for every configuration, e.g. mae_decoder_depth=1")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="float32, or bfloat16 autocast (fp32 weights); default float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU, torch's default on GPU)")
    parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True,
                        help="AdamW(fused=True) for every configuration (default: on)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (opt-in)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    preset = dict(PRESETS["quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")])
    for key in ("model", "img_size", "num_frames", "batch_size", "warmup", "repeats", "threads"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or not names:
        raise SystemExit(f"--configs {args.configs!r}: expected a comma-separated subset of {','.join(CONFIGS)}")
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SystemExit("--repeats and --batch-size must be >= 1, --warmup >= 0")
    overrides = {**preset.get("overrides", {}), **parse_overrides(args.overrides),
                 "img_size": args.img_size, "num_frames": args.num_frames}
    try:
        cfg = get_config(args.model, **overrides)
    except ValueError as err:
        raise SystemExit(str(err)) from None

    if REFERENCE in names and (cfg.drop_path_rate > 0 or cfg.learn_pos_embed):
        raise SystemExit(f"--set drop_path_rate={cfg.drop_path_rate} learn_pos_embed={cfg.learn_pos_embed}: "
                         f"{REFERENCE} has neither; leave them at 0 / false or drop {REFERENCE} from --configs")
    torch.manual_seed(args.seed)
    configs = [ConfigRun(name, cfg, args, device) for name in names]

    from tqdm import tqdm

    for _ in range(args.warmup):
        for c in configs:
            c.step()
    for c in configs:  # a broken configuration must not pass as fast
        loss = c.step().float().item()
        if not math.isfinite(loss):
            raise SystemExit(f"{c.name}: the loss is {loss} after warm-up")
    for _ in tqdm(range(args.repeats), desc="rounds", file=sys.stderr, disable=None):
        for c in configs:
            timed_step(c, device)
    memory_method = None
    for c in configs:
        c.transient_bytes, memory_method = measure_transient_memory(c, device)

    env = environment(device)
    peak = flops.peak_bf16_flops(env["device_name"]) if device.type == "cuda" and args.dtype == "bfloat16" else None
    reference = next((c for c in configs if c.name == REFERENCE), None)
    tokens_per_clip = cfg.num_time * cfg.num_patches
    records = []
    for c in configs:
        median_ms = statistics.median(c.step_ms)
        step_s = median_ms / 1e3
        step_flops = train_flops_per_clip(cfg, c.name) * args.batch_size
        record = dict(
            bench="pretrain_step", config=c.name, implementation=c.implementation, reference=REFERENCE,
            model=args.model, img_size=cfg.img_size, num_frames=cfg.num_frames, batch_size=args.batch_size, dtype=args.dtype, amp=args.dtype == "bfloat16", compile=args.compile,
            fused_adamw=args.fused_adamw, warmup=args.warmup, repeats=args.repeats, interleaved=True,
            median_step_ms=round(median_ms, 3), min_step_ms=round(min(c.step_ms), 3),
            step_ms=[round(t, 3) for t in c.step_ms], median_cpu_ms=round(statistics.median(c.cpu_ms), 3),
            clips_per_s=args.batch_size / step_s,
            tokens_per_s=args.batch_size * tokens_per_clip / step_s,
            encoder_tokens_per_s=args.batch_size * encoder_tokens_per_clip(cfg, c.name) / step_s,
            ratio_to_reference=None, ratio_of_medians=None, ratio_to_reference_cpu=None,
            flops_ratio_to_reference=None, efficiency_vs_reference=None,
            model_flops_per_step=step_flops, achieved_tflops=step_flops / step_s / 1e12,
            peak_bf16_tflops=peak / 1e12 if peak else None, mfu=step_flops / step_s / peak if peak else None,
            peak_memory_mb=(c.persistent_bytes() + c.transient_bytes) / 2**20, memory_method=memory_method,
            params_m=c.params / 1e6, tokens_per_clip=tokens_per_clip,
            encoder_tokens_per_clip=encoder_tokens_per_clip(cfg, c.name),
            model_config=c.model_config, env=env)
        if reference is not None:
            per_round = [a / b for a, b in zip(c.step_ms, reference.step_ms)]
            record["ratio_to_reference"] = statistics.median(per_round)
            record["ratio_of_medians"] = median_ms / statistics.median(reference.step_ms)
            record["ratio_to_reference_cpu"] = statistics.median(
                [a / b for a, b in zip(c.cpu_ms, reference.cpu_ms)])
            # time ratio = FLOP ratio / efficiency: what the algorithm costs vs how well the implementation runs it
            record["flops_ratio_to_reference"] = step_flops / (train_flops_per_clip(cfg, REFERENCE) * args.batch_size)
            record["efficiency_vs_reference"] = record["flops_ratio_to_reference"] / record["ratio_to_reference"]
        records.append(record)

    lines = [json.dumps(r) for r in records]
    print("\n".join(lines), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n")
    summary = ", ".join(f"{r['config']} {r['median_step_ms']:.1f} ms"
                        + (f" (x{r['ratio_to_reference']:.3f}, cpu x{r['ratio_to_reference_cpu']:.3f}, "
                           f"flops x{r['flops_ratio_to_reference']:.3f})"
                           if r["ratio_to_reference"] is not None else "")
                        for r in records)
    print(f"[bench_pretrain] {cfg.img_size}px x {cfg.num_frames} frames, batch {args.batch_size}, {args.dtype}, "
          f"{env['threads']} threads on {env['device_name']}: {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
