"""tools/gpu_check.sh --dry-run: every step of the one-GPU check (benchmarks, the device augmentation check, a
launched DeepSpeed pretraining with repeated sampling and device augmentation, export, features) on the CPU at
toy sizes, and the JSON summary it prints. The GPU run itself is the same script without --dry-run."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_step_and_prints_one_json_summary(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)  # stdout is the summary and nothing else
    assert summary == json.loads((out / "summary.json").read_text()) and summary["dry_run"] is True
    assert summary["augment_on_device_equals_cpu"]["equal"] is True
    assert summary["bench_pretrain"]["expmae"]["clips_per_s"] > 0
    data = summary["bench_data"]
    assert data["loader_best_per_core"] > 0 and data["demand"][0]["cores_per_gpu_needed"] > 0
    assert data["pipeline"][0]["pipeline_clips_per_s"] > 0
    crop = summary["bench_crop"]  # the crop step: every setting, and today's crop vs the pipelined one of a process
    assert len(crop["settings_frames_per_s"]) == 5 and min(crop["settings_frames_per_s"].values()) > 0
    assert crop["device"] == "cpu" and crop["frames_per_s_per_gpu"] is None and crop["same_output"] is True
    assert crop["per_core_ratio"] == pytest.approx(crop["pipelined_frames_per_core_s"] / crop["today_frames_per_core_s"],
                                                   rel=1e-2)
    train = summary["train"]
    assert train["steps"] == 4 and math.isfinite(train["last_loss"]) and train["clips_per_s"] > 0
    assert 0 <= train["data_wait_fraction"] <= 1
    assert train["mfu"] is None and train["peak_mem_gib"] is None  # a CPU run has neither
    assert any(name.endswith(".safetensors") for name in summary["export"]) and summary["features"] == 1
    for step in ("bench_pretrain", "bench_data", "bench_crop", "augment_check", "clips", "train", "export", "features"):
        assert (out / f"{step}.log").is_file(), step
    assert "[gpu_check] train: done" in proc.stderr


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
