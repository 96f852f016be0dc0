"""Cropping and feature extraction across processes (docs/cluster.md), on the CPU: `accelerate launch` with 2 and 3
processes gives the clips and merged manifest of one process; a launch killed mid-way and restarted with another
process count does every video exactly once; `--shard I/N` over all I covers the inputs once; the expMAE video
extractor under a 2-process launch writes the single process's .npy files.

Clips are compared byte for byte: the crop encodes with libx264 (the mpeg4 fallback where PyAV lacks it) at fixed
settings, which this suite shows to be deterministic (a rerun, another process, another process count)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from launching import free_port, kill_hard

from expmae.facecrop import main as crop_main
from expmae.facecrop_folder import crop_folder
from expmae.files import TEMP_MARK, JsonlLog
from expmae.shards import manifest_files, read_manifest
from expmae.synthetic import make_face_videos, make_noface_video

REPO = Path(__file__).resolve().parents[1]
OPTS = dict(size=32, detect_every=2)  # tiny synthetic 64 px videos, 8 frames: about a second each on one core
FLAGS = ["--size", "32", "--detect-every", "2", "--device", "cpu", "--quiet"]
TIMEOUT = 240


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """7 face videos (one nested: key sub/face_000) and one without a face (a failure every reader must see)."""
    src = tmp_path_factory.mktemp("raw")
    make_face_videos(src, n=6, num_frames=8, size=64, seed=5)
    make_face_videos(src / "sub", n=1, num_frames=8, size=64, seed=6)
    make_noface_video(src / "background.mp4", num_frames=8, size=64)
    return src


@pytest.fixture(scope="module")
def single(videos, tmp_path_factory) -> Path:
    """What one process crops (in this process, the pipelined path with --workers 0)."""
    out = tmp_path_factory.mktemp("single")
    summary = crop_folder(videos, out, workers=0, progress=False, **OPTS)
    assert (summary["done"], summary["failed"]) == (7, 1)
    return out


def launch(module: str, n: int, *args: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", module, *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_ok(module: str, n: int, *args: str, log: Path) -> str:
    proc = launch(module, n, *args, log=log)
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_hard(proc)
        pytest.fail(f"launch timed out; log tail:\n{log.read_text()[-3000:]}")
    assert rc == 0, f"rc={rc}; log tail:\n{log.read_text()[-3000:]}"
    return log.read_text()


def clips(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "clips").rglob("*")) if p.is_file()}


def by_key(records: list[dict]) -> dict[str, dict]:
    return {r["key"]: r for r in records}


def occurrences(out: Path, log: str = "manifest") -> dict[str, int]:
    """How often each key is recorded over every file of a log (the merged one included)."""
    counts: dict[str, int] = {}
    for path in manifest_files(out, log):
        for r in JsonlLog(path).read():
            counts[r["key"]] = counts.get(r["key"], 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------- crop


@pytest.mark.parametrize("n", [2, 3])
def test_launched_processes_crop_what_one_process_crops(videos, single, tmp_path, n, capsys):
    out = tmp_path / "crops"
    text = run_ok("expmae.facecrop", n, str(videos), str(out), *FLAGS, log=tmp_path / "launch.log")
    # each process printed its own summary and wrote only its own shard files
    summaries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert sorted(s["shard"] for s in summaries) == [f"{i}/{n}" for i in range(n)]
    assert sum(s["total"] for s in summaries) == 8 and sum(s["done"] for s in summaries) == 7
    assert not (out / "manifest.jsonl").exists()
    assert {p.name for p in manifest_files(out)} <= {f"shard-{i:05d}-of-{n:05d}.jsonl" for i in range(n)}
    assert set(occurrences(out).values()) == {1}  # no video cropped twice

    assert by_key(read_manifest(out)) == by_key(read_manifest(single))  # equal up to order
    assert clips(out) == clips(single)  # byte for byte
    assert [r["key"] for r in read_manifest(out, "failures")] == ["background"]
    from expmae.data import VideoClipDataset  # pretraining reads the shards as they are, before any merge

    dataset = VideoClipDataset(out, num_frames=4, input_size=32)
    assert dataset.names == sorted(by_key(read_manifest(single))) and all(Path(p).is_file() for p in dataset.paths)

    # the merge writes the single files downstream tools read, sorted by key; a second merge changes nothing
    capsys.readouterr()
    assert crop_main(["--merge", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"output_dir": str(out), "done": 7, "failed": 1,
                                                   "shards": len(manifest_files(out)) - 1}
    merged = (out / "manifest.jsonl").read_bytes()
    keys = [r["key"] for r in JsonlLog(out / "manifest.jsonl").read()]
    assert keys == sorted(by_key(read_manifest(single)))
    assert by_key(JsonlLog(out / "manifest.jsonl").read()) == by_key(JsonlLog(single / "manifest.jsonl").read())
    assert [r["key"] for r in JsonlLog(out / "failures.jsonl").read()] == ["background"]
    assert crop_main(["--merge", str(out)]) == 0
    assert (out / "manifest.jsonl").read_bytes() == merged


def test_killed_launch_restarted_with_another_process_count_does_every_video_once(videos, single, tmp_path):
    out = tmp_path / "crops"
    proc = launch("expmae.facecrop", 3, str(videos), str(out), *FLAGS, log=tmp_path / "first.log")
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and proc.poll() is None and not read_manifest(out):
        time.sleep(0.05)
    kill_hard(proc)
    finished = len(read_manifest(out))
    assert 1 <= finished < 7, f"the launch should have been killed part-way; log:\n{(tmp_path / 'first.log').read_text()[-2000:]}"
    # what a kill mid-write leaves behind: a half-written clip of an unfinished video (the restart owns it)
    todo = sorted(set(by_key(read_manifest(single))) - set(by_key(read_manifest(out))))
    stale = out / "clips" / f".{todo[0]}{TEMP_MARK}x1y2.mp4"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a clip")

    text = run_ok("expmae.facecrop", 2, str(videos), str(out), *FLAGS, log=tmp_path / "restart.log")
    summaries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert sum(s["skipped"] for s in summaries) == finished and sum(s["done"] for s in summaries) == 7 - finished
    assert occurrences(out) == dict.fromkeys(by_key(read_manifest(single)), 1)  # every video exactly once
    assert not list(out.rglob(f"*{TEMP_MARK}*"))  # no temp litter
    assert clips(out) == clips(single)
    assert crop_main(["--merge", str(out)]) == 0
    assert by_key(JsonlLog(out / "manifest.jsonl").read()) == by_key(read_manifest(single))


def test_shard_flag_over_all_shares_covers_the_inputs_once(videos, single, tmp_path, capsys):
    out = tmp_path / "crops"
    for i in range(3):  # what `sbatch --array=0-2` runs, one task after another
        crop_main([str(videos), str(out), *FLAGS, "--workers", "0", "--shard", f"{i}/3"])
    summaries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [s["shard"] for s in summaries] == ["0/3", "1/3", "2/3"] and sum(s["total"] for s in summaries) == 8
    assert occurrences(out) == dict.fromkeys(by_key(read_manifest(single)), 1)
    assert occurrences(out, "failures") == {"background": 1}
    assert clips(out) == clips(single)
    # a rerun of all shares as one process finds nothing to do
    assert crop_main([str(videos), str(out), *FLAGS, "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 7
    with pytest.raises(SystemExit):
        crop_main([str(videos), str(out), *FLAGS, "--shard", "3/3"])
    assert "expected I/N with 0 <= I < N" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- features


def test_launched_video_features_equal_one_process(tmp_path):
    from conftest import write_moving_clips

    from expmae.export import save_encoder
    from expmae.features.cli import main as features_main
    from expmae.model import create_model

    torch.manual_seed(0)
    model = create_model("tiny", img_size=32, num_frames=4, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    encoder = save_encoder(model, tmp_path / "expmae-tiny", sample_stride=2, model_name="tiny")
    src = write_moving_clips(tmp_path / "clips", n=5)
    args = ["video", str(src), None, "--model", str(encoder), "--device", "cpu", "--pooling", "none", "--no-progress"]
    assert features_main([a if a is not None else str(tmp_path / "one") for a in args]) == 0
    run_ok("expmae.features", 2, *[a if a is not None else str(tmp_path / "two") for a in args],
           log=tmp_path / "features.log")

    one, two = tmp_path / "one" / "expmae-tiny-video-FRA", tmp_path / "two" / "expmae-tiny-video-FRA"
    assert sorted(p.name for p in two.glob("*.npy")) == sorted(p.name for p in one.glob("*.npy")) == [
        f"clip_{i:02d}.npy" for i in range(5)]
    for path in one.glob("*.npy"):
        assert np.array_equal(np.load(path), np.load(two / path.name)), path.name
    assert {p.name for p in manifest_files(two)} == {"shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl"}
    assert by_key(read_manifest(two)) == by_key(read_manifest(one))
    assert (two / "extractor.json").read_text() == (one / "extractor.json").read_text()
    assert features_main(["--merge", str(two)]) == 0
    assert by_key(JsonlLog(two / "manifest.jsonl").read()) == by_key(JsonlLog(one / "manifest.jsonl").read())
