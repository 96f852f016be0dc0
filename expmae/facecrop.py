"""Face cropping: raw videos -> one stable, square face clip per video (console script ``expmae-crop``).

Per video (detection and tracking: :mod:`expmae.facetrack`): MTCNN (facenet-pytorch) on every k-th frame at
reduced resolution, in batches -> boxes linked into tracks -> the main face = the track with the most
(probability x size) over time -> its box centre and size interpolated over missed frames and Gaussian-smoothed
over time -> a square crop with a margin, resampled with sub-pixel accuracy to ``size`` x ``size`` -> an H.264 mp4 (or a uint8 .npy) written atomically.
Over a folder: :func:`expmae.jobs.run_jobs` gives the process pool, progress bar, resume and failure report; in
one process (:class:`CropPipeline`) decoding and writing run in threads around one detector. Across processes and
machines (``accelerate launch -m expmae.facecrop``, Slurm arrays, ``--shard I/N``): docs/cluster.md.

Output folder::

    clips/<key>.mp4      one face clip per input (key = path relative to the input folder, without suffix)
    manifest.jsonl       one record per finished video (path, frames, fps, detection rate, box statistics)
    failures.jsonl       one line per video that failed, with a one-line reason
    manifest.d/, failures.d/   the same, one file per process of a sharded run (merged on read; --merge)
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from expmae import add_version_argument
from expmae.facetrack import (Track, box_center, box_side, detect_faces, get_detector, jitter, smooth_track,
                               torch_threads, track_faces)
from expmae.features.common import resolve_device
from expmae.files import atomic_path
from expmae.jobs import background_iter, run_jobs
from expmae.shards import Shard, read_manifest
from expmae.runlock import FolderInUse, FolderLock
from expmae.settings import ConfigError, add_arguments, check, given, setting
from expmae.video import (DEFAULT_KEYINT, VIDEO_EXTENSIONS, VideoError, VideoInfo, iter_frames, list_videos,
                          open_video, read_frames, stored_encoding, video_info)

FORMATS = ("mp4", "npy")


class NoFaceError(RuntimeError):
    """The video decodes, but no usable face track was found."""


@dataclass
class CropOptions:
    """Every crop setting; expmae-crop's flags and --help are generated from these fields (expmae.settings)."""

    size: int = setting(224, "side of the square output crop, pixels (even, not 48 or 72)", min=32)
    margin: float = setting(0.25, "added on each side of the face box, as a fraction of its size (0.25: the crop is "
                                  "1.5x the face)", min=0)
    detect_every: int = setting(2, "run MTCNN on every k-th frame; boxes in between are interpolated", min=1)
    detect_size: int = setting(360, "longer side of the frames given to MTCNN (0: native resolution, else >= 64)",
                               min=0)
    min_face_size: int = setting(20, "MTCNN's smallest face, pixels at detection resolution", min=1)
    min_prob: float = setting(0.9, "boxes below this MTCNN probability are ignored", min=0, max=1)
    min_detection_rate: float = setting(0.25, "fail a video whose main face is found in fewer of the sampled frames "
                                              "of the kept range", min=0, max=1)
    smooth: float = setting(0.1, "std of the Gaussian smoothing of the box centre over time, seconds (of its size: "
                                 "2x)", min=0)
    trim: bool = setting(True, "trim the face-less frames before the first and after the last detection of the "
                               "main face (--no-trim: keep them)")
    format: str = setting("mp4", "mp4 (H.264, compact) or npy (uint8 (T, S, S, 3), fastest to read, ~30x larger)",
                          choices=FORMATS)
    crf: int = setting(18, "H.264 quality of mp4 output (lower: better, larger)", min=0, max=51)
    keyint: int = setting(DEFAULT_KEYINT, "frames between H.264 keyframes of mp4 output (expmae.video.VideoWriter: "
                                          "the measured best)", min=1)
    batch_size: int = setting(16, "frames per MTCNN call", min=1)
    device: str = setting("auto", "cpu, cuda, cuda:1, or auto: cuda when available; under a launcher auto/cuda is "
                                  "the process's own GPU (LOCAL_RANK)")
    threads: int = setting(1, "torch intra-op threads per process for MTCNN on CPU (0: torch's default; 1 is fastest "
                              "per core: use more --workers)", min=0)

    def __post_init__(self):
        for f in fields(self):
            check(f.name, getattr(self, f.name), dict(f.metadata))
        if self.size % 2 or self.size in (48, 72):
            raise ConfigError(f"size={self.size}: expected an even size other than 48/72 (decord mis-reads those "
                              "widths)")
        if 0 < self.detect_size < 64:
            raise ConfigError(f"detect_size={self.detect_size}: expected 0 (native) or >= 64")


# ----------------------------------------------------------------------------------------------- decoding


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """Even frame size for decoding at ``scale`` (decord resizes while decoding: ~no cost, and no 6 MB/frame copy
    out of decord for 1080p), avoiding the widths decord 0.6.0 mis-reads."""
    if scale >= 1.0:
        return width, height
    w, h = max(32, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))
    return (w + 2 if w in (48, 72) else w), h


# ---------------------------------------------------------------------------------------------- cropping


def crop_square(frame: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """The square of ``side`` pixels centred at (cx, cy), resampled to (size, size, 3) with sub-pixel accuracy;
    parts outside the frame are black (so the face stays centred instead of the crop sliding)."""
    from PIL import Image

    h, w = frame.shape[:2]
    x0, y0 = cx - side / 2, cy - side / 2
    ix0, iy0 = math.floor(x0), math.floor(y0)
    ix1, iy1 = math.ceil(x0 + side), math.ceil(y0 + side)
    region = frame[max(iy0, 0) : max(min(iy1, h), 0), max(ix0, 0) : max(min(ix1, w), 0)]
    if (ix0, iy0, ix1, iy1) != (max(ix0, 0), max(iy0, 0), min(ix1, w), min(iy1, h)) or region.size == 0:
        canvas = np.zeros((iy1 - iy0, ix1 - ix0, 3), np.uint8)
        oy, ox = max(0, -iy0), max(0, -ix0)
        canvas[oy : oy + region.shape[0], ox : ox + region.shape[1]] = region
        region = canvas
    box = (x0 - ix0, y0 - iy0, x0 - ix0 + side, y0 - iy0 + side)
    return np.asarray(Image.fromarray(np.ascontiguousarray(region)).resize((size, size), Image.BILINEAR, box=box))


@dataclass
class CropPlan:
    """Where to crop one video: the main face's per-frame square boxes for frames [start, end)."""

    info: VideoInfo
    sampled: np.ndarray  # frame indices given to MTCNN
    detections: list[np.ndarray]  # per sampled frame: (k, 5) boxes + prob, source pixels
    tracks: list[Track]
    main: Track
    start: int
    end: int
    boxes: np.ndarray  # (end - start, 3): centre x, centre y, side, source pixels
    detection_rate: float  # main face found in this fraction of the sampled frames in [start, end)


@dataclass
class DetectionInput:
    """What the detector sees of one video: its sampled frames, decoded small, in batches."""

    info: VideoInfo
    sampled: np.ndarray  # frame indices given to MTCNN
    to_source: np.ndarray  # (5,) scales boxes from detection to source pixels (x0, y0, x1, y1, prob)
    batches: Iterator[tuple[np.ndarray, np.ndarray]]  # (indices, frames (B, h, w, 3) uint8) at detection size


def detection_input(path: str | os.PathLike, options: CropOptions | None = None, reader=None,
                    prefetch: int = 0) -> DetectionInput:
    """Open one video for detection: every k-th frame (and the last, so the end of the clip is not extrapolated),
    decoded at ``detect_size``. ``prefetch`` > 0: decoded in a background thread, that many batches ahead."""
    opt = options or CropOptions()
    path = Path(path)
    reader = reader if reader is not None else open_video(path)
    info = video_info(reader)
    n, k = info.num_frames, opt.detect_every
    sampled = np.unique(np.r_[np.arange(0, n, k), n - 1])
    scale = min(1.0, opt.detect_size / max(info.width, info.height)) if opt.detect_size else 1.0
    dw, dh = scaled_size(info.width, info.height, scale)
    small = reader if (dw, dh) == (info.width, info.height) else open_video(path, width=dw, height=dh)
    to_source = np.array([info.width / dw, info.height / dh, info.width / dw, info.height / dh, 1.0], np.float32)
    batches = iter_frames(small, sampled, opt.batch_size, path)
    return DetectionInput(info, sampled, to_source, background_iter(batches, prefetch) if prefetch else batches)


def detect_video(video: DetectionInput, options: CropOptions) -> list[np.ndarray]:
    """MTCNN on every batch of sampled frames: per sampled frame an array (k, 5) of boxes + prob, source pixels."""
    detector = get_detector(str(resolve_device(options.device)), options.min_face_size)
    detections: list[np.ndarray] = []
    with torch_threads(options.threads):
        for _, frames in video.batches:
            detections += [d * video.to_source for d in detect_faces(frames, detector)]
    return detections


def plan_crop(path: str | os.PathLike, options: CropOptions | None = None, reader=None) -> CropPlan:
    """Detect (every k-th frame, decoded small), track the main face, smooth its box: no output written."""
    opt = options or CropOptions()
    video = detection_input(path, opt, reader)
    return plan_from_detections(video, detect_video(video, opt), opt)


def plan_from_detections(video: DetectionInput, detections: list[np.ndarray], opt: CropOptions) -> CropPlan:
    """Follow the main face through one video's detections and smooth its box (:func:`plan_crop`'s steps 2-3)."""
    info, sampled = video.info, video.sampled
    # 2. follow the main face
    tracks = track_faces(sampled, detections, max_gap=max(2 * opt.detect_every, round(info.fps)), min_prob=opt.min_prob)
    need = min(3, len(sampled))
    good = [tr for tr in tracks if len(tr.frames) >= need]
    if not good:
        best = max((float(d[:, 4].max()) for d in detections if len(d)), default=0.0)
        raise NoFaceError(f"no face found in {len(sampled)} sampled frames (best MTCNN p={best:.2f}, need p >= {opt.min_prob} on >= {need} frames)")
    main = max(good, key=lambda tr: tr.score)
    if opt.trim:
        start, end = main.frames[0], main.frames[-1] + 1  # undetected frames at the ends may well be face-less
    else:
        start, end = 0, info.num_frames
    in_range = sampled[(sampled >= start) & (sampled < end)]
    detection_rate = len(main.frames) / len(in_range)
    if detection_rate < opt.min_detection_rate:
        raise NoFaceError(f"main face found in only {detection_rate:.0%} of sampled frames {start}..{end - 1} (need {opt.min_detection_rate:.0%})")

    # 3. smooth
    boxes = smooth_track(main, (start, end), sigma=opt.smooth * info.fps, margin=opt.margin)
    return CropPlan(info, sampled, detections, tracks, main, int(start), int(end), boxes, detection_rate)


def crop_video(path: str | os.PathLike, out_path: str | os.PathLike, options: CropOptions | None = None,
               plan: CropPlan | None = None) -> dict:
    """Crop the main face of one video into ``out_path`` (atomically); returns its manifest record.

    ``plan``: a :func:`plan_crop` result made with the same options, to write several outputs of one detection.
    Raises :class:`VideoError` (unreadable) or :class:`NoFaceError` (no usable face) with a one-line reason.
    """
    opt = options or CropOptions()
    path, out_path = Path(path), Path(out_path)
    reader = None if plan is not None else open_video(path)  # opening a 1080p video costs ~1% of its crop
    plan = plan or plan_crop(path, opt, reader)
    info, start, end, boxes = plan.info, plan.start, plan.end, plan.boxes
    # Decode only as large as the smallest crop needs (1.5x oversampled, then antialiased down to `size`):
    # a 1080p source with a big face decodes at a fraction of the full-size cost.
    scale = min(1.0, 1.5 * opt.size / float(boxes[:, 2].min()))
    cw, ch = scaled_size(info.width, info.height, scale)
    if (cw, ch) == (info.width, info.height):
        source = reader if reader is not None else open_video(path)
    else:
        source = open_video(path, width=cw, height=ch)
    to_crop = np.array([cw / info.width, ch / info.height, math.sqrt(cw * ch / (info.width * info.height))])
    _write_crops(source, path, boxes * to_crop, start, end, out_path, info.fps, opt)
    return crop_record(plan, path, opt)


def crop_record(plan: CropPlan, path: Path, opt: CropOptions) -> dict:
    """The manifest record: what was written, and statistics to filter or debug crops by."""
    info, main, boxes = plan.info, plan.main, plan.boxes
    raw_side = np.array([box_side(b) for b in main.boxes])
    crop_side = float(boxes[:, 2].mean())
    # What smoothing removed: the same per-frame measure on MTCNN's boxes, only linearly interpolated.
    t = np.arange(plan.start, plan.end)
    raw_centres = np.stack([np.interp(t, main.frames, [box_center(b)[i] for b in main.boxes]) for i in (0, 1)], 1)
    return {
        "frames": plan.end - plan.start,
        "fps": round(info.fps, 4),
        "size": opt.size,
        "format": opt.format,
        **({"encoding": stored_encoding(opt.keyint)} if opt.format == "mp4" else {}),
        "source": str(path),
        "source_frames": info.num_frames,
        "source_size": [info.width, info.height],
        "start": plan.start,
        "detection_rate": round(plan.detection_rate, 4),
        "coverage": round(len(main.frames) / len(plan.sampled), 4),  # of the whole video
        "faces_max": int(max((int((d[:, 4] >= opt.min_prob).sum()) for d in plan.detections), default=0)),
        "tracks": len(plan.tracks),
        "prob_mean": round(float(np.mean(main.probs)), 4),
        "face_side": round(float(raw_side.mean()), 2),  # pixels in the source frame
        "face_side_rel": round(float(raw_side.mean() / min(info.width, info.height)), 4),
        "crop_side": round(crop_side, 2),
        "jitter": round(jitter(boxes[:, :2], crop_side), 5),  # crop centre, per frame, / crop side
        "raw_jitter": round(jitter(raw_centres, crop_side), 5),
        "detect_every": opt.detect_every,
        "detect_size": opt.detect_size,
        "margin": opt.margin,
    }


def _write_crops(reader, path: Path, boxes: np.ndarray, start: int, end: int, out_path: Path, fps: float,
                 opt: CropOptions) -> None:
    with atomic_path(out_path) as tmp:
        if opt.format == "npy":
            crops = np.empty((end - start, opt.size, opt.size, 3), np.uint8)
            for idx, frames in iter_frames(reader, np.arange(start, end), 32, path):
                for i, f in zip(idx, frames):
                    crops[i - start] = crop_square(f, *boxes[i - start], opt.size)
            np.save(tmp, crops)  # tmp already ends in .npy, so np.save keeps the name
            return
        from expmae.video import VideoWriter

        with VideoWriter(tmp, fps, opt.size, opt.size, crf=opt.crf, keyint=opt.keyint) as writer:
            for idx, frames in iter_frames(reader, np.arange(start, end), 32, path):
                writer.write(crop_square(f, *boxes[i - start], opt.size) for i, f in zip(idx, frames))
        _verify_readable(tmp, end - start, opt.size)


def _verify_readable(path: Path, frames: int, size: int) -> None:
    # A clip the loader cannot read must fail here (and be reported), not in the middle of pretraining.
    reader = open_video(path)
    if len(reader) != frames:
        raise VideoError(f"{path}: wrote {frames} frames but decord reads {len(reader)}")
    first = read_frames(reader, [0, frames - 1], path)
    if first.shape[1:] != (size, size, 3):
        raise VideoError(f"{path}: decord reads frames shaped {first.shape[1:]}, expected {(size, size, 3)}")


# ------------------------------------------------------------------------------------------------ folders


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
        from concurrent.futures import ThreadPoolExecutor

        from expmae.jobs import Prefetcher

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
    None). ``shard``: this process's
    share of the videos (``expmae.jobs``). Returns the summary: total (of the share), done, skipped, failed, failures.
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


def reencode_clip(path: Path, fps: float, crf: int = 18, keyint: int = DEFAULT_KEYINT) -> None:
    """Rewrite one mp4 face clip in today's stored form (atomically): the same frames, one more lossy generation
    (at crf 18, a mean error of about 1-2 grey levels)."""
    from expmae.video import VideoWriter

    reader = open_video(path)
    frames = len(reader)
    with atomic_path(path) as tmp:
        info = video_info(reader)
        with VideoWriter(tmp, fps or info.fps, info.width, info.height, crf=crf, keyint=keyint) as writer:
            for _, chunk in iter_frames(reader, np.arange(frames), 32, path):
                writer.write(chunk)
        _verify_readable(tmp, frames, info.height)


def reencode_folder(output_dir: str | os.PathLike, crf: int = 18, keyint: int = DEFAULT_KEYINT,
                    progress: bool = True) -> dict:
    """Re-encode the mp4 clips of an expmae-crop folder whose manifest record names another stored form than
    today's (crops of older versions have none); resumable: the manifest is updated as clips are done.
    Returns {total, reencoded, already, failed, failures}."""
    from tqdm.auto import tqdm

    from expmae.files import JsonlLog
    from expmae.jobs import one_line
    from expmae.shards import manifest_files

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


def build_parser() -> argparse.ArgumentParser:
    """The flags of every CropOptions field (settings.add_arguments) plus those of the job: folders, processes,
    shards, --merge / --reencode."""
    p = argparse.ArgumentParser(prog="expmae-crop", description="Crop the main face of every video in a folder into stable square face clips (resumable).")
    add_version_argument(p)
    p.add_argument("input_dir", nargs="?", help="folder of videos (searched recursively)")
    p.add_argument("output_dir", nargs="?", help="where clips/, manifest.jsonl and failures.jsonl go; rerun to resume")
    p.add_argument("--reencode", metavar="CROP_DIR", help="instead of cropping: rewrite the mp4 clips of an expmae-crop "
                   "folder made by an older version in today's stored form (decodes faster; resumable)")
    p.add_argument("--merge", metavar="CROP_DIR", help="instead of cropping: write the single manifest.jsonl and "
                   "failures.jsonl of a folder cropped by several processes (idempotent)")
    add_arguments(p, CropOptions)
    p.add_argument("--workers", type=int, default=None, help="processes, each with its own detector (0: in this "
                   "process, decoding and writing in threads; default: 0 on a GPU, else min(8, cores per launched process))")
    p.add_argument("--write-threads", type=int, default=None, help="with --workers 0: threads cutting and encoding "
                   "clips while the detector runs (default: 1 on a GPU, 0 on the CPU: in the detector's thread)")
    p.add_argument("--shard", default=None, metavar="I/N", help="crop share I of N of the videos (default: from "
                   "accelerate launch / torchrun or a Slurm array; see docs/cluster.md)")
    p.add_argument("--limit", type=int, default=None, help="attempt at most N not-yet-finished videos")
    p.add_argument("--retry-failed", action="store_true", help="retry videos recorded in failures.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from expmae.shards import merge_job_logs, resolve_shard

    p = build_parser()
    args = p.parse_args(argv)
    try:
        opt = CropOptions(**given(args, CropOptions))  # checked before any folder is touched
    except ConfigError as exc:
        p.error(str(exc))
    if args.reencode:
        try:
            with FolderLock(args.reencode, what="--reencode", create=False):  # one writer per folder
                summary = reencode_folder(args.reencode, crf=opt.crf, keyint=opt.keyint, progress=not args.quiet)
        except (FileNotFoundError, FolderInUse) as exc:
            p.error(str(exc))
        for f in summary.pop("failures"):
            print(f"failed: {f['input']}: {f['reason']}", file=sys.stderr)
        print(json.dumps(summary))
        return 1 if summary["failed"] else 0
    if args.merge:
        try:
            print(json.dumps({"output_dir": args.merge, **merge_job_logs(args.merge)}))
        except FileNotFoundError as exc:
            p.error(str(exc))
        return 0
    if not args.input_dir or not args.output_dir:
        p.error("input_dir and output_dir are required (or --reencode / --merge CROP_DIR)")
    if not Path(args.input_dir).is_dir():
        p.error(f"{args.input_dir}: not a folder")
    try:
        shard = resolve_shard(args.shard)
    except ValueError as exc:
        p.error(str(exc))
    options = {**vars(opt), "device": str(resolve_device(opt.device))}
    workers = default_workers(options["device"]) if args.workers is None else args.workers
    # A lone process owns the folder (expmae.runlock); a sharded run's processes write disjoint shard files.
    lock = FolderLock(args.output_dir, what="output_dir") if shard.count == 1 else contextlib.nullcontext()
    try:  # each process of a launch: its share of the videos, its own manifest and failure shards
        with lock:  # FolderInUse is an OSError: one line below
            summary = crop_folder(args.input_dir, args.output_dir, workers=workers, limit=args.limit,
                                  retry_failed=args.retry_failed, progress=not args.quiet, shard=shard,
                                  write_threads=args.write_threads, **options)
    except (ValueError, TypeError, OSError) as exc:
        p.error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return _report(summary, args, shard)


def _report(summary: dict, args: argparse.Namespace, shard: Shard) -> int:
    if summary["total"] == 0 and shard.count == 1:
        print(f"expmae-crop: no video files ({' '.join(VIDEO_EXTENSIONS)}) under {args.input_dir}", file=sys.stderr)
        return 1
    failures = summary.pop("failures")
    print(json.dumps({**({"shard": str(shard)} if shard.count > 1 else {}), **summary}))
    for f in failures:
        print(f"failed: {f['input']}: {f['reason']}", file=sys.stderr)
    if not summary["ok"]:
        print(f"expmae-crop: nothing succeeded ({summary['failed']} of {summary['total']} failed; see {Path(args.output_dir) / 'failures.jsonl'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
