"""Launching real 2-rank `accelerate launch` + DeepSpeed runs on the CPU from tests (pretraining, export).

A plain module, not a test file: tests import these helpers (`from launching import ...`).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CPU_DEEPSPEED = REPO / "expmae" / "pretrain" / "configs" / "accelerate" / "cpu_deepspeed_2proc.yaml"
N = 5  # checkpoint / kill step; 12 clips / (2 ranks x batch 2) = 3 steps per epoch, so step 5 is mid-epoch
LAUNCH_TIMEOUT = 240


# ------------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:  # other runs on this machine may hold accelerate's default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_config(path: Path, videos: Path, output_dir: Path, **sections) -> Path:
    cfg = {
        "model": {"name": "tiny", "img_size": 32, "num_frames": 4, "patch_size": 8, "embed_dim": 48, "depth": 2,
                  "num_heads": 3, "mae_decoder_embed_dim": 32, "mae_decoder_depth": 1, "mae_decoder_num_heads": 2,
                  "video_decoder_embed_dim": 32, "video_decoder_depth": 1, "video_decoder_num_heads": 2},
        "data": {"source": str(videos), "sample_stride": 2, "num_workers": 1},
        "train": {"output_dir": str(output_dir), "batch_size": 2, "max_steps": 2 * N, "warmup_steps": 2,
                  "lr": 1.0e-3, "seed": 0},
        "log": {"log_every": 2, "recon_every": 4},
        "checkpoint": {"every": N, "keep_last": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_launcher(path: Path, *, bf16: bool = False, deepspeed: dict | None = None) -> Path:
    """A 2-rank CPU DeepSpeed launcher like CPU_DEEPSPEED; ``deepspeed``: a DeepSpeed JSON config (written next to
    it, batch / accumulation / clipping left "auto" for the training config) instead of the ZeRO-2 keys."""
    cfg = yaml.safe_load(CPU_DEEPSPEED.read_text())
    cfg["mixed_precision"] = "bf16" if bf16 else "no"
    if deepspeed is not None:
        ds_json = path.with_suffix(".json")
        auto = dict.fromkeys(("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                              "gradient_clipping"), "auto")
        ds_json.write_text(json.dumps({**auto, **deepspeed}))
        cfg["deepspeed_config"] = {"deepspeed_config_file": str(ds_json), "zero3_init_flag": False}
        cfg.pop("mixed_precision")  # the JSON decides ("bf16": {"enabled": ...})
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, *extra: str, log: Path, launcher: Path = CPU_DEEPSPEED) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher),
           "--main_process_port", str(free_port()), "-m", "expmae.pretrain", "--config", str(config), *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_hard(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and each rank's: torchrun starts every rank in a session of its
    own, so killing only the launcher's group would leave the ranks training on as orphans."""
    import psutil

    groups = {proc.pid}
    try:
        groups |= {os.getpgid(child.pid) for child in psutil.Process(proc.pid).children(recursive=True)}
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def gone(pid: int) -> bool:
    """Dead, or a zombie waiting for its (new) parent to reap it."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids, timeout: float) -> float:
    """Seconds until every pid in ``pids`` is gone; fails the test after ``timeout``."""
    import time

    t0 = time.monotonic()
    while not all(gone(p) for p in pids):
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"still alive after {timeout} s: {[p for p in pids if not gone(p)]}")
        time.sleep(0.05)
    return time.monotonic() - t0


def finish(proc: subprocess.Popen, log: Path, timeout: float = LAUNCH_TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_hard(proc)
        pytest.fail(f"launch timed out after {timeout}s (deadlock? a stale lock file left in ~/.cache/torch_extensions/"
                    f"*/deepspeed_shm_comm/ by a build that was killed makes a rank wait forever); log tail:\n"
                    f"{log.read_text()[-3000:]}")


def run_ok(config: Path, *extra: str, log: Path, launcher: Path = CPU_DEEPSPEED) -> None:
    rc = finish(launch(config, *extra, log=log, launcher=launcher), log)
    assert rc == 0, f"training failed (rc={rc}); log tail:\n{log.read_text()[-3000:]}"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def trained(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if not r.get("skipped")}
