"""tools/learning_curve.py --quick: the whole study at toy size writes its PNGs, JSON and table, and the
random-init band's seed 0 is exactly the pretraining run's step 0 (the same encoder, the same evaluator)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_quick_study_writes_curves_table_and_pictures(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "learning_curve.py"), "--quick", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for name in ("curves.json", "table.md", "curve_static.png", "curve_dynamic.png", "end_to_end_static.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    study = json.loads((tmp_path / "curves.json").read_text())
    records = study["curves"]["expmae"]["0"]
    assert [r["step"] for r in records] == [0, 3, 6]
    band = study["references"]["random_init"]
    assert len(band) == 2
    step0 = records[0]
    for key, value in band[0].items():  # init seed 0 = the run's own step 0
        if key.endswith("_acc"):
            assert step0[key] == value, key
    summary = study["summary"]["static"]["mean/knn"]
    assert summary["random_init"]["n"] == 2 and summary["pixels"] is not None and summary["supervised"] is not None
    assert summary["modes"]["expmae"]["samples"] == [0, 12, 24]  # steps x 4 clips
    held_out = sum(1 for line in (tmp_path / "benchmark/labelled/labels.csv").read_text().splitlines()
                   if line.endswith(",test,static"))
    assert summary["held_out"] == held_out
    sup, cnn = study["references"]["supervised"]["static"], study["references"]["frame_cnn"]["static"]
    assert sup["test_clips"] == cnn["test_clips"] == held_out and sup["steps"] == cnn["steps"] == 4
    assert summary["end_to_end"] == {"supervised": sup["head_acc"], "frame_cnn": cnn["head_acc"]}
    assert summary["supervised"] == sup["eval/static/L4/mean/knn_acc"] and "eval/static/knn_acc" not in cnn
    best = max(summary["end_to_end"], key=summary["end_to_end"].get)
    assert summary["ceiling"] == {"reference": best, "head_acc": summary["end_to_end"][best]}
    margin = summary["end_to_end"][best] - max(summary["random_init"]["max"], summary["pixels"])
    assert summary["ceiling_margin"] == pytest.approx(margin)
    table = (tmp_path / "table.md").read_text()
    assert "| random init (mean, min-max) |" in table and "| supervised (its encoder, probed) |" in table
    assert f"{margin:+.3f}" in table and f"accuracy on {held_out} held-out clips" in table
    assert f"| frame_cnn | {cnn['head_acc']:.3f} [" in table
    # a rerun resumes: nothing is pretrained again, the references come from their caches
    log = tmp_path / "runs" / "expmae_seed0" / "console.log"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "learning_curve.py"), "--quick", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and json.loads((tmp_path / "curves.json").read_text())["curves"] == study["curves"]
    assert "held-out head accuracy" not in proc.stdout, proc.stdout  # the end-to-end references: cached
    assert json.loads((tmp_path / "curves.json").read_text())["references"] == study["references"]
    starts = [line.split("expMAE pretraining")[1] for line in log.read_text().splitlines() if "expMAE pretraining" in line]
    assert len(starts) == 2 and "resumed from" in starts[1] and "step_0000006" in starts[1]
