"""Resumable batch jobs over many inputs: face cropping, feature extraction.

A job over tens of thousands of videos must never die on one bad sample and never lose finished work.
The contract used by every tool in expmae:

- each input has a key (usually the video's stem); a worker turns one input into outputs + a record;
- outputs are written atomically (temp file in the same folder, then ``os.replace``), so a killed
  job leaves either the old state or the complete new file, never a truncated one;
- the record is appended to ``manifest.jsonl`` *after* its outputs exist; an input is finished iff
  its key is in the manifest, so a rerun skips exactly the finished work and never duplicates it;
- an exception becomes a one-line reason in ``failures.jsonl``; the job goes on.

Across processes and machines (``accelerate launch``, torchrun, a Slurm array, ``--shard I/N``): each process
takes the inputs whose key hashes to its :class:`Shard` and appends its records to its own files,
``manifest.d/<shard>.jsonl`` and ``failures.d/<shard>.jsonl`` (a lone process keeps the two plain files).
Readers merge them (:func:`read_manifest`); an input is finished iff its key is in *any* of them, so a rerun with
another number of processes skips exactly the finished work; :func:`merge_job_logs` writes the single files.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import os
import queue
import tempfile
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence


TEMP_MARK = ".partial-"  # in atomic_path's temporary names: '.<stem>.partial-<random><suffix>'


def remove_stale_temp_files(root: str | os.PathLike, stem: str = "*",
                            outputs: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """Delete the temporary files that atomic_path writers killed mid-write left under ``root`` (recursively;
    only those of outputs named ``stem`` if given, only those of the output paths ``outputs`` if given: a
    process sharing the folder with others cleans its own share). Call it only when no writer of them runs."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.rglob(f".{stem}{TEMP_MARK}*") if p.is_file()]
    if outputs is not None:  # '.<stem>.partial-<random><suffix>' next to <stem><suffix>
        resolve = functools.lru_cache(maxsize=None)(lambda folder: folder.resolve())  # few folders, many outputs
        wanted = {(resolve(Path(o).parent), Path(o).stem) for o in outputs}
        stale = [p for p in stale if (resolve(p.parent), p.name[1 : p.name.index(TEMP_MARK)]) in wanted]
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


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Write a complete file at ``path`` unless one exists (then False): a hard link of a finished temporary file,
    atomic on local and network filesystems, so of several processes exactly one creates it and none sees it half
    written. On a filesystem without hard links the last writer wins."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}{TEMP_MARK}", suffix=path.suffix or ".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would (mkstemp makes 0600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem
            os.replace(tmp, path)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


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


# ----------------------------------------------------------------------------------------- shares of a job
def key_hash(key: str) -> int:
    """A stable 64-bit hash of an input key (Python's hash() differs between processes)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count``: the inputs whose key hashes to ``index`` modulo ``count``.

    By hash, not by position in the sorted list: a key's share does not depend on which other inputs exist, so
    processes that list the folder at different times (Slurm array tasks start minutes apart, videos keep
    arriving) still split it disjointly and completely. The price is balance: shares differ by about
    sqrt(inputs / count) inputs (3% at 73,000 videos over 64 processes).
    """

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not (isinstance(self.index, int) and isinstance(self.count, int) and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index}/{self.count}: expected I/N with 0 <= I < N")

    @property
    def name(self) -> str:
        """This share's log file stem: every (I, N) its own, so runs with different N never append to one file."""
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def owns(self, key: str) -> bool:
        return self.count == 1 or key_hash(key) % self.count == self.index

    def split(self, inner: "Shard") -> "Shard":
        """Share ``inner`` of this share: e.g. a Slurm array task (outer) that runs 8 launched processes (inner)."""
        return Shard(self.index * inner.count + inner.index, self.count * inner.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"3/8"`` -> Shard(3, 8), or a one-line ValueError."""
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r}: expected I/N, e.g. 3/8 (share 3 of 8, counted from 0)") from None
    return Shard(index, count)


def _env_int(environ, name: str) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def slurm_array_shard(environ=None) -> Shard | None:
    """This Slurm array task's share (``sbatch --array=0-63`` -> 64 shares), or None outside an array."""
    environ = os.environ if environ is None else environ
    task = _env_int(environ, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    low, high = _env_int(environ, "SLURM_ARRAY_TASK_MIN"), _env_int(environ, "SLURM_ARRAY_TASK_MAX")
    step = _env_int(environ, "SLURM_ARRAY_TASK_STEP") or 1
    count = _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
    if low is None or (count is None and high is None):
        raise ValueError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT (or _MAX) are "
                         "not: pass --shard I/N")
    count = count if count is not None else (high - low) // step + 1
    index, rest = divmod(task - low, step)
    if rest or not 0 <= index < count:
        raise ValueError(f"Slurm array task {task} is not one of {count} evenly spaced tasks from {low} (step {step}): "
                         "use --array=A-B[:S] or pass --shard I/N")
    return Shard(index, count)


def launcher_shard(environ=None) -> Shard:
    """This process's global rank over all machines, from accelerate launch / torchrun (RANK, WORLD_SIZE)."""
    environ = os.environ if environ is None else environ
    rank, world = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
    if rank is None or world is None:
        return Shard()
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return Shard(rank, world)


def resolve_shard(explicit: str | Shard | None = None, environ=None) -> Shard:
    """This process's share: ``explicit`` (``--shard I/N``) or else the Slurm array task, then split among the
    processes of a launcher (``accelerate launch`` inside each array task works too). SLURM_PROCID is ignored on
    purpose: a batch script of ``--ntasks=8`` sees it even where it runs the tool once, not through srun."""
    outer = explicit if isinstance(explicit, Shard) else parse_shard(explicit) if explicit else None
    outer = outer or slurm_array_shard(environ) or Shard()
    return outer.split(launcher_shard(environ))


# ------------------------------------------------------------------------------- manifests of a job folder
def manifest_files(out_dir: str | os.PathLike, log: str = "manifest") -> list[Path]:
    """The files of one log of a job folder: ``<log>.jsonl`` first, then ``<log>.d/*.jsonl`` in name order."""
    out_dir = Path(out_dir)
    single = [out_dir / f"{log}.jsonl"] if (out_dir / f"{log}.jsonl").is_file() else []
    return single + (sorted((out_dir / f"{log}.d").glob("*.jsonl")) if (out_dir / f"{log}.d").is_dir() else [])


def read_manifest(out_dir: str | os.PathLike, log: str = "manifest") -> list[dict]:
    """Every process's records of a job folder, one per key (the first in :func:`manifest_files` order wins, so the
    merged ``manifest.jsonl`` shadows the shards it was made from)."""
    records: dict[str, dict] = {}
    for path in manifest_files(out_dir, log):
        for r in JsonlLog(path).read():
            records.setdefault(r.get("key"), r)
    records.pop(None, None)
    return list(records.values())


def job_logs(out_dir: str | os.PathLike, shard: Shard = Shard()) -> tuple[JsonlLog, JsonlLog]:
    """(manifest, failures) this process appends to: the plain files alone, its own shard files otherwise."""
    out_dir = Path(out_dir)
    if shard.count == 1:
        return JsonlLog(out_dir / "manifest.jsonl"), JsonlLog(out_dir / "failures.jsonl")
    return (JsonlLog(out_dir / "manifest.d" / f"{shard.name}.jsonl"),
            JsonlLog(out_dir / "failures.d" / f"{shard.name}.jsonl"))


def merge_job_logs(out_dir: str | os.PathLike) -> dict:
    """Write the single ``manifest.jsonl`` (every finished key once, sorted by key) and ``failures.jsonl`` (every
    still-failing key once) that downstream tools read. Idempotent; the shard files stay (readers let the merged
    file shadow them), so a merge while processes still run loses nothing: merge again when they end."""
    out_dir = Path(out_dir)
    if not manifest_files(out_dir) and not manifest_files(out_dir, "failures"):
        raise FileNotFoundError(f"{out_dir}: no manifest.jsonl or manifest.d/ (not a job output folder)")
    done = sorted(read_manifest(out_dir), key=lambda r: r["key"])
    finished = {r["key"] for r in done}
    failed = sorted((r for r in read_manifest(out_dir, "failures") if r["key"] not in finished), key=lambda r: r["key"])
    manifest, failures = job_logs(out_dir)
    manifest.rewrite(done)
    if failed or failures.path.exists():
        failures.rewrite(failed)
    return {"done": len(done), "failed": len(failed),
            "shards": len(manifest_files(out_dir)) - manifest.path.is_file()}


class Prefetcher:
    """``load(item)`` for the next few inputs in background threads while the caller works on the current one
    (decoding overlapped with a model or a detector): call it in ``items`` order.

    ``run_jobs`` calls its work in ``items`` order, minus finished inputs; ``skip`` (the finished keys) is only a
    hint to avoid loading those: a wrong guess costs time, never correctness.
    """

    def __init__(self, items: Sequence, load: Callable, key: Callable, skip: set[str], depth: int):
        self.load, self.key, self.depth = load, key, depth
        self.order = [it for it in items if key(it) not in skip]
        self.position = {key(it): i for i, it in enumerate(self.order)}
        self.pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="prefetch") if depth > 0 else None
        self.futures: dict[str, Any] = {}

    def __call__(self, item):
        k = self.key(item)
        i = self.position.get(k)
        if self.pool is None or i is None:
            return self.load(item)
        for nxt in self.order[i : i + 1 + self.depth]:
            nk = self.key(nxt)
            if nk not in self.futures:
                self.futures[nk] = self.pool.submit(self.load, nxt)
        return self.futures.pop(k).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.futures.clear()


def background_iter(iterable: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``iterable`` in a background thread, at most ``depth`` items ahead of the consumer: decoding the
    next frames while the caller runs a detector on these. Its exception is raised in the consumer; a consumer that
    stops early stops the thread at its next item."""
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop, end = threading.Event(), object()

    def offer(entry) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not offer((True, item)):
                    return
            offer((True, end))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            offer((False, exc))

    thread = threading.Thread(target=produce, name="background_iter", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()


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
    shard: Shard = Shard(),
    output_of: Callable[[str], os.PathLike] | None = None,
) -> JobSummary:
    """Run ``work(item) -> record`` over ``items``, resumably, writing manifest/failures into ``out_dir``.

    ``work`` must be a picklable top-level callable (a function or functools.partial) when ``workers > 0``;
    it writes its outputs itself (atomically) and returns a JSON-able record. ``workers=0`` runs in-process, where
    ``work`` may also return a ``concurrent.futures.Future`` of the record (a pipelined stage still running: the
    record is appended when it completes). ``limit`` caps how many *new* inputs are attempted. Earlier failures
    are skipped unless ``retry_failed``. ``shard``: this process's share of ``items`` (see the module docstring);
    ``output_of(key)``: the output path of a key, so that a process sharing the folder with others removes only the
    stale temporary files of its own share (without it, a sharded process removes none).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    keyed = _keyed(items, key)  # every process checks every key: the same error on every rank
    mine = [(k, item) for k, item in keyed.values() if shard.owns(k)]
    clean = _cleaner(out_dir, shard, [k for k, _ in mine], output_of)
    clean()  # a killed earlier run's half-written outputs
    manifest, failures = job_logs(out_dir, shard)
    summary, todo = _todo(mine, out_dir, retry_failed)
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

    bar = tqdm(total=len(todo), desc=desc + (f" [shard {shard}]" if shard.count > 1 else ""), disable=not progress,
               unit="item")
    if workers <= 0:
        _run_inline(todo, work, record, bar)
    else:
        _run_pool(todo, work, workers, record, bar, clean)
    bar.close()

    # Keep this process's failure log to one line per input that is still failing (a retried success drops out).
    finished = {r["key"] for r in read_manifest(out_dir)}
    latest = {r["key"]: r for r in failures.read() if "key" in r and r["key"] not in finished}
    if latest or failures.path.exists():
        failures.rewrite(latest.values())
    return summary


def _todo(mine: list[tuple[str, Any]], out_dir: Path, retry_failed: bool) -> tuple[JobSummary, list[tuple[str, Any]]]:
    """This share's summary so far and its unfinished (key, item) pairs: finished means finished by any earlier
    process, with any number of processes (the merged manifest)."""
    finished = {r["key"] for r in read_manifest(out_dir)}
    known_failed = set() if retry_failed else {r["key"] for r in read_manifest(out_dir, "failures")}
    summary, todo = JobSummary(total=len(mine)), []
    for k, item in mine:
        if k in finished or k in known_failed:
            summary.skipped += k in finished
            summary.failed += k in known_failed and k not in finished
        else:
            todo.append((k, item))
    return summary, todo


def _keyed(items: Sequence[Any], key: Callable[[Any], str]) -> dict[str, tuple[str, Any]]:
    keyed: dict[str, tuple[str, Any]] = {}
    for item in items:
        k = key(item)
        if k in keyed:
            raise ValueError(f"two inputs share the key {k!r}: {keyed[k][1]!r} and {item!r}; keys (file stems) must be unique")
        keyed[k] = (k, item)
    return keyed


def _cleaner(out_dir: Path, shard: Shard, keys: list[str], output_of) -> Callable[[], Any]:
    """What removes stale temporary files: all under ``out_dir`` for a lone process, else only its share's."""
    if shard.count == 1:
        return functools.partial(remove_stale_temp_files, out_dir)
    if output_of is None:
        return lambda: []
    return functools.partial(remove_stale_temp_files, out_dir, outputs=[output_of(k) for k in keys])


def _run_inline(todo, work, record, bar) -> None:
    """In this process; a Future result is recorded when it completes (in submission order)."""
    pending: collections.deque = collections.deque()

    def settle(block: bool) -> None:
        while pending and (block or pending[0][2].done()):
            k, item, future = pending.popleft()
            try:
                record(k, item, True, future.result())
            except Exception as exc:  # noqa: BLE001 - the pipelined stage's failure, recorded like any other
                record(k, item, False, one_line(exc))
            bar.update()

    for k, item in todo:
        ok, result = _call(work, item)
        if ok and isinstance(result, Future):
            pending.append((k, item, result))
        else:
            record(k, item, ok, result)
            bar.update()
        settle(block=False)
    settle(block=True)


def _run_pool(todo, work, workers, record, bar, clean: Callable[[], Any]) -> None:
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
        clean()
        for k, item in in_flight.values():
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as alone:
                try:
                    record(k, item, *alone.submit(_call, work, item).result())
                except BrokenProcessPool:
                    record(k, item, False, "worker process crashed while processing this input")
            bar.update()
