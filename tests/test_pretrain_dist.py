"""Distributed pretraining on 2 CPU ranks (gloo), beyond the ZeRO-2 fp32 path of test_pretrain.py: exact targets
under bf16, the host synchronisations of a step, per-rank failure logs, the DataLoader stall guard, the partitioned
ZeRO-3 path (stage3_param_persistence_threshold 0: no parameter stays whole), the start-up checks every rank
takes together (shared output folder, rank 0's resume choice, ZeRO-3 weight gathering), a launcher killed alone (no
rank or DataLoader worker outlives it) and a second run on a live run's folder (refused before writing).

Launched runs are shared between tests by module-scoped fixtures.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import TINY, write_moving_clips
from launching import (
    LAUNCH_TIMEOUT, finish, gone, kill_hard, launch, read_metrics, run_ok, trained, wait_gone, write_launcher,
    write_tiny_config,
)



@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_moving_clips(tmp_path_factory.mktemp("videos"))


# --------------------------------------------------------------------------------- bf16 against fp32 (ZeRO-2)


@pytest.fixture(scope="module")
def precision_runs(tmp_path_factory, videos):
    """The same 3 steps (accumulation 2) in fp32 and in bf16, ZeRO-2; micro-step 0's inputs dumped, host
    synchronisations counted; one corrupt clip among the videos (replaced, logged per rank and worker)."""
    work = tmp_path_factory.mktemp("precision")
    data = work / "videos"
    data.mkdir()
    for p in videos.iterdir():
        (data / p.name).symlink_to(p)
    (data / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        launcher = write_launcher(work / f"{name}.yaml", bf16=bf16)
        config = write_tiny_config(work / f"{name}_train.yaml", data, work / name, log={"log_every": 100, "recon_every": 0},
                                   train={"max_steps": 3, "batch_size": 1, "grad_accum_steps": 2},
                                   checkpoint={"every": 100}, debug={"dump_inputs": True, "count_syncs": True})
        run_ok(config, log=work / f"{name}.txt", launcher=launcher)
        runs[name] = work / name
    return runs


@pytest.mark.timeout(3 * LAUNCH_TIMEOUT)
def test_bf16_run_trains_in_bf16_on_the_targets_of_an_fp32_run(precision_runs):
    from safetensors.torch import load_file

    from expmae.checkpoint import load_model_weights
    from expmae.model import create_model

    _, weights = load_model_weights(precision_runs["bf16"])
    assert weights["encoder.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16  # DeepSpeed bf16 did run
    assert all(math.isfinite(r["loss"]) for r in read_metrics(precision_runs["bf16"]))
    model = create_model("tiny", **TINY)  # targets depend on the clips and masks only, not on the weights
    checked = 0
    for rank in (0, 1):
        fp32, bf16 = (load_file(str(precision_runs[n] / "debug" / f"inputs_rank{rank}.safetensors")) for n in ("fp32", "bf16"))
        assert fp32.keys() == bf16.keys() >= {"clips", "mask_mae", "frame_idx", "mask_video"}
        assert bf16["clips"].dtype == torch.float32  # the model gets float32 clips and casts them itself
        for key in fp32:  # same clip, same masks
            assert torch.equal(fp32[key], bf16[key]), key
        for clips in (fp32["clips"], bf16["clips"]):
            B = clips.shape[0]
            frames = clips.transpose(1, 2)[torch.arange(B), bf16["frame_idx"]]
            ids_mae = torch.nonzero(bf16["mask_mae"])[:, 1].view(B, -1)
            ids_video = torch.nonzero(bf16["mask_video"])[:, 1].view(B, -1)
            targets = (model.mae_target(frames, ids_mae), model.video_target(clips, ids_video))
            if clips is fp32["clips"]:
                reference = targets
            else:
                for ours, theirs in zip(targets, reference):
                    assert torch.equal(ours, theirs)
        # what the old path (clips rounded to bf16 before the forward) would have trained on: visibly different
        rounded = fp32["clips"].bfloat16().float()
        rounded_frames = rounded.transpose(1, 2)[torch.arange(B), bf16["frame_idx"]]
        assert (model.mae_target(rounded_frames, ids_mae) - reference[0]).abs().max() > 1e-3
        checked += 1
    assert checked == 2


@pytest.mark.timeout(3 * LAUNCH_TIMEOUT)
def test_a_step_synchronises_the_host_once_per_micro_step(precision_runs):
    """debug.count_syncs: per micro-step, our code reads one tensor back (the all-reduced losses and flags) and
    nothing calls a device synchronisation. With DeepSpeed's throughput timer on, the 3rd step would show one sync per
    micro-step and two at the boundary (checked by hand: timers.throughput.enabled=true in a DeepSpeed JSON)."""
    for name in ("fp32", "bf16"):
        for rank in (0, 1):
            counts = json.loads((precision_runs[name] / "debug" / f"syncs_rank{rank}.json").read_text())
            assert [c["micro_step"] for c in counts] == list(range(6))
            assert [c["boundary"] for c in counts] == [False, True] * 3
            for c in counts:
                assert c.get("read:expmae", 0) == 1, (name, rank, c)  # the all-reduced [losses, flags]
                assert not {k: v for k, v in c.items() if k.startswith("sync:")}, (name, rank, c)
                others = {k: v for k, v in c["where"].items() if not k.startswith("read:expmae.")}
                if c["boundary"]:  # DeepSpeed's own checks in its optimizer step (overflow, grad-norm validity)
                    assert all(k.startswith("read:deepspeed.") for k in others) and sum(others.values()) <= 2, c
                else:
                    assert not others, (name, rank, c)


def test_sync_counter_sees_synchronisations_and_read_backs_by_caller():
    """The probe behind the test above can fail: a device synchronisation (what DeepSpeed's timers call) and a
    read-back are counted, attributed to their caller."""
    import importlib

    from deepspeed.accelerator import get_accelerator

    from expmae.pretrain.debug import SyncCounter

    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")}
    saved_sync = (torch.cuda.synchronize, torch.cpu.synchronize, get_accelerator().synchronize)
    try:
        counter = SyncCounter().install()
        x = torch.ones(3)
        get_accelerator().synchronize()
        x.sum().item()
        float(x[0])
        counter.mark(0, True)
        logger = importlib.import_module("expmae.pretrain.logger")
        assert logger._value(torch.tensor(2.0)) == 2.0  # a read-back from inside expmae counts as ours
        counter.mark(1, False)
        first, second = counter.per_micro_step
        assert {k: v for k, v in first.items() if k != "where"} == {"micro_step": 0, "boundary": True,
                                                                    "sync:other": 1, "read:other": 2}
        assert sorted(k.split(":")[0] for k in first["where"]) == ["read", "read", "sync"]
        assert {k: v for k, v in second.items() if k != "where"} == {"micro_step": 1, "boundary": False,
                                                                     "read:expmae": 1}
        assert [k.rsplit(":", 1)[0] for k in second["where"]] == ["read:expmae.pretrain.logger._value"]
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.cuda.synchronize, torch.cpu.synchronize = saved_sync[:2]
        del get_accelerator().synchronize


def test_clip_failures_are_logged_per_rank_and_worker_and_merged_on_read(precision_runs):
    from expmae.shards import JsonlShards

    folder = precision_runs["fp32"] / "data_failures"
    names = sorted(p.name for p in folder.iterdir())
    assert names and all(n.startswith(("rank0-", "rank1-")) and n.endswith(".jsonl") for n in names)
    records = JsonlShards(folder).read()
    assert records and {r["key"] for r in records} == {"corrupt"}
    assert sum(len(p.read_text().splitlines()) for p in folder.iterdir()) == len(records)


# ------------------------------------------------------------------------------------- DataLoader stall


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_a_stuck_data_worker_stops_the_run_with_a_checkpoint_and_the_clip_named_and_resumes_exactly(tmp_path, videos):
    from itertools import islice

    from expmae.checkpoint import latest_checkpoint
    from expmae.data_batches import EpochBatchSampler

    run = tmp_path / "run"
    # clip_05 hangs from epoch 1 on; 12 clips / (2 ranks x batch 2) = 3 steps per epoch
    config = write_tiny_config(tmp_path / "tiny.yaml", videos, run, data={"timeout": 8},
                               debug={"hang_clip": 5, "hang_epoch": 1}, checkpoint={"every": 100},
                               log={"recon_every": 0})
    log = tmp_path / "log.txt"
    rc = finish(launch(config, log=log), log)
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert rc != 0 and len(errors) == 1, text[-3000:]
    assert "data.timeout=8 s" in errors[0] and "clip_05.mp4" in errors[0] and "Last good state saved to" in errors[0]
    # the batch of epoch 1 that holds clip 5 (on whichever rank) never came: the steps before it are the last good state
    batch = min(b for rank in (0, 1) for b, items in enumerate(islice(iter(EpochBatchSampler(
        12, batch_size=2, batches_per_epoch=3, rank=rank, world=2, seed=0, start_epoch=1)), 3))
        if 5 in [i for _, i in items])
    ckpt = latest_checkpoint(run / "checkpoints")
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 3 + batch and state["epoch"] == 1 and state["batch_in_epoch"] == batch
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 3 + batch + 1))

    # once the clip decodes again, --resume auto ends exactly as a run that never stalled: the checkpoint holds
    # the RNG states of the window's start (the rank that got data had drawn masks before the stall was known)
    from expmae.checkpoint import load_model_weights

    run_ok(config, "--resume", "auto", "debug.hang_clip=-1", log=tmp_path / "resumed.txt")
    straight = tmp_path / "straight"
    run_ok(config, "debug.hang_clip=-1", f"train.output_dir={straight}", log=tmp_path / "straight.txt")
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(straight)]
    _, resumed_weights = load_model_weights(run)
    _, straight_weights = load_model_weights(straight)
    assert resumed_weights.keys() == straight_weights.keys()
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in straight_weights)


# -------------------------------------------------------------------------- partitioned ZeRO-3


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_gather_16bit_weights_on_model_save": True}}


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, videos):
    """ZeRO-3 with every parameter partitioned: a 10-step run with accumulation 2 in which micro-step 3 (the
    last of window 2, whose backward takes DeepSpeed's step) is NaN on rank 1; its twin with that micro-batch's loss
    zeroed instead; a resume of the first from its step-6 checkpoint; and a resume of the finished run."""
    work = tmp_path_factory.mktemp("zero3")
    launcher = write_launcher(work / "zero3.yaml", deepspeed=ZERO3)
    common = dict(train={"batch_size": 1, "grad_accum_steps": 2}, checkpoint={"every": 2, "keep_last": 10})
    config = write_tiny_config(work / "straight.yaml", videos, work / "straight", **common,
                               debug={"nonfinite_steps": [3], "nonfinite_rank": 1})
    run_ok(config, log=work / "straight.txt", launcher=launcher)
    twin = write_tiny_config(work / "twin.yaml", videos, work / "twin", train={**common["train"], "max_steps": 2},
                             checkpoint=common["checkpoint"], debug={"zero_loss_steps": [3]})
    run_ok(twin, log=work / "twin.txt", launcher=launcher)
    resumed = write_tiny_config(work / "resumed.yaml", videos, work / "resumed", **common,
                                debug={"nonfinite_steps": [3], "nonfinite_rank": 1})
    run_ok(resumed, "--resume", str(work / "straight" / "checkpoints" / "step_0000006"), log=work / "resumed.txt",
           launcher=launcher)
    run_ok(config, "--resume", "auto", log=work / "finished.txt", launcher=launcher)
    return work


@pytest.mark.timeout(5 * LAUNCH_TIMEOUT)
def test_zero3_partitioned_trains_drops_a_nonfinite_micro_batch_and_draws_recon_grids(zero3):
    from safetensors.torch import load_file

    run = zero3 / "straight"
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r.get("dropped_micro_batches", 0) for r in records[:3]] == [0, 1, 0]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert sum(r["loss"] for r in records[-3:]) < sum(r["loss"] for r in records[:3])
    state = json.loads((run / "checkpoints" / "step_0000010" / "train_state.json").read_text())
    assert state["nonfinite_losses"] == 1 and state["skipped_steps"] == 0 and state["micro_step"] == 20
    # the dropped micro-batch weighs exactly nothing: the weights after step 2 equal the zero-loss twin's
    ours = load_file(str(run / "checkpoints" / "step_0000002" / "weights.safetensors"))
    twin = load_file(str(zero3 / "twin" / "checkpoints" / "step_0000002" / "weights.safetensors"))
    assert ours.keys() == twin.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], twin[key], atol=0, rtol=0, msg=key)
    assert sorted(p.name for p in (run / "recon").iterdir()) == ["step_0000004.png", "step_0000008.png",
                                                                 "step_0000010.png"]


@pytest.mark.timeout(5 * LAUNCH_TIMEOUT)
def test_zero3_partitioned_resumes_exactly_and_a_finished_run_resumes_to_nothing(zero3):
    straight, resumed = trained(read_metrics(zero3 / "straight")), trained(read_metrics(zero3 / "resumed"))
    assert sorted(resumed) == list(range(7, 11))
    for step in range(7, 11):
        for key in ("loss", "loss_mae", "loss_video", "lr", "grad_norm"):
            assert resumed[step][key] == pytest.approx(straight[step][key], abs=1e-5, rel=0), (step, key)
    finished = (zero3 / "finished.txt").read_text()
    assert f"checkpoint: {zero3 / 'straight' / 'checkpoints' / 'step_0000010'}" in finished
    assert [r["step"] for r in read_metrics(zero3 / "straight")] == list(range(1, 11))  # nothing retrained


@pytest.mark.timeout(5 * LAUNCH_TIMEOUT)
def test_zero3_partitioned_checkpoint_exports_the_trained_encoder(zero3, tmp_path):
    from expmae.checkpoint import load_model_weights
    from expmae.export import export_encoder, load_encoder
    from expmae.model import create_model

    out = tmp_path / "encoder"
    summary = export_encoder(zero3 / "straight", out, weights="zero")  # fp32 masters merged from the shards
    assert summary["source"]["step"] == 10
    config, weights = load_model_weights(zero3 / "straight")  # the 16-bit gather of the same step
    model = create_model("tiny", **config)
    model.load_state_dict(weights, strict=True)
    clips = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(out).forward_clips(clips), model.encoder.forward_clips(clips),
                                   atol=1e-6, rtol=0)


# ------------------------------------------------------- a killed launcher, and a second run on a live folder


def run_processes(launcher_pid: int) -> tuple[dict[int, int], list[int]]:
    """A launched run's ranks ({RANK: pid}, the launcher's children) and every process below them (DataLoader
    workers)."""
    import psutil

    ranks, below = {}, []
    for child in psutil.Process(launcher_pid).children():
        rank = child.environ().get("RANK")
        if rank is not None:
            ranks[int(rank)] = child.pid
            below += [p.pid for p in child.children(recursive=True)]
    return ranks, below


def folder_state(run: Path) -> dict:
    """Every file's size and mtime, but the owner's lease (its heartbeat rewrites it)."""
    from expmae.runlock import LEASE_NAME

    return {p.relative_to(run).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in run.rglob("*") if p.name != LEASE_NAME}


@pytest.fixture(scope="module")
def orphaned(tmp_path_factory, videos):
    """Run A (2 DeepSpeed ranks, one DataLoader worker each) checkpoints at step 3 and then waits on a decoder stuck
    in epoch 1 (debug.hang_clip). While it lives, B (--resume auto) and C (a fresh run) start on its folder. Then
    the launcher's process group alone gets SIGKILL, and B runs again. A straight run (no hang) is the reference."""
    import signal
    import time

    from expmae.checkpoint import latest_checkpoint

    work = tmp_path_factory.mktemp("orphaned")
    run = work / "run"
    common = dict(train={"max_steps": 6}, checkpoint={"every": 3}, log={"recon_every": 0})
    config = write_tiny_config(work / "tiny.yaml", videos, run, debug={"hang_clip": 5, "hang_epoch": 1}, **common)
    straight = write_tiny_config(work / "straight.yaml", videos, work / "straight", **common)
    procs, ranks, workers = [], {}, []
    try:
        procs += [launch(config, log=work / "a.txt"), launch(straight, log=work / "straight.txt")]
        a = procs[0]
        deadline = time.monotonic() + 2 * LAUNCH_TIMEOUT  # two runs start at once (both build DeepSpeed's shm op)
        while latest_checkpoint(run / "checkpoints") is None and a.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert latest_checkpoint(run / "checkpoints") is not None and a.poll() is None, (work / "a.txt").read_text()[-3000:]
        time.sleep(1)  # past the checkpoint: the ranks wait for the stuck clip's batch
        ranks, workers = run_processes(a.pid)
        before = folder_state(run)
        procs += [launch(config, "--resume", "auto", "debug.hang_clip=-1", log=work / "b.txt"),
                  launch(config, "debug.hang_clip=-1", log=work / "c.txt")]
        refused = {"b": finish(procs[2], work / "b.txt"), "c": finish(procs[3], work / "c.txt")}
        after = folder_state(run)
        os.killpg(a.pid, signal.SIGKILL)  # the launcher alone: its ranks run in sessions of their own
        a.wait()
        orphans_lived = wait_gone(list(ranks.values()) + workers, timeout=30)
        run_ok(config, "--resume", "auto", "debug.hang_clip=-1", log=work / "b_again.txt")
        assert finish(procs[1], work / "straight.txt") == 0, (work / "straight.txt").read_text()[-3000:]
    finally:
        for proc in procs:
            kill_hard(proc)
        for pid in [*ranks.values(), *workers]:  # only if the test failed: the death signal took them already
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    return dict(work=work, run=run, ranks=ranks, workers=workers, refused=refused, before=before, after=after,
                orphans_lived=orphans_lived)


@pytest.mark.timeout(6 * LAUNCH_TIMEOUT)
def test_a_killed_launcher_leaves_no_rank_or_worker_alive_and_resume_auto_ends_as_a_straight_run(orphaned):
    assert sorted(orphaned["ranks"]) == [0, 1] and len(orphaned["workers"]) >= 2  # one DataLoader worker per rank
    assert orphaned["orphans_lived"] < 5, orphaned  # measured: well under a second (PR_SET_PDEATHSIG)
    work, run = orphaned["work"], orphaned["run"]
    assert f"resumed from {run / 'checkpoints' / 'step_0000003'}" in (work / "b_again.txt").read_text()
    resumed, straight = read_metrics(run), read_metrics(work / "straight")
    assert [r["step"] for r in straight] == list(range(1, 7))
    assert resumed == straight  # steps, losses, lr, grad norms: bit for bit


@pytest.mark.timeout(6 * LAUNCH_TIMEOUT)
def test_a_second_run_on_a_live_folder_stops_before_writing_and_takes_over_once_the_owner_is_dead(orphaned):
    import socket

    work, run, owner = orphaned["work"], orphaned["run"], orphaned["ranks"][0]
    for name, rc in orphaned["refused"].items():
        text = (work / f"{name}.txt").read_text()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert rc != 0 and len(errors) == 1, text[-3000:]  # every rank stopped; rank 0 says why, once
        assert errors[0].startswith(f"error: train.output_dir={run} is in use by a live run: pid {owner} on host "
                                    f"{socket.gethostname()} since "), errors[0]
        assert f"kill {owner} on {socket.gethostname()}" in errors[0] and "or use another train.output_dir" in errors[0]
    assert orphaned["after"] == orphaned["before"]  # neither wrote a byte: no config.yaml, nonce, metrics line
    assert read_metrics(run) == read_metrics(work / "straight")  # B, once A was gone, finished it exactly


# ---------------------------------------------------------------------------- start-up checks (unit)


def _two_ranks(fn, tmp_path):
    """Run ``fn(rank, tmp_path)`` in 2 gloo processes; returns what each returned (or raised, as text)."""
    import torch.multiprocessing as mp

    from launching import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    mp.spawn(_rank_main, args=(fn, tmp_path), nprocs=2, join=True)
    return [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)]


def _rank_main(rank, fn, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = fn(rank, tmp_path)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result = f"{type(exc).__name__}: {exc}"
    (tmp_path / f"result{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _fake_accelerator(rank):
    from types import SimpleNamespace

    return SimpleNamespace(is_main_process=rank == 0, num_processes=2)


def _resume_choice(rank, tmp_path):
    from conftest import write_checkpoint
    from expmae.model import create_model
    from expmae.pretrain.resume import choose_resume

    if rank == 0:
        write_checkpoint(tmp_path / "run", create_model("tiny", **TINY), step=4)
    else:  # what a node with a stale (or different) view of the folder would list: a newer checkpoint
        write_checkpoint(tmp_path / "stale", create_model("tiny", **TINY), step=8)
    import torch.distributed as dist

    dist.barrier()
    where = tmp_path / ("run" if rank == 0 else "stale") / "checkpoints"
    return str(choose_resume(_fake_accelerator(rank), "auto", where))


def _shared_dir(rank, tmp_path):
    from expmae.pretrain.resume import check_shared_output_dir

    shared = tmp_path / "shared"
    check_shared_output_dir(_fake_accelerator(rank), shared)
    # rank 1 on a node-local folder of the same name
    check_shared_output_dir(_fake_accelerator(rank), shared, seen_as=tmp_path / f"local{rank}" if rank else None,
                            wait_s=0.5)
    return "ok"


def _claim(rank, tmp_path):
    from expmae.pretrain.resume import claim_output_dir

    lock = claim_output_dir(_fake_accelerator(rank), tmp_path / "run")
    return [rank, lock is not None]


def test_rank0_owns_the_run_folder_and_every_rank_gets_its_answer(tmp_path):
    from expmae.runlock import FolderLock

    assert _two_ranks(_claim, tmp_path) == [[0, True], [1, False]]  # rank 0 held it (released at its exit)
    with FolderLock(tmp_path / "run"):  # a live owner: both ranks stop with its one line
        results = _two_ranks(_claim, tmp_path)
    assert results[0] == results[1] and "\n" not in results[0]
    assert results[0].startswith(f"FolderInUse: train.output_dir={tmp_path / 'run'} is in use by a live run: pid "
                                 f"{os.getpid()} on host ")


def test_rank0_chooses_the_checkpoint_to_resume_for_every_rank(tmp_path):
    assert _two_ranks(_resume_choice, tmp_path) == [str(tmp_path / "run" / "checkpoints" / "step_0000004")] * 2


def test_an_output_dir_that_is_not_shared_stops_every_rank_with_one_line(tmp_path):
    results = _two_ranks(_shared_dir, tmp_path)
    assert results[0] == results[1]
    assert results[0].startswith("ConfigError: train.output_dir=") and "\n" not in results[0]
    assert "(rank 1 cannot see rank 0's .expmae_nonce there): it must be a folder that all machines share" in results[0]


def test_deepspeed_defaults_timers_off_fp32_accumulation_vit_sized_buckets_and_zero3_gathering():
    from types import SimpleNamespace

    from expmae.config import ConfigError, load_config
    from expmae.pretrain.train import configure_deepspeed

    cfg = load_config(None, ["data.source=x", "train.grad_accum_steps=4"])

    def configured(ds, mixed_precision="bf16", width=768):
        plugin = SimpleNamespace(deepspeed_config=ds)
        fake = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=8,
                               mixed_precision=mixed_precision)
        configure_deepspeed(fake, cfg, width=width)
        return ds

    ds = configured({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "allgather_bucket_size": 1000}})
    assert ds["timers"] == {"throughput": {"enabled": False}} and ds["wall_clock_breakdown"] is False
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    z = ds["zero_optimization"]
    assert z["overlap_comm"] is True and z["reduce_bucket_size"] == 24 * 768**2  # two ViT-B blocks: 14.2 M
    assert z["allgather_bucket_size"] == 1000  # what the launcher sets stays
    assert "data_types" not in configured({"zero_optimization": {"stage": 2}}, mixed_precision="no")
    asked = configured({"zero_optimization": {"stage": 1}, "timers": {"throughput": {"enabled": True}}})
    assert asked["timers"]["throughput"]["enabled"] is True  # timers when the DeepSpeed config asks for them
    z3 = configured({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}},
                    width=1024)["zero_optimization"]
    assert z3["stage3_prefetch_bucket_size"] == 24 * 1024**2 and z3["stage3_param_persistence_threshold"] == 10240
    with pytest.raises(ConfigError, match="ZeRO-3 without 16-bit weight gathering.*zero3_save_16bit_model: true"):
        configured({"zero_optimization": {"stage": 3}})


def test_plan_and_state_count_steps_epochs_and_data_position():
    from expmae.config import ConfigError, load_config
    from expmae.pretrain.state import Plan, TrainState

    cfg = load_config(None, ["data.source=x", "train.batch_size=2", "train.grad_accum_steps=3", "train.epochs=4",
                             "train.warmup_epochs=1.5", "train.base_lr=1e-4"])
    plan = Plan.from_config(cfg, num_clips=50, world=2)  # 25 clips per rank -> 12 batches -> 4 whole windows
    assert (plan.steps_per_epoch, plan.batches_per_epoch, plan.total_steps, plan.warmup_steps) == (4, 12, 16, 6)
    assert plan.global_batch == 12 and plan.peak_lr == pytest.approx(1e-4 * 12 / 256) and plan.num_epochs == 4
    assert plan.run_shape == {"world_size": 2, "batch_size": 2, "grad_accum_steps": 3}
    with pytest.raises(ConfigError, match="has 11 clips, fewer than one optimizer step needs"):
        Plan.from_config(cfg, num_clips=11, world=2)

    state = TrainState()
    for _ in range(13):
        state.next_batch(plan.batches_per_epoch)
    assert (state.epoch, state.batch_in_epoch) == (1, 1)
    state.consecutive_nonfinite = 3
    saved = {**state.to_dict(), "run_shape": plan.run_shape}
    resumed = TrainState.from_saved(saved)  # a run stopped by the guard resumes with a fresh allowance
    assert resumed == TrainState(epoch=1, batch_in_epoch=1) and resumed is not state
