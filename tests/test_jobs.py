import json
import os

import numpy as np
import pytest

from expmae.jobs import JsonlLog, atomic_path, one_line, run_jobs, save_npy_atomic


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
    from expmae.jobs import TEMP_MARK, atomic_path, remove_stale_temp_files

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
