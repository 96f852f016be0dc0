"""Pretraining: the real `accelerate launch` path with 2 DeepSpeed ZeRO-2 ranks on the CPU (gloo), exact resume
after SIGKILL, the cross-rank non-finite guard, plus unit tests of the schedule, param groups and checkpoints.

The launched runs are the slow part (~10-20 s each on 2 cores); one straight run is shared by two tests.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_moving_clips
from launching import (
    CPU_DEEPSPEED, LAUNCH_TIMEOUT, N, REPO, finish, kill_hard, launch, read_metrics, run_ok, trained,
    write_tiny_config,
)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_moving_clips(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, videos) -> Path:
    """2N steps without interruption, 2 DeepSpeed ZeRO-2 ranks on the CPU."""
    work = tmp_path_factory.mktemp("straight")
    config = write_tiny_config(work / "tiny.yaml", videos, work / "run")
    run_ok(config, log=work / "log.txt")
    return work / "run"


# ------------------------------------------------------------------------------------- launched runs (CI)


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_deepspeed_zero2_two_ranks_trains_logs_and_checkpoints(straight_run):
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from expmae.checkpoint import list_checkpoints, load_model_weights
    from expmae.flops import train_flops_per_clip
    from expmae.model import create_model

    steps = trained(read_metrics(straight_run))
    assert sorted(steps) == list(range(1, 2 * N + 1))
    losses = [steps[s]["loss"] for s in sorted(steps)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02, f"loss did not decrease: {losses}"
    for r in steps.values():  # the total is the weighted sum of the two branch losses (weights 1, 1)
        assert r["loss"] == pytest.approx(r["loss_mae"] + r["loss_video"], rel=1e-5)
    # lr: warmup to the peak over 2 steps, then cosine down to ~0 at the last step
    assert steps[2]["lr"] == pytest.approx(1e-3) and steps[1]["lr"] == pytest.approx(5e-4)
    assert steps[2 * N]["lr"] < steps[N]["lr"] < steps[3]["lr"]

    ckpts = list_checkpoints(straight_run / "checkpoints")
    assert [p.name for p in ckpts] == [f"step_{N:07d}", f"step_{2 * N:07d}"]  # keep_last=2
    final = ckpts[-1]
    assert (straight_run / "checkpoints" / "latest").read_text().strip() == final.name
    shards = sorted(p.name for p in (final / "pytorch_model").iterdir())  # DeepSpeed-sharded optimizer state
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    assert (final / "random_states_0.pkl").is_file() and (final / "random_states_1.pkl").is_file()
    state = json.loads((final / "train_state.json").read_text())
    assert state["step"] == 2 * N and state["micro_step"] == 2 * N and state["skipped_steps"] == 0

    # The exported weights rebuild the model strictly and are what training ended with (not the init).
    model_config, weights = load_model_weights(straight_run)
    model = create_model("tiny", **{k: v for k, v in model_config.items()})
    model.load_state_dict(weights, strict=True)
    _, earlier = load_model_weights(ckpts[0])  # training moved the weights between the two checkpoints
    assert not torch.equal(earlier["encoder.blocks.0.attn.qkv.weight"], weights["encoder.blocks.0.attn.qkv.weight"])
    assert load_file(str(final / "weights.safetensors")).keys() == weights.keys()

    events = EventAccumulator(str(straight_run / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_mae", "train/loss_video", "train/lr", "train/grad_norm",
            "perf/clips_per_s", "perf/tokens_per_s", "perf/data_wait_frac", "perf/model_tflops_per_device"} <= scalars
    assert "perf/mfu" not in scalars  # no accelerator peak to compare with on a CPU
    assert [e.step for e in events.Scalars("train/loss")] == list(range(2, 2 * N + 1, 2))
    assert all(0 <= e.value <= 1 for e in events.Scalars("perf/data_wait_frac"))
    # model FLOP/s per device = clips/s / ranks x the analytic FLOPs per clip (expmae.flops)
    per_clip = train_flops_per_clip(model.cfg)
    for c, f in zip(events.Scalars("perf/clips_per_s"), events.Scalars("perf/model_tflops_per_device")):
        assert f.value == pytest.approx(c.value / 2 * per_clip / 1e12, rel=1e-4)
    assert "reconstruction" in events.Tags()["images"]

    from PIL import Image

    png = straight_run / "recon" / f"step_{2 * N:07d}.png"
    img = Image.open(png)
    # per clip (recon_samples=2): one MAE row (3 frames) + 3 VideoMAE rows (4 frames); 32 px upscaled x3 to 96,
    # laid out by make_grid(nrow=1, padding=2)
    side, pad, rows, frames = 96, 2, 2 * (1 + 3), 4
    assert img.mode == "RGB" and img.size == (frames * side + 2 * pad, rows * (side + pad) + pad)


@pytest.mark.timeout(4 * LAUNCH_TIMEOUT)
def test_sigkill_then_resume_auto_continues_the_same_trajectory(tmp_path, videos, straight_run):
    from expmae.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    config = write_tiny_config(tmp_path / "tiny.yaml", videos, run)
    proc = launch(config, log=tmp_path / "log1.txt")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while latest_checkpoint(run / "checkpoints") is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_hard(proc)  # launcher and both ranks at once, no cleanup
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / f"step_{N:07d}", (
        f"expected to kill the run right after its step-{N} checkpoint; log tail:\n{(tmp_path / 'log1.txt').read_text()[-3000:]}")
    # A save killed half-way leaves a .tmp folder: it must be ignored and cleaned up.
    partial = run / "checkpoints" / f"step_{2 * N:07d}.tmp"
    partial.mkdir()
    (partial / "random_states_0.pkl").write_bytes(b"truncated")

    run_ok(config, "--resume", "auto", log=tmp_path / "log2.txt")
    assert f"resumed from {run / 'checkpoints' / f'step_{N:07d}'}" in (tmp_path / "log2.txt").read_text()
    assert not partial.exists()

    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 2 * N + 1))  # one trajectory, no duplicated steps
    straight, resumed = trained(read_metrics(straight_run)), trained(records)
    for step in range(N + 1, 2 * N + 1):
        for key in ("loss", "loss_mae", "loss_video", "lr", "grad_norm"):
            assert resumed[step][key] == pytest.approx(straight[step][key], abs=1e-5, rel=0), (step, key)


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_nonfinite_loss_on_one_rank_is_skipped_by_all_and_repeats_stop_with_a_checkpoint(tmp_path, videos):
    from expmae.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    # NaN on rank 1 only: rank 0 must skip too (else it would wait in DeepSpeed's all-reduce forever).
    # micro-step 2 is a lone NaN (skipped, training goes on); 5, 6, 7 hit train.max_nonfinite=3.
    config = write_tiny_config(tmp_path / "tiny.yaml", videos, run, train={"max_nonfinite": 3, "max_steps": 20},
                               debug={"nonfinite_steps": [2, 5, 6, 7], "nonfinite_rank": 1},
                               checkpoint={"every": 100})
    log = tmp_path / "log.txt"
    rc = finish(launch(config, log=log), log)
    text = log.read_text()
    assert rc != 0, text[-3000:]
    assert "3 non-finite losses in a row" in text and "Last good state saved to" in text

    records = read_metrics(run)
    assert [(r["step"], bool(r.get("skipped"))) for r in records] == [
        (1, False), (2, False), (3, True), (3, False), (4, False), (5, True), (5, True), (5, True)]
    assert all(math.isfinite(r["loss"]) for r in records if not r.get("skipped"))
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_0000004"
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 4 and state["skipped_steps"] == 4 and state["micro_step"] == 8


@pytest.mark.timeout(3 * LAUNCH_TIMEOUT)
def test_with_accumulation_a_non_finite_micro_batch_is_dropped_and_the_window_steps_on_the_rest(tmp_path, videos):
    """grad_accum_steps=2 on 2 DeepSpeed ranks: micro-step 3 (the last of window 1, whose backward takes DeepSpeed's
    step) and micro-step 4 (the first of window 2) are NaN on rank 1. Both windows still step, on their finite
    micro-batch alone: the weights equal those of a run in which the same micro-batches have a zero loss."""
    from safetensors.torch import load_file

    weights = {}
    for name, debug in (("nan", {"nonfinite_steps": [3, 4], "nonfinite_rank": 1}), ("zero", {"zero_loss_steps": [3, 4]})):
        run = tmp_path / name
        config = write_tiny_config(tmp_path / f"{name}.yaml", videos, run, debug=debug, checkpoint={"every": 100},
                                   train={"grad_accum_steps": 2, "max_steps": 3, "batch_size": 1})
        run_ok(config, log=tmp_path / f"{name}.txt")
        records = read_metrics(run)
        final = sorted((run / "checkpoints").glob("step_*"))[-1]
        weights[name] = load_file(str(final / "weights.safetensors"))
        state = json.loads((final / "train_state.json").read_text())
        assert state["step"] == 3 and state["micro_step"] == 6 and state["skipped_steps"] == 0
        if name == "nan":
            assert state["nonfinite_losses"] == 2
            assert [r.get("dropped_micro_batches", 0) for r in records] == [0, 1, 1]
            assert not any(r.get("skipped") for r in records)
            assert all(math.isfinite(r["loss"]) for r in records)
    assert weights["nan"].keys() == weights["zero"].keys()
    for key, value in weights["zero"].items():
        torch.testing.assert_close(weights["nan"][key], value, atol=0, rtol=0, msg=key)


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path, videos, straight_run):
    """train.init_from: a fresh run (one process, no launcher) whose model starts as the 2-rank run ended; with a
    negligible lr its first checkpoint still holds those weights."""
    from expmae.checkpoint import load_model_weights

    run = tmp_path / "run"
    config = write_tiny_config(tmp_path / "tiny.yaml", videos, run, checkpoint={"every": 1},
                               train={"max_steps": 1, "lr": 1e-12, "warmup_steps": 0, "init_from": str(straight_run)})
    proc = subprocess.run([sys.executable, "pretrain/train.py", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised: whole model from" in proc.stdout + proc.stderr
    _, source = load_model_weights(straight_run)
    _, started = load_model_weights(run)
    assert started.keys() == source.keys()
    for key, value in source.items():
        torch.testing.assert_close(started[key], value, atol=1e-6, rtol=0, msg=key)

    # a bad source fails at the start, in one line naming the key and the path
    proc = subprocess.run([sys.executable, "pretrain/train.py", "--config", str(config),
                           f"train.init_from={tmp_path / 'nowhere'}", f"train.output_dir={tmp_path / 'other'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and errors == [
        f"error: train.init_from={tmp_path / 'nowhere'}: {tmp_path / 'nowhere'}: no such file or folder"]


def test_typo_in_config_fails_before_torch_is_imported_with_the_key_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  bach_size: 4\n")
    code = ("import sys; from expmae.pretrain.cli import main; rc = main(['--config', sys.argv[1]]); "
            "print('rc', rc, 'torch' in sys.modules, 'deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "rc 2 False False"
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "train.bach_size" in err[0] and "did you mean 'batch_size'" in err[0] and str(bad) in err[0]


# ------------------------------------------------------------------------------------------- unit tests


def test_cosine_schedule_matches_hand_computed_values():
    from expmae.optim import cosine_lr, scaled_lr

    kw = dict(peak_lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [cosine_lr(s, **kw) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cosine_lr(4, **kw) == pytest.approx(1.0)
    assert cosine_lr(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay: cos(pi/2) = 0
    assert cosine_lr(14, **kw) == pytest.approx(0.1) and cosine_lr(100, **kw) == pytest.approx(0.1)
    assert cosine_lr(0, peak_lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=10) == pytest.approx(2.0)
    assert scaled_lr(1.5e-4, 512) == pytest.approx(3e-4)


def test_adamw_groups_exclude_norms_biases_and_tokens_from_weight_decay():
    from expmae.model import create_model
    from expmae.optim import create_optimizer

    model = create_model("tiny", img_size=32, num_frames=4, patch_size=8, embed_dim=48, depth=1, num_heads=3,
                         mae_decoder_embed_dim=32, mae_decoder_depth=1, mae_decoder_num_heads=2,
                         video_decoder_embed_dim=32, video_decoder_depth=1, video_decoder_num_heads=2)
    opt = create_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    for name, p in model.named_parameters():
        expect_no_decay = p.ndim <= 1 or name.endswith("mask_token")
        assert (name in no_decay) == expect_no_decay, name
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "encoder.norm.weight" in no_decay
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)


@pytest.mark.parametrize("compile_model", [False, True])
def test_train_compile_reaches_accelerate_dynamo(monkeypatch, compile_model):
    """train.compile sets accelerate's dynamo backend in the Accelerator itself: `accelerate launch
    --dynamo_backend` travels by environment variable, which accelerate's DeepSpeed launcher does not set."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DynamoBackend

    from expmae.config import load_config
    from expmae.pretrain.train import make_accelerator

    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    cfg = load_config(None, ["data.source=x", f"train.compile={str(compile_model).lower()}"])
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = make_accelerator(cfg)
        expected = DynamoBackend.INDUCTOR if compile_model else DynamoBackend.NO
        assert accelerator.state.dynamo_plugin.backend == expected
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_configure_deepspeed_fills_auto_values_and_refuses_a_disagreeing_launcher_config():
    from types import SimpleNamespace

    from expmae.config import ConfigError, load_config
    from expmae.pretrain.train import configure_deepspeed

    cfg = load_config(None, ["data.source=x", "train.batch_size=4", "train.grad_accum_steps=2", "train.clip_grad=1.5"])

    def fake(ds_config):
        plugin = SimpleNamespace(deepspeed_config=ds_config)
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2)

    ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
          "zero_optimization": {"stage": 2}}
    configure_deepspeed(fake(ds), cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 1.5
    with pytest.raises(ConfigError, match="gradient_clipping=1.0 but the training config implies 1.5"):
        configure_deepspeed(fake({"gradient_clipping": 1.0}), cfg)


def test_checkpoints_are_committed_by_rename_pruned_and_read_back(tmp_path):
    from accelerate import Accelerator

    from expmae.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, load_model_weights,
                                   remove_partial, resolve_checkpoint, save_checkpoint)

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    snapshots = {}
    for step in (1, 2, 3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        save_checkpoint(accelerator, model, ckpt_dir, step, {"step": step}, {"name": "toy"}, keep_last=2)
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step_0000002", "step_0000003"]
    assert (ckpt_dir / "latest").read_text().strip() == "step_0000003"

    # A kill mid-save leaves step_*.tmp (no train_state.json): never chosen, removed on the next start.
    (ckpt_dir / "step_0000004.tmp").mkdir()
    assert latest_checkpoint(ckpt_dir).name == "step_0000003"
    assert resolve_checkpoint(tmp_path / "run") == resolve_checkpoint(ckpt_dir) == ckpt_dir / "step_0000003"
    assert [p.name for p in remove_partial(ckpt_dir)] == ["step_0000004.tmp"]

    config, weights = load_model_weights(tmp_path / "run")
    assert config == {"name": "toy"}
    assert weights.keys() == snapshots[3].keys()
    assert all(torch.equal(weights[k], snapshots[3][k]) for k in weights)

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert load_checkpoint(accelerator, ckpt_dir / "step_0000002") == {"step": 2}
    assert all(torch.equal(v, snapshots[2][k]) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_launcher_configs_parse_and_leave_training_values_to_the_training_config():
    """DeepSpeed is configured in one place: the accelerate files pick topology, ZeRO stage and precision;
    batch size, accumulation and clipping come only from the training config (filled in by train.py)."""
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in sorted(CPU_DEEPSPEED.parent.glob("*.yaml"))}
    stages = {name: c.deepspeed_config.get("zero_stage") for name, c in configs.items() if c.deepspeed_config}
    assert {"single_gpu", "multi_gpu_ddp", "multi_node"} <= set(configs)
    assert {1, 2, 3} <= set(stages.values()) and stages["cpu_deepspeed_2proc"] == 2
    assert configs["multi_node"].num_machines > 1
    assert configs["deepspeed_zero3"].deepspeed_config["zero3_save_16bit_model"] is True  # weights.safetensors
    for name, c in configs.items():
        assert not {"gradient_accumulation_steps", "gradient_clipping", "deepspeed_config_file"} & set(c.deepspeed_config or {}), name
    assert configs["cpu_deepspeed_2proc"].mixed_precision == "no"
    assert all(configs[n].mixed_precision == "bf16" for n in configs if n != "cpu_deepspeed_2proc")


def test_demo_rejects_a_bad_override_before_doing_any_work(tmp_path, capsys):
    from expmae.demo import main

    assert main(["--out", str(tmp_path / "demo"), "train.batch_sise=4"]) == 2
    assert "unknown key 'train.batch_sise'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_scores_every_run_on_fresh_features(tmp_path, monkeypatch):
    """Features are resumable per file and keyed by the encoder's config, not its weights: a rerun of the demo
    (a new pretrained encoder, same config) must not be scored on the last run's features."""
    import expmae.benchmark
    from expmae.demo import evaluate

    stale = tmp_path / "eval" / "pretrained" / "features" / "clip_0.npy"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"last run")
    leftovers = []

    def evaluate_encoder(encoder_dir, benchmark, out_dir, **kw):
        leftovers.extend(Path(out_dir).rglob("*"))
        return {"probe": {}, "finetune": {}}

    monkeypatch.setattr(expmae.benchmark, "evaluate_encoder", evaluate_encoder)
    evaluate({"pretrained": tmp_path / "encoder"}, {}, tmp_path / "crops", tmp_path)
    assert leftovers == [] and not stale.exists()


def test_check_prints_the_resolved_config_and_it_loads_back(tmp_path, capsys):
    from expmae.config import load_config
    from expmae.pretrain.cli import main

    demo = REPO / "expmae" / "pretrain" / "configs" / "tiny_demo.yaml"
    assert main(["--check", "--config", str(demo), "model.mode=mae", "train.betas=[0.8, 0.9]"]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out)
    assert load_config(resolved) == load_config(demo, ["model.mode=mae", "train.betas=[0.8, 0.9]"])


def test_epoch_batch_sampler_resumes_mid_epoch_and_splits_ranks():
    from itertools import islice

    from expmae.data_batches import EpochBatchSampler

    def batches(rank, start_epoch=0, start_batch=0, n=9):
        sampler = EpochBatchSampler(14, batch_size=2, batches_per_epoch=3, rank=rank, world=2, seed=7,
                                    start_epoch=start_epoch, start_batch=start_batch)
        return list(islice(iter(sampler), n))

    straight = batches(0)
    assert [b[0][0] for b in straight] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # (epoch, index) pairs, 3 batches/epoch
    assert batches(0, start_epoch=1, start_batch=1, n=5) == straight[4:]  # resume = the same continuation
    for epoch in range(3):
        ours = [i for b in straight[3 * epoch : 3 * epoch + 3] for _, i in b]
        theirs = [i for b in batches(1)[3 * epoch : 3 * epoch + 3] for _, i in b]
        assert len(set(ours)) == 6 and not set(ours) & set(theirs)  # ranks see disjoint clips
    orders = [[i for b in straight[3 * e : 3 * e + 3] for _, i in b] for e in range(3)]
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
