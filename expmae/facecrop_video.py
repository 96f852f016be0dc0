"""Crop the main face of one video into a stable, square face clip: the crop settings, detection, the plan, the
written clip and its manifest record.

MTCNN (facenet-pytorch) on every k-th frame at reduced resolution, in batches -> boxes linked into tracks
(:mod:`expmae.facetrack`) -> the main face = the track with the most (probability x size) over time -> its box
centre and size interpolated over missed frames and Gaussian-smoothed over time -> a square crop with a margin,
resampled with sub-pixel accuracy to ``size`` x ``size`` -> an H.264 mp4 (or a uint8 .npy) written atomically.
Folders of videos: :mod:`expmae.facecrop_folder`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np

from expmae.facetrack import (Track, box_center, box_side, detect_faces, get_detector, jitter, smooth_track,
                               torch_threads, track_faces)
from expmae.features.common import resolve_device
from expmae.files import atomic_path
from expmae.jobs import background_iter
from expmae.settings import ConfigError, check, setting
from expmae.video import (DEFAULT_KEYINT, VideoError, VideoInfo, VideoWriter, iter_frames, open_video, read_frames,
                          stored_encoding, video_info)

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
    from PIL import Image  # deferred: console start-up: Pillow, +8 ms on expmae-crop --help (184 ms)

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


def reencode_clip(path: Path, fps: float, crf: int = 18, keyint: int = DEFAULT_KEYINT) -> None:
    """Rewrite one mp4 face clip in today's stored form (atomically): the same frames, one more lossy generation
    (at crf 18, a mean error of about 1-2 grey levels)."""
    reader = open_video(path)
    frames = len(reader)
    with atomic_path(path) as tmp:
        info = video_info(reader)
        with VideoWriter(tmp, fps or info.fps, info.width, info.height, crf=crf, keyint=keyint) as writer:
            for _, chunk in iter_frames(reader, np.arange(frames), 32, path):
                writer.write(chunk)
        _verify_readable(tmp, frames, info.height)
