"""Video I/O: reading with decord (the one place that touches it) and writing with PyAV.

Every failure becomes a :class:`VideoError` whose message is one line naming the file and what went wrong,
so batch tools can put it straight into a failure report.
"""
from __future__ import annotations

import fractions
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from expmae.files import atomic_path

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp", ".ts")
DEFAULT_FPS = 25.0  # used when a container reports no usable frame rate


class VideoError(RuntimeError):
    """A video that cannot be opened or decoded; the message is a single line naming the file."""


def _decord():
    import decord  # deferred: console start-up: decord, +12 ms on expmae-crop --help

    if not getattr(_decord, "quiet", False):
        decord.logging.set_level(decord.logging.QUIET)  # ffmpeg's per-packet warnings would flood worker logs
        _decord.quiet = True
    return decord


def _reason(exc: BaseException) -> str:
    """First line of a decord/ffmpeg error without its '[12:00:00] /src/file.cc:123: ' prefix."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text).strip()


def list_videos(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Video files under ``root`` (by extension, case-insensitive), sorted for a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder of videos")
    files = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith("."))


def open_video(path: str | os.PathLike, num_threads: int = 1, width: int = -1, height: int = -1):
    """A decord ``VideoReader`` with at least one frame; ``width``/``height`` > 0 make decord resize on decode.

    ``num_threads=1`` because parallelism comes from worker processes; 0 lets ffmpeg pick.
    """
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if not path.is_file():
        raise VideoError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise VideoError(f"{path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    decord = _decord()
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=num_threads)
    except Exception as exc:  # decord raises DECORDError / RuntimeError with multi-line C++ traces
        reason = _reason(exc)
        if "video stream" in reason.lower():
            raise VideoError(f"{path}: no video stream (audio-only or not a video container)") from None
        raise VideoError(f"{path}: cannot open as a video ({reason})") from None
    if len(reader) == 0:
        raise VideoError(f"{path}: video stream has no frames")
    return reader


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def video_info(reader) -> VideoInfo:
    """Frame count, frame rate (``DEFAULT_FPS`` when the container has none) and frame size of an open reader."""
    fps = float(reader.get_avg_fps())
    if not math.isfinite(fps) or fps <= 0:
        fps = DEFAULT_FPS
    height, width = reader[0].shape[:2]
    reader.seek(0)
    return VideoInfo(len(reader), fps, int(height), int(width))


def read_frames(reader, indices: Sequence[int], path: str | os.PathLike = "video") -> np.ndarray:
    """Frames at ``indices`` as uint8 (N, H, W, 3); any order and repeats allowed (each frame decoded once)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(reader)
    if idx.size == 0:
        raise VideoError(f"{path}: no frame indices requested")
    if idx.min() < 0 or idx.max() >= n:
        raise VideoError(f"{path}: frame index {int(idx.min() if idx.min() < 0 else idx.max())} outside 0..{n - 1}")
    unique, inverse = np.unique(idx, return_inverse=True)  # sorted: decord decodes forward without re-seeking
    try:
        frames = reader.get_batch(unique.tolist()).asnumpy()
    except Exception as exc:
        reason = _reason(exc)
        if "from_size == to_size" in reason:
            raise VideoError(f"{path}: decord 0.6.0 cannot unpack frames of this width ({reason}); re-encode the video at another width") from None
        raise VideoError(f"{path}: cannot decode frames {int(unique[0])}..{int(unique[-1])} ({reason})") from None
    # decord 0.6.0 mis-strides some frame widths (16, 48, 72 seen) into 4- or 6-"channel" buffers: refuse them.
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != len(unique):
        raise VideoError(
            f"{path}: decord returned frames shaped {tuple(frames.shape)}, expected ({len(unique)}, H, W, 3) "
            "(decord 0.6.0 mis-reads some frame widths); re-encode the video at another width"
        )
    if frames.dtype != np.uint8:
        raise VideoError(f"{path}: decord returned {frames.dtype} frames, expected uint8")
    return frames if len(unique) == len(idx) and (unique == idx).all() else frames[inverse]


def iter_frames(reader, indices: Sequence[int], chunk: int = 32, path: str | os.PathLike = "video") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices_chunk, frames_chunk)`` over sorted ``indices``, bounding memory for long/large videos."""
    idx = np.asarray(indices, dtype=np.int64)
    for start in range(0, len(idx), chunk):
        part = idx[start : start + chunk]
        yield part, read_frames(reader, part, path)


def has_encoder(codec: str) -> bool:
    import av  # deferred: console start-up: PyAV, +40 ms on expmae-crop --help

    try:
        av.codec.Codec(codec, "w")
        return True
    except Exception:  # noqa: BLE001 - PyAV raises different types across versions
        return False


DEFAULT_KEYINT = 64


def stored_encoding(keyint: int = DEFAULT_KEYINT) -> str:
    """The name of the stored form VideoWriter writes: expmae-crop records it per clip, and
    ``expmae-crop --reencode`` rewrites clips whose record names another (or none: crops of older versions)."""
    return f"h264 fastdecode keyint {keyint}" if has_encoder("libx264") else f"mpeg4 keyint {keyint}"


class VideoWriter:
    """Streams uint8 RGB frames (H, W, 3) into an H.264 mp4 (mpeg4 if this PyAV has no libx264).

    ``crf`` sets quality (18: visually lossless for face crops); ``keyint`` bounds how far decord must decode
    from the previous keyframe when a loader seeks into the clip; 'fastdecode' turns off CABAC and the deblocking
    filter, which makes decoding cheaper for a slightly larger file. Measured on real face clips (README,
    "Throughput"): fastdecode decodes ~1.5x faster than x264's default tuning and all-intra is slower than either
    (more bits per frame); keyint 64 decodes a pretraining sample as fast as one keyframe per clip (a face clip of
    a few seconds is one or two GOPs) and ~15% faster than keyint 32, for 6% fewer bytes. x264's macroblock-tree rate control is off:
    with it on, the same frames encoded twice in one process gave different bytes (seen with PyAV 18's
    libx264), and reruns of a crop job must reproduce their outputs exactly.
    """

    def __init__(self, path: str | os.PathLike, fps: float, width: int, height: int, crf: int = 18,
                 keyint: int = DEFAULT_KEYINT):
        import av  # deferred: console start-up: PyAV, +40 ms on expmae-crop --help

        if width % 2 or height % 2:
            raise ValueError(f"{path}: frame size {width}x{height} must be even for yuv420p video")
        self.path = Path(path)
        self.container = av.open(str(self.path), mode="w", format="mp4")
        rate = fractions.Fraction(fps).limit_denominator(1001)
        if has_encoder("libx264"):
            self.stream = self.container.add_stream("libx264", rate=rate)
            self.stream.options = {"crf": str(crf), "g": str(keyint), "preset": "medium", "tune": "fastdecode",
                                   "x264-params": "threads=1:mbtree=0"}
        else:
            self.stream = self.container.add_stream("mpeg4", rate=rate)
            self.stream.options = {"qscale": "2", "g": str(keyint)}
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.codec_context.thread_count = 1  # one thread per clip: parallelism comes from worker processes
        self.size = (height, width)
        self.frames = 0

    def write(self, frames: np.ndarray | Iterable[np.ndarray]) -> None:
        import av  # deferred: console start-up: PyAV, +40 ms on expmae-crop --help

        for frame in frames:
            if frame.shape != (*self.size, 3) or frame.dtype != np.uint8:
                raise ValueError(f"{self.path}: frame {self.frames} is {frame.dtype}{tuple(frame.shape)}, expected uint8{(*self.size, 3)}")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self.stream.encode(vf):
                self.container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        if self.container is None:
            return
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
        finally:
            self.container.close()
            self.container = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = DEFAULT_FPS, **options) -> Path:
    """Write uint8 frames (T, H, W, 3) to ``path`` atomically (see :class:`VideoWriter` for ``options``)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"{path}: expected frames shaped (T, H, W, 3) with T > 0, got {frames.shape}")
    with atomic_path(path) as tmp:
        with VideoWriter(tmp, fps, frames.shape[2], frames.shape[1], **options) as writer:
            writer.write(frames)
    return Path(path)
