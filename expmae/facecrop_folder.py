"""Crop every video of a folder (or a list) into face clips, resumably: the job, its pipelined in-process engine,
and re-encoding a cropped folder. One video: :mod:`expmae.facecrop_video`; the console script:
:mod:`expmae.facecrop`.

Output folder::

    clips/<key>.mp4      one face clip per input (key = path relative to the input folder, without suffix)
    manifest.jsonl       one record per finished video (path, frames, fps, detection rate, box statistics)
    failures.jsonl       one line per video that failed, with a one-line reason
    manifest.d/, failures.d/   the same, one file per process of a sharded run (merged on read; --merge)
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from expmae.facecrop_video import (CropOptions, CropPlan, DetectionInput, crop_video, detect_video, detection_input,
                                   plan_from_detections, reencode_clip)
from expmae.features.common import resolve_device
from expmae.files import JsonlLog
from expmae.jobs import Prefetcher, one_line, run_jobs
from expmae.shards import Shard, manifest_files, read_manifest
from expmae.video import DEFAULT_KEYINT, list_videos, stored_encoding


def _key(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).with_suffix("").as_posix()
        except ValueError:
            pass
    return path.stem


def output_path(output_dir: str | os.PathLike, key: str, fmt: str = "mp4") -> Path:
    return Path(output_dir) / "clips" / f"{key}.{fmt}"


def crop_job(path: str, output_dir: str, root: str | None, options: CropOptions, plan: CropPlan | None = None) -> dict:
    """One video of a folder job: its clip under ``output_dir/clips`` and its manifest record (a top-level,
    picklable function for run_jobs' process pool)."""
    key = _key(Path(path), Path(root) if root else None)
    out = output_path(output_dir, key, options.format)
    record = crop_video(path, out, options, plan=plan)
    return {"path": out.relative_to(output_dir).as_posix(), **record}


class CropPipeline:
    """The crop job inside one process, with one detector (one per GPU under a launcher): the next videos' sampled
    frames are decoded in background threads while MTCNN runs here on this video's batches, and each finished plan
    is cut and encoded by ``write_threads`` writer threads while MTCNN goes on. ``run_jobs`` records a video when
    its clip is written (a process that dies loses the videos in flight: at most ``write_threads + 2``)."""

    def __init__(self, paths: Sequence[str], output_dir: str, root: str | None, options: CropOptions, *,
                 skip: set[str], prefetch: int = 1, write_threads: int = 1):
        self.output_dir, self.root, self.options = output_dir, root, options
        key = functools.partial(_path_key, root=root)
        self.prefetcher = Prefetcher(paths, self._open, key, skip, prefetch)
        self.writers = ThreadPoolExecutor(write_threads, thread_name_prefix="crop-write") if write_threads > 0 else None
        self.slots = threading.BoundedSemaphore(write_threads + 1)  # plans waiting to be written: bounded (memory)

    def _open(self, path: str) -> DetectionInput:
        return detection_input(path, self.options, prefetch=2)

    def __call__(self, path: str):
        video = self.prefetcher(path)
        plan = plan_from_detections(video, detect_video(video, self.options), self.options)
        if self.writers is None:  # write_threads=0: cut and encode here, between detections
            return crop_job(path, self.output_dir, self.root, self.options, plan)
        self.slots.acquire()
        future = self.writers.submit(crop_job, path, self.output_dir, self.root, self.options, plan)
        future.add_done_callback(lambda _: self.slots.release())
        return future

    def close(self) -> None:
        self.prefetcher.close()
        if self.writers is not None:
            self.writers.shutdown(wait=True)


def _path_key(path: str, root: str | None) -> str:
    return _key(Path(path), Path(root) if root else None)


def crop_folder(input_dir: str | os.PathLike | Sequence[str | os.PathLike], output_dir: str | os.PathLike, *,
                workers: int = 0, limit: int | None = None, retry_failed: bool = False, progress: bool = True,
                shard: Shard = Shard(), write_threads: int | None = None, **options) -> dict:
    """Crop every video under ``input_dir`` (or in a list of paths) into ``output_dir``; resumable.

    ``options`` are :class:`CropOptions` fields. ``workers`` > 0: a pool of processes, each cropping whole videos;
    0: this process alone, pipelined (:class:`CropPipeline`; ``write_threads``: :func:`default_write_threads` if
    None). ``shard``: this process's share of the videos (``expmae.shards``). Returns the summary: total (of the
    share), done, skipped, failed, failures.
    """
    output_dir = Path(output_dir)
    unknown = set(options) - {f.name for f in fields(CropOptions)}
    if unknown:
        raise TypeError(f"unknown crop option(s) {sorted(unknown)}; expected fields of CropOptions")
    opt = CropOptions(**options)
    if isinstance(input_dir, (str, os.PathLike)):
        root = Path(input_dir)
        out_abs = output_dir.resolve()
        # The output folder may sit inside the input folder: never take our own crops as inputs.
        paths = [p for p in list_videos(root) if out_abs not in p.resolve().parents]
    else:
        root, paths = None, [Path(p) for p in input_dir]
    root_s = str(root) if root else None
    items, key = [str(p) for p in paths], functools.partial(_path_key, root=root_s)
    job = dict(key=key, limit=limit, retry_failed=retry_failed, desc="crop faces", progress=progress, shard=shard,
               output_of=lambda k: output_path(output_dir, k, opt.format))
    if workers > 0:
        work = functools.partial(crop_job, output_dir=str(output_dir), root=root_s, options=opt)
        summary = run_jobs(items, work, output_dir, workers=workers, **job)
    else:
        skip = {r["key"] for r in read_manifest(output_dir)}  # a hint for the prefetcher only
        if write_threads is None:
            write_threads = default_write_threads(resolve_device(opt.device))
        pipeline = CropPipeline([p for p in items if shard.owns(key(p))], str(output_dir), root_s, opt, skip=skip,
                                write_threads=write_threads)
        try:
            summary = run_jobs(items, pipeline, output_dir, workers=0, **job)
        finally:
            pipeline.close()
    return {**summary.as_dict(), "ok": summary.ok, "output_dir": str(output_dir), "failures": summary.failures}


def reencode_folder(output_dir: str | os.PathLike, crf: int = 18, keyint: int = DEFAULT_KEYINT,
                    progress: bool = True) -> dict:
    """Re-encode the mp4 clips of an expmae-crop folder whose manifest record names another stored form than
    today's (crops of older versions have none); resumable: the manifest is updated as clips are done.
    Returns {total, reencoded, already, failed, failures}."""
    from tqdm.auto import tqdm  # deferred: console start-up: tqdm, +23 ms on expmae-crop --help

    output_dir = Path(output_dir)
    manifest = JsonlLog(output_dir / "manifest.jsonl")
    if not manifest_files(output_dir):
        raise FileNotFoundError(f"{manifest.path}: no manifest (not an expmae-crop output folder)")
    # every process's records, rewritten into manifest.jsonl, which shadows the shard files it came from
    records, target = read_manifest(output_dir), stored_encoding(keyint)
    todo = [r for r in records if r.get("format", "mp4") == "mp4" and r.get("encoding") != target]
    failures = []
    for n, record in enumerate(tqdm(todo, desc="re-encode", disable=not progress or None), 1):
        try:
            reencode_clip(output_dir / record["path"], record.get("fps", 0), crf=crf, keyint=keyint)
            record["encoding"] = target
        except Exception as exc:  # noqa: BLE001 - one bad clip is reported, the others go on
            failures.append({"input": record["path"], "reason": one_line(exc)})
        if n % 100 == 0 or n == len(todo):
            manifest.rewrite(records)  # the records are the list's own dicts: done clips say so
    return {"total": len(records), "reencoded": len(todo) - len(failures), "already": len(records) - len(todo),
            "failed": len(failures), "failures": failures}


def default_workers(device) -> int:
    """Worker processes when --workers is not given: none on a GPU (one detector per GPU, decoding and writing in
    threads), else up to 8 per process, sharing the machine's cores with the other launched processes."""
    if str(device).startswith("cuda"):
        return 0
    per_process = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    n = min(8, per_process)
    return n if n > 1 else 0


def default_write_threads(device) -> int:
    """Writer threads of the in-process crop: 1 beside a GPU detector (cutting and encoding overlap detection);
    0 on the CPU, where the detector and the writer would share the process's cores (measured: 1-2% fewer frames
    per core-second with a writer thread on real videos, none lost without)."""
    return 1 if str(device).startswith("cuda") else 0
