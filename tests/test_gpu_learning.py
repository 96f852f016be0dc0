"""tools/gpu_learning.sh --dry-run: the one-GPU Table-1 study (expmae / mae / videomae against the random-init band,
pixels and a supervised reference) runs on the CPU at toy size and prints its JSON summary."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_learning_dry_run_prints_a_table_1_summary(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_learning.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary == json.loads((tmp_path / "summary.json").read_text()) and summary["dry_run"] is True
    assert set(summary["table"]) == {f"{t}/{r}/{p}" for t in ("static", "dynamic") for r in ("mean", "position")
                                     for p in ("knn", "linear")}
    for row in summary["table"].values():
        assert {"random_init", "pixels", "supervised", "expmae", "mae", "videomae"} <= set(row)
        assert all(0 <= row[k] <= 1 for k in ("random_init", "expmae", "mae", "videomae"))
    assert "| random init (mean, min-max) |" in proc.stderr and (tmp_path / "curve_static.png").is_file()


def test_gpu_learning_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_learning.sh"), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
