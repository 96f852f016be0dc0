"""Resumable batch jobs over many inputs (face cropping, feature extraction): :func:`run_jobs`, and prefetching.

A job over tens of thousands of videos must never die on one bad sample and never lose finished work:

- each input has a key (usually the video's stem); a worker turns one input into outputs + a record;
- outputs are written atomically (:mod:`expmae.files`), so a killed job leaves no truncated file;
- the record is appended to ``manifest.jsonl`` *after* its outputs exist; an input is finished iff
  its key is in the manifest, so a rerun skips exactly the finished work and never duplicates it;
- an exception becomes a one-line reason in ``failures.jsonl``; the job goes on.

Across processes and machines each process runs its share of the inputs (:mod:`expmae.shards`).
"""
from __future__ import annotations

import collections
import functools
import os
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from expmae.files import remove_stale_temp_files
from expmae.shards import Shard, job_logs, read_manifest


def one_line(exc: BaseException) -> str:
    """A single-line reason for a failure report: exception type and the first line of its message."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


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
    from tqdm.auto import tqdm  # deferred: console start-up: tqdm, +23 ms on expmae-crop and expmae-features --help

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
