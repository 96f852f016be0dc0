"""tools/ablation.py --quick: the seed's ablation end to end at CI size (pretraining in 3 modes, export, features,
finetune protocol and linear probe on both benchmark tasks), and the held-out identities kept out of training."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = ("random", "mae", "videomae", "expmae")


def test_quick_ablation_prints_the_table_and_never_trains_on_held_out_identities(tmp_path):
    out = tmp_path / "ablation"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "ablation.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table] == ["encoder", *ROWS]
    assert [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")] == table

    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == set(ROWS)
    for per_task in results.values():
        assert set(per_task) == {"static", "dynamic"}
        for r in per_task.values():
            assert 0 <= r["probe"]["accuracy"] <= 1 and math.isfinite(r["finetune"]["metric"])
            f = r["finetune"]
            assert math.isclose(f["metric"], f["metric_e"] - 0.25 * f["metric_v"], abs_tol=1e-6)

    for task in ("static", "dynamic"):
        clips = list(csv.DictReader(open(out / "data" / task / "clips.csv")))
        held_out = {c["name"] for c in clips if c["split"] == "test"}
        assert held_out
        # pretraining saw only train identities
        assert not held_out & {p.stem for p in (out / "pretrain_clips").iterdir()}
        for row in ROWS:
            finetune = out / "eval" / row / task / "finetune"
            # every fold's training and validation samples are the out-of-fold rows: train identities only
            cv_names = {r["name"] for r in csv.DictReader(open(finetune / "predictions_cv.csv"))}
            assert cv_names and not cv_names & held_out
            test_names = {r["name"] for r in csv.DictReader(open(finetune / "predictions_test-label.csv"))}
            assert test_names == held_out

    # a rerun reuses the finished runs, exports and features: no pretraining, the same table
    again = subprocess.run([sys.executable, str(REPO / "tools" / "ablation.py"), "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[pretrain" not in again.stdout
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == table
