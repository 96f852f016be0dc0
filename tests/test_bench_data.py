"""tools/bench_data.py: quick synthetic runs in-process, their JSON Lines schema and the arithmetic that must hold
between the fields, the crop box error on a hand-computed case, and one-line errors for bad flags.
No timing is asserted."""
import json
import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_tool):
    return load_tool("bench_data")


def run(bench, capsys, argv):
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


def check_env(record):
    env = record["env"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["threads"] == 1
    assert env["cpu_count"] >= 1 and env["load_avg_before"] >= 0 and env["load_avg_after"] >= 0
    assert "git_commit" in env and env["time"].endswith("+00:00")


def test_quick_pipeline_one_object_per_worker_count(bench, single_thread, capsys, tmp_path):
    out = tmp_path / "runs" / "bench_data.jsonl"
    records, err = run(bench, capsys, ["--quick", "--synthetic", "--only", "pipeline", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == records  # the --out copy
    assert [r["bench"] for r in records] == ["pipeline", "pipeline"]
    assert [r["workers"] for r in records] == [0, 2]  # the default --workers
    assert err.count("[bench_data] pipeline:") == 2
    quick = bench.load_bench_pretrain().PRESETS["quick"]
    for r in records:
        # the toy model of bench_pretrain's quick preset, fed by the loader at the model's geometry
        assert (r["model"], r["img_size"], r["num_frames"], r["batch_size"]) == (
            quick["model"], quick["img_size"], quick["num_frames"], quick["batch_size"])
        assert r["model_config"]["img_size"] == r["img_size"] and r["model_config"]["mode"] == "expmae"
        assert r["stored_form"] == "mp4 64" and r["num_clips"] == 4 and r["inputs"]["source"].startswith("synthetic")
        assert r["device"] == "cpu" and r["dtype"] == "float32" and math.isfinite(r["last_loss"])
        for key in ("step_clips_per_s", "loader_clips_per_s", "pipeline_clips_per_s", "loop_s"):
            assert r[key] > 0, key
        # the arithmetic between the fields
        assert len(r["step_ms"]) == r["steps"] == 3
        assert r["median_step_ms"] == pytest.approx(statistics.median(r["step_ms"]), abs=1e-3)
        assert r["step_clips_per_s"] == pytest.approx(r["batch_size"] / (r["median_step_ms"] / 1e3), rel=1e-9)
        assert r["pipeline_clips_per_s"] == pytest.approx(r["steps"] * r["batch_size"] / r["loop_s"], rel=1e-9)
        assert r["loader_headroom"] == pytest.approx(r["loader_clips_per_s"] / r["step_clips_per_s"], rel=1e-9)
        assert r["data_wait_fraction"] == pytest.approx(r["data_wait_s"] / r["loop_s"], rel=1e-9)
        assert 0 <= r["data_wait_fraction"] <= 1
        data_bound = r["loader_headroom"] < 1 or r["data_wait_fraction"] > bench.DATA_WAIT_LIMIT
        assert r["bottleneck"] == ("data" if data_bound else "model")
        assert r["bottleneck_rule"] == bench.BOTTLENECK_RULE
        check_env(r)
    # with no workers every batch is decoded inside next(loader): the loop must have waited for it
    assert records[0]["data_wait_s"] > 0


def test_quick_run_of_all_parts(bench, single_thread, capsys):
    records, _ = run(bench, capsys, ["--quick", "--synthetic", "--workers", "0", "--samples", "8"])
    crop = [r for r in records if r["bench"] == "crop"]
    loader = [r for r in records if r["bench"] == "loader"]
    pipeline = [r for r in records if r["bench"] == "pipeline"]
    demand = [r for r in records if r["bench"] == "demand"]
    assert [r["bench"] for r in records] == (["crop"] * len(crop) + ["crop_pipeline"] + ["loader"] * len(loader)
                                             + ["demand", "pipeline"])
    for r in records:
        check_env(r)
        assert r["inputs"]["videos"] == {f"face_00{i}": "96x96" for i in range(4)}

    assert [r["setting"] for r in crop] == list(bench.CROP_SETTINGS)
    for r in crop:
        assert r["videos"] == 4 and r["failed"] == {} and r["frames"] == 4 * 24 and r["crop_size"] == 64
        assert r["frames_per_s"] == pytest.approx(r["frames"] / r["seconds"], rel=2e-2)
        assert r["videos_per_s"] == pytest.approx(r["videos"] / r["seconds"], rel=2e-2)
        assert 0 <= r["jitter_mean"] and 0 <= r["raw_jitter_mean"]
        assert set(r["box_vs_naive"]["per_video_centre_err_mean"]) == set(r["inputs"]["videos"])
    naive = crop[0]["box_vs_naive"]  # the reference against itself
    assert naive["centre_err_mean"] == naive["centre_err_max"] == naive["side_err_mean"] == 0

    # today's per-video crop vs the pipelined in-process job: the same clips, and the arithmetic of the ratio
    (cp,) = [r for r in records if r["bench"] == "crop_pipeline"]
    assert cp["same_output"] is True and cp["videos"] == 4 and cp["rounds"] == 2 and cp["frames_per_s_per_gpu"] is None
    for way in (cp["today"], cp["pipelined"]):
        assert way["frames"] == 2 * 4 * 24  # source frames, both rounds
        assert way["frames_per_core_s"] == pytest.approx(way["frames"] / way["cpu_seconds"], rel=2e-2)
        assert way["frames_per_s"] == pytest.approx(way["frames"] / way["seconds"], rel=2e-2)
    ratio = cp["pipelined"]["frames_per_core_s"] / cp["today"]["frames_per_core_s"]
    assert cp["per_core_ratio"] == pytest.approx(ratio, abs=2e-3)  # its value is a measurement: not asserted

    forms = bench.STORED_FORMS["quick"]
    settings = lambda i: bench.LOADER_SETTINGS if i == 0 else bench.LOADER_SETTINGS[1::2]  # noqa: E731 - all for the default form
    names = [f"face clips, {f}, augment on {a}, {k} samples/clip" for i, f in enumerate(forms) for a, k in settings(i)]
    names += ["raw videos, full pipeline (crop+resize whole frame)", "raw videos, plain decord decode only (baseline)"]
    assert [r["dataset"] for r in loader] == names  # one object per dataset and worker count (here: 0)
    by_form = {r["stored_form"]: r for r in loader}
    for r in loader:
        assert r["workers"] == 0 and r["clips_per_s"] > 0 and r["clips_per_s_per_core"] > 0
        assert r["augment"] is (r["dataset"] != names[-1])
        if r["stored_form"] != "raw":
            k = r["repeated_samples"]
            assert r["input_size"] == 64 and r["decode_clips_per_s_per_core"] > 0
            # --samples 8 in batches of 4 samples, each of a different clip: at least 3 groups of 4 clips, k samples each
            assert r["samples"] == 3 * 4 * k and r["batch_size"] == 4
            assert (r["device_augment_ms_per_sample"] is None) is (r["augment_on"] == "cpu")
    # .npy stores raw uint8 frames: 64 * 64 * 3 bytes each, plus a 128-byte header per file
    assert 64 * 64 * 3 <= by_form["npy 64"]["bytes_per_stored_frame"] <= 64 * 64 * 3 + 128
    assert by_form["mp4 32"]["bytes_per_stored_frame"] < by_form["mp4 64"]["bytes_per_stored_frame"] \
        < by_form["npy 64"]["bytes_per_stored_frame"]
    assert loader[-1]["bytes_per_stored_frame"] == loader[-2]["bytes_per_stored_frame"]  # the same raw videos

    # demand: ViT-B 16x224 at 40% of 989 TFLOP/s by default, against the best face-clip loader per core
    (d,) = demand
    from expmae.flops import train_flops_per_clip

    cfg = bench.load_bench_pretrain().get_config("base", img_size=224, num_frames=16)
    assert (d["model"], d["img_size"], d["num_frames"], d["peak_tflops"], d["mfu"]) == ("base", 224, 16, 989.0, 0.4)
    assert d["demand_clips_per_s"] == pytest.approx(989e12 * 0.4 / train_flops_per_clip(cfg), abs=0.05)
    best = max((r for r in loader if r["stored_form"] == "mp4 64"), key=lambda r: r["clips_per_s_per_core"])
    assert (d["best_loader"], d["best_clips_per_s_per_core"]) == (best["dataset"], best["clips_per_s_per_core"])
    assert d["cores_per_gpu_needed"] == pytest.approx(d["demand_clips_per_s"] / best["clips_per_s_per_core"], abs=0.006)  # rounded
    best = max((r for r in loader if r["stored_form"] != "raw"), key=lambda r: r["clips_per_s_per_core"])
    assert d["best_loader_any_form"] == best["dataset"]
    assert d["cores_per_gpu_needed_any_form"] <= d["cores_per_gpu_needed"]

    assert pipeline[0]["workers"] == 0 and pipeline[0]["pipeline_clips_per_s"] > 0


def test_box_error_hand_computed_case(bench):
    def plan(start, boxes):
        boxes = np.array(boxes, np.float64)
        return SimpleNamespace(start=start, end=start + len(boxes), boxes=boxes)

    ref = plan(0, [[10, 10, 20], [10, 10, 20], [10, 10, 20]])
    # frames 1..3; only 1 and 2 are shared: centre offsets 5 and 0 px on a side of 20, sides 25 and 20
    other = plan(1, [[13, 14, 25], [10, 10, 20], [99, 99, 99]])
    assert bench.box_error(other, ref) == pytest.approx((0.125, 0.25, 0.125))
    assert bench.box_error(ref, ref) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "x"], "--workers 'x': expected a comma-separated list of integers >= 0"),
    (["--workers", "0,-2"], "--workers '0,-2': expected a comma-separated list of integers >= 0"),
    (["--model", "huge"], "--model huge --img-size 32 --num-frames 4: unknown expMAE model 'huge'"),
    (["--img-size", "36"], "ExpMAEConfig.img_size=36: expected a multiple of patch_size=8"),
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--samples", "2"], "--samples 2: the loader part needs more than one batch (--loader-batch-size 4)"),
    (["--repeated-samples", "0"], "--repeated-samples 0: expected an integer >= 1"),
    (["--mfu", "1.5"], "--mfu 1.5 --peak-tflops 989.0: expected 0 < mfu <= 1"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--batch-size", "0"], ""),
])
def test_bad_arguments_exit_with_one_line_errors(bench, single_thread, capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        bench.main(["--quick", "--synthetic", *argv])
    text = str(err.value)
    assert text and "\n" not in text and message in text
    assert argv[0] in text and argv[1] in text  # names the flag and the value
    assert capsys.readouterr().out == ""  # nothing measured, nothing printed
