import json
import os

import numpy as np
import pytest

from expmae.files import JsonlLog, atomic_path, save_npy_atomic
from expmae.jobs import one_line, run_jobs


def square_to_npy(item, out_dir):
    """Worker used by the tests: fails on negatives, dies hard on 'crash', writes one .npy otherwise."""
    if item == "crash":
        os._exit(13)  # what a decoder segfault looks like to the pool
    value = int(item)
    if value < 0:
        raise ValueError(f"negative input {value}\nsecond line that must not reach the report")
    save_npy_atomic(os.path.join(out_dir, f"{item}.npy"), np.array([value * value]))
    return {"value": value * value}


def _work(out_dir):
    import functools

    return functools.partial(square_to_npy, out_dir=str(out_dir))


def test_atomic_path_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temp litter


def test_one_line_reason():
    assert one_line(ValueError("bad value\nmore")) == "ValueError: bad value"
    assert one_line(KeyError()) == "KeyError"


def test_run_jobs_records_failures_and_resumes_without_redoing(tmp_path):
    items = ["1", "2", "-3", "4"]
    s1 = run_jobs(items, _work(tmp_path), tmp_path, key=str, limit=3, progress=False)
    assert (s1.done, s1.failed, s1.skipped) == (2, 1, 0)
    failures = JsonlLog(tmp_path / "failures.jsonl").read()
    assert failures == [{"key": "-3", "input": "-3", "reason": "ValueError: negative input -3"}]

    mtime = (tmp_path / "1.npy").stat().st_mtime_ns
    s2 = run_jobs(items, _work(tmp_path), tmp_path, key=str, progress=False)
    assert (s2.done, s2.skipped, s2.failed) == (1, 2, 1)  # only "4" is new; "-3" stays a known failure
    assert (tmp_path / "1.npy").stat().st_mtime_ns == mtime  # finished work was not redone
    manifest = JsonlLog(tmp_path / "manifest.jsonl").read()
    assert sorted(r["key"] for r in manifest) == ["1", "2", "4"]  # no duplicates
    assert np.load(tmp_path / "4.npy").tolist() == [16]
    assert s2.ok


def test_torn_manifest_line_means_redo_not_crash(tmp_path):
    run_jobs(["1"], _work(tmp_path), tmp_path, key=str, progress=False)
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"key": "2", "val')  # killed mid-append
    s = run_jobs(["1", "2"], _work(tmp_path), tmp_path, key=str, progress=False)
    assert (s.done, s.skipped) == (1, 1)


def test_duplicate_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="share the key"):
        run_jobs(["a/x.mp4", "b/x.mp4"], _work(tmp_path), tmp_path, progress=False)


def test_pool_survives_a_worker_dying_hard(tmp_path):
    items = ["1", "crash", "2", "-1", "3"]
    s = run_jobs(items, _work(tmp_path), tmp_path, key=str, workers=2, progress=False)
    assert (s.done, s.failed) == (3, 2)
    reasons = {r["key"]: r["reason"] for r in JsonlLog(tmp_path / "failures.jsonl").read()}
    assert reasons == {"crash": "worker process crashed while processing this input",
                       "-1": "ValueError: negative input -1"}
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["1.npy", "2.npy", "3.npy"]


def test_nothing_succeeded_is_not_ok(tmp_path):
    s = run_jobs(["-1", "-2"], _work(tmp_path), tmp_path, key=str, progress=False)
    assert not s.ok and s.as_dict() == {"total": 2, "done": 0, "skipped": 0, "failed": 2}
    assert json.loads((tmp_path / "failures.jsonl").read_text().splitlines()[0])["key"] == "-1"


def test_atomic_outputs_get_umask_permissions_not_mkstemp_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_npy_atomic(tmp_path / "x.npy", np.zeros(2))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_stale_temp_files_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    from expmae.files import TEMP_MARK, atomic_path, remove_stale_temp_files

    with pytest.raises(RuntimeError):  # a writer that dies inside atomic_path cleans up after itself...
        with atomic_path(tmp_path / "a.npy") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    # ...one that is killed cannot: what it leaves has the mark, in any subfolder
    (tmp_path / "sub").mkdir()
    left = [tmp_path / f".a{TEMP_MARK}x1.npy", tmp_path / "sub" / f".b{TEMP_MARK}y2.mp4"]
    kept = [tmp_path / "a.npy", tmp_path / ".hidden", tmp_path / "sub" / ".b.mp4", tmp_path / "manifest.jsonl"]
    for path in left + kept:
        path.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path, "a") == [left[0]]
    assert remove_stale_temp_files(tmp_path) == [left[1]]
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


# ------------------------------------------------------------------------------------------- shares of a job


def test_shard_from_flag_launcher_and_slurm_array():
    from expmae.shards import Shard, parse_shard, resolve_shard, slurm_array_shard

    assert parse_shard("3/8") == Shard(3, 8) and str(Shard(3, 8)) == "3/8"
    for bad in ("8/8", "-1/4", "3", "a/b", "1/0"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)
    assert resolve_shard(None, {}) == Shard(0, 1)  # alone: everything
    launched = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5"}
    assert resolve_shard(None, launched) == Shard(5, 16)
    array = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "73"}
    assert slurm_array_shard(array) == Shard(2, 64)  # --array=10-73
    assert slurm_array_shard({**array, "SLURM_ARRAY_TASK_COUNT": "64"}) == Shard(2, 64)
    assert slurm_array_shard({**array, "SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_STEP": "2"}) == Shard(2, 32)
    with pytest.raises(ValueError, match="evenly spaced"):  # --array=10-73:2 but task 13: not a step of it
        slurm_array_shard({**array, "SLURM_ARRAY_TASK_ID": "13", "SLURM_ARRAY_TASK_STEP": "2"})
    with pytest.raises(ValueError, match="pass --shard"):
        slurm_array_shard({"SLURM_ARRAY_TASK_ID": "3"})
    # an array task that launches 8 processes: task 2 of 64, rank 5 of 8 -> share 2 * 8 + 5 of 512
    assert resolve_shard(None, {**array, "RANK": "5", "WORLD_SIZE": "8"}) == Shard(21, 512)
    assert resolve_shard("1/4", {**array, "RANK": "1", "WORLD_SIZE": "2"}) == Shard(3, 8)  # the flag wins over Slurm
    assert resolve_shard(None, {"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}) == Shard(0, 1)  # not a share (see docs)


def test_shards_split_keys_disjointly_completely_and_stably():
    import hashlib

    from expmae.shards import Shard, key_hash

    keys = [f"video_{i:05d}" for i in range(500)]
    assert key_hash("video_00000") == int(hashlib.sha1(b"video_00000").hexdigest()[:16], 16)
    for n in (1, 2, 3, 7):
        owners = [[i for i in range(n) if Shard(i, n).owns(k)] for k in keys]
        assert all(len(o) == 1 for o in owners)  # every key in exactly one share
        sizes = np.bincount([o[0] for o in owners], minlength=n)
        assert sizes.min() > 500 / n * 0.7  # roughly balanced (sqrt(500 / n) spread)
    # nested shares (Slurm task x launched rank) partition the keys too
    nested = [Shard(t, 2).split(Shard(r, 3)) for t in range(2) for r in range(3)]
    assert sorted(s.index for s in nested) == list(range(6)) and {s.count for s in nested} == {6}


def test_sharded_run_restarted_with_another_count_does_each_input_once(tmp_path):
    from expmae.files import TEMP_MARK
    from expmae.shards import Shard, manifest_files, merge_job_logs, read_manifest

    items = [str(i) for i in range(-2, 10)]  # -2, -1 fail
    for i in range(2):  # 2 processes, each stopped after 2 inputs
        s = run_jobs(items, _work(tmp_path), tmp_path, key=str, limit=2, progress=False, shard=Shard(i, 2),
                     output_of=lambda k: tmp_path / f"{k}.npy")
        assert s.total == sum(Shard(i, 2).owns(k) for k in items)
    first = {r["key"] for r in read_manifest(tmp_path)} | {r["key"] for r in read_manifest(tmp_path, "failures")}
    assert len(first) == 4 and not (tmp_path / "manifest.jsonl").exists()
    # stale temp files of unfinished keys: a process cleans those of its own share only
    todo = [k for k in items if k not in first and int(k) >= 0]
    mine, other = next(k for k in todo if Shard(0, 3).owns(k)), next(k for k in todo if not Shard(0, 3).owns(k))
    for k in (mine, other):
        (tmp_path / f".{k}{TEMP_MARK}zz.npy").write_bytes(b"half")
    restart = lambda i: run_jobs(items, _work(tmp_path), tmp_path, key=str, progress=False, shard=Shard(i, 3),  # noqa: E731
                                 output_of=lambda k: tmp_path / f"{k}.npy")
    summaries = [restart(0)]
    assert (tmp_path / f".{other}{TEMP_MARK}zz.npy").exists() and not (tmp_path / f".{mine}{TEMP_MARK}zz.npy").exists()
    summaries += [restart(1), restart(2)]
    assert sum(s.total for s in summaries) == len(items)
    assert not list(tmp_path.glob(f".*{TEMP_MARK}*"))
    done = [r["key"] for f in manifest_files(tmp_path) for r in JsonlLog(f).read()]
    assert sorted(done, key=int) == [str(i) for i in range(10)]  # each once, over every process's file
    shards = len(manifest_files(tmp_path))
    assert merge_job_logs(tmp_path) == {"done": 10, "failed": 2, "shards": shards}
    merged = (tmp_path / "manifest.jsonl").read_text()
    assert [r["key"] for r in JsonlLog(tmp_path / "manifest.jsonl").read()] == sorted(done)
    assert [r["key"] for r in JsonlLog(tmp_path / "failures.jsonl").read()] == ["-1", "-2"]
    assert merge_job_logs(tmp_path)["done"] == 10 and (tmp_path / "manifest.jsonl").read_text() == merged
    again = run_jobs(items, _work(tmp_path), tmp_path, key=str, progress=False)  # one process: nothing left
    assert (again.done, again.skipped, again.failed) == (0, 10, 2)


def test_pipelined_work_is_recorded_when_its_future_completes(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        work = lambda item: pool.submit(square_to_npy, item, str(tmp_path))  # noqa: E731
        s = run_jobs(["2", "-3", "4"], work, tmp_path, key=str, progress=False)
    assert (s.done, s.failed) == (2, 1)
    assert {r["key"]: r["value"] for r in JsonlLog(tmp_path / "manifest.jsonl").read()} == {"2": 4, "4": 16}
    assert JsonlLog(tmp_path / "failures.jsonl").read()[0]["reason"] == "ValueError: negative input -3"


def test_background_iter_hands_over_items_and_errors():
    from expmae.jobs import background_iter

    assert list(background_iter(iter(range(5)), depth=2)) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise OSError("decoder died")

    it = background_iter(broken())
    assert next(it) == 1
    with pytest.raises(OSError, match="decoder died"):
        next(it)


def test_create_exclusive_first_writer_wins(tmp_path):
    from expmae.files import create_exclusive

    assert create_exclusive(tmp_path / "s.json", "first") is True
    assert create_exclusive(tmp_path / "s.json", "second") is False
    assert (tmp_path / "s.json").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["s.json"]
