"""Resumable batch jobs over many inputs: face cropping, feature extraction.

A job over tens of thousands of videos must never die on one bad sample and never lose finished work.
The contract used by every tool in expmae:

- each input has a key (usually the video's stem); a worker turns one input into outputs + a record;
- outputs are written atomically (temp file in the same folder, then ``os.replace``), so a killed
  job leaves either the old state or the complete new file, never a truncated one;
- the record is appended to ``manifest.jsonl`` *after* its outputs exist; an input is finished iff
  its key is in the manifest, so a rerun skips exactly the finished work and never duplicates it;
- an exception becomes a one-line reason in ``failures.jsonl``; the job goes on.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence


TEMP_MARK = ".partial-"  # in atomic_path's temporary names: '.<stem>.partial-<random><suffix>'


def remove_stale_temp_files(root: str | os.PathLike, stem: str = "*") -> list[Path]:
    """Delete the temporary files that atomic_path writers killed mid-write left under ``root`` (recursively;
    only those of outputs named ``stem`` if given). Call it only when no writer is running there."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.rglob(f".{stem}{TEMP_MARK}*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The temporary name keeps the final suffix (or ``suffix``) so writers that infer the format from the
    extension (np.save, video muxers) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}{TEMP_MARK}",
                               suffix=suffix or path.suffix or ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp creates 0600 files; give outputs the permissions a plain open() would (shared machines).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False,
               newline: bool = True) -> None:
    """Write ``obj`` as indented JSON, atomically; numpy scalars and arrays become numbers and lists."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default) + ("\n" if newline else "")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist") and type(o).__module__ == "numpy":  # numpy without importing it here
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_npy_atomic(path: str | os.PathLike, array) -> Path:
    """np.save through :func:`atomic_path` (np.save appends .npy unless the name already ends with it)."""
    import numpy as np

    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


def one_line(exc: BaseException) -> str:
    """A single-line reason for a failure report: exception type and the first line of its message."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


class JsonlLog:
    """An append-only JSON-lines file keyed by ``record['key']``; tolerant of a torn last line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a kill mid-write: that input is simply redone
                    continue
        return records

    def keys(self) -> set[str]:
        return {r["key"] for r in self.read() if "key" in r}

    def append(self, record: dict) -> None:
        self.extend([record])

    def extend(self, records: Iterable[dict]) -> None:
        """Append records with one write and one fsync."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: Iterable[dict]) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")


class JsonlShards:
    """A JSON-lines log kept as one file per writing process (``folder/<shard>.jsonl``) and read merged: processes
    on several machines never append to one file (appends from two NFS clients can interleave or overwrite)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def append(self, record: dict, shard: str) -> None:
        JsonlLog(self.folder / f"{shard}.jsonl").append(record)

    def read(self) -> list[dict]:
        """Every shard's records, shard after shard (in name order)."""
        files = sorted(self.folder.glob("*.jsonl")) if self.folder.is_dir() else []
        return [r for f in files for r in JsonlLog(f).read()]


def process_shard() -> str:
    """This process's shard name: its launcher rank and DataLoader worker, e.g. ``rank3-worker1``."""
    from torch.utils.data import get_worker_info

    worker = get_worker_info()
    return f"rank{os.environ.get('RANK', '0')}-" + (f"worker{worker.id}" if worker is not None else "main")


@dataclass
class JobSummary:
    total: int = 0
    done: int = 0  # finished in this run
    skipped: int = 0  # finished by an earlier run
    failed: int = 0
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Exit-status rule of our tools: success if anything is finished (now or before), or nothing to do."""
        return self.total == 0 or self.done + self.skipped > 0

    def as_dict(self) -> dict:
        return {"total": self.total, "done": self.done, "skipped": self.skipped, "failed": self.failed}


def _call(work: Callable[[Any], dict], item: Any) -> tuple[bool, Any]:
    # Runs in the worker: turn every exception into a reason string so one bad input never kills the pool.
    try:
        return True, work(item)
    except Exception as exc:  # noqa: BLE001 - the whole point is to record and go on
        return False, one_line(exc)


def run_jobs(
    items: Sequence[Any],
    work: Callable[[Any], dict],
    out_dir: str | os.PathLike,
    *,
    key: Callable[[Any], str] = lambda item: Path(item).stem,
    workers: int = 0,
    limit: int | None = None,
    retry_failed: bool = False,
    desc: str = "jobs",
    progress: bool = True,
) -> JobSummary:
    """Run ``work(item) -> record`` over ``items``, resumably, writing manifest/failures into ``out_dir``.

    ``work`` must be a picklable top-level callable (a function or functools.partial) when ``workers > 0``;
    it writes its outputs itself (atomically) and returns a JSON-able record. ``workers=0`` runs in-process.
    ``limit`` caps how many *new* inputs are attempted. Earlier failures are skipped unless ``retry_failed``.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    remove_stale_temp_files(out_dir)  # a killed earlier run's half-written outputs
    manifest, failures = JsonlLog(out_dir / "manifest.jsonl"), JsonlLog(out_dir / "failures.jsonl")
    finished = manifest.keys()
    known_failed = set() if retry_failed else failures.keys()

    summary = JobSummary(total=len(items))
    keyed = {}
    for item in items:
        k = key(item)
        if k in keyed:
            raise ValueError(f"two inputs share the key {k!r}: {keyed[k][1]!r} and {item!r}; keys (file stems) must be unique")
        keyed[k] = (k, item)
    todo = []
    for k, item in keyed.values():
        if k in finished or k in known_failed:
            summary.skipped += k in finished
            summary.failed += k in known_failed and k not in finished
        else:
            todo.append((k, item))
    if limit is not None:
        todo = todo[:limit]

    def record(k: str, item: Any, ok: bool, result: Any) -> None:
        if ok:
            manifest.append({"key": k, **result})
            summary.done += 1
        else:
            entry = {"key": k, "input": str(item), "reason": result}
            failures.append(entry)
            summary.failed += 1
            summary.failures.append(entry)

    bar = tqdm(total=len(todo), desc=desc, disable=not progress, unit="item")
    if workers <= 0:
        for k, item in todo:
            record(k, item, *_call(work, item))
            bar.update()
    else:
        _run_pool(todo, work, workers, record, bar, out_dir)
    bar.close()

    # Keep failures.jsonl to one line per input that is still failing (a retried success drops out).
    finished = manifest.keys()
    latest = {r["key"]: r for r in failures.read() if "key" in r and r["key"] not in finished}
    if latest or failures.path.exists():
        failures.rewrite(latest.values())
    return summary


def _run_pool(todo, work, workers, record, bar, out_dir: Path) -> None:
    """A process pool that survives a worker dying hard (say, a decoder segfault). When the pool breaks,
    the inputs that were in flight are retried one by one, each in a pool of its own, so the culprit is
    identified and recorded; the rest continue in a fresh pool."""
    ctx = get_context("spawn")  # forking after torch/decord started their threads is unsafe
    pending = list(todo)
    while pending:
        in_flight: dict = {}
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            try:
                while pending or in_flight:
                    while pending and len(in_flight) < 2 * workers:
                        k, item = pending[0]
                        in_flight[pool.submit(_call, work, item)] = (k, item)  # raises if the pool broke:
                        pending.pop(0)  # so only dequeue once submitted, or the input would be lost
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for fut in done:
                        result = fut.result()  # raises BrokenProcessPool if a worker died
                        record(*in_flight.pop(fut), *result)
                        bar.update()
            except BrokenProcessPool:
                pass
        # The broken pool's other workers were killed, maybe mid-write; none is running now.
        remove_stale_temp_files(out_dir)
        for k, item in in_flight.values():
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as alone:
                try:
                    record(k, item, *alone.submit(_call, work, item).result())
                except BrokenProcessPool:
                    record(k, item, False, "worker process crashed while processing this input")
            bar.update()
