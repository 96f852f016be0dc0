"""Face detection and tracking: MTCNN (facenet-pytorch) boxes per frame, linked into tracks, and the main track's
box interpolated and smoothed over time (what :mod:`expmae.facecrop_video` crops along)."""
from __future__ import annotations

import contextlib
import math
import multiprocessing
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------- detection

_DETECTORS: dict = {}


def get_detector(device: str = "cpu", min_face_size: int = 20):
    """One MTCNN per process and setting (weights ship with facenet-pytorch: no download)."""
    key = (str(device), int(min_face_size))
    if key not in _DETECTORS:
        # deferred: console start-up: torch and facenet-pytorch, +2.9 s on expmae-crop --help
        import torch
        from facenet_pytorch import MTCNN

        if multiprocessing.parent_process() is not None:
            torch.set_num_threads(1)  # a pool worker: parallelism comes from the pool, not from intra-op threads
        _DETECTORS[key] = MTCNN(keep_all=True, min_face_size=min_face_size, device=torch.device(device)).eval()
    return _DETECTORS[key]


@contextlib.contextmanager
def torch_threads(n: int):
    """Temporarily use ``n`` intra-op threads. MTCNN's many tiny convolutions gain little from threads, and on a
    busy machine OpenMP's spinning threads make it several times slower (measured: 45 ms vs 800 ms per frame)."""
    import torch  # deferred: console start-up: torch, +1.5 s on expmae-crop --help

    before = torch.get_num_threads()
    if n > 0 and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def detect_faces(frames: np.ndarray, detector) -> list[np.ndarray]:
    """MTCNN on uint8 frames (N, H, W, 3): per frame an array (k, 5) of x0, y0, x1, y1, prob in frame pixels."""
    if min(frames.shape[1:3]) < 12:  # below MTCNN's 12-pixel input: nothing to find
        return [np.zeros((0, 5), np.float32) for _ in frames]
    boxes, probs = detector.detect(frames)
    out = []
    for b, p in zip(boxes, probs):
        if b is None:
            out.append(np.zeros((0, 5), np.float32))
        else:
            box, prob = np.asarray(b, np.float64).reshape(-1, 4), np.asarray(p, np.float64).reshape(-1, 1)
            out.append(np.concatenate([box, prob], 1).astype(np.float32))
    return out


# ------------------------------------------------------------------------------------------------ tracking


@dataclass
class Track:
    frames: list[int] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)  # (4,) x0, y0, x1, y1
    probs: list[float] = field(default_factory=list)

    def add(self, frame: int, detection: np.ndarray) -> None:
        self.frames.append(frame)
        self.boxes.append(detection[:4].astype(np.float64))
        self.probs.append(float(detection[4]))

    @property
    def score(self) -> float:
        """Persistence x size x confidence: the main face is on screen longest and largest."""
        return float(sum(p * box_side(b) for b, p in zip(self.boxes, self.probs)))


def box_side(box: np.ndarray) -> float:
    """Geometric mean of the width and height of a box x0, y0, x1, y1."""
    return float(math.sqrt(max(box[2] - box[0], 1e-6) * max(box[3] - box[1], 1e-6)))


def box_center(box: np.ndarray) -> np.ndarray:
    """(2,) centre x, y of a box x0, y0, x1, y1."""
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def track_faces(frame_indices: Sequence[int], detections: Sequence[np.ndarray], max_gap: int,
                min_prob: float = 0.9) -> list[Track]:
    """Link per-frame boxes into tracks: greedy matching by centre distance (relative to face size).

    A box joins a track whose last box is at most ``max_gap`` frames earlier, lies within half a face size
    and has a similar size (ratio 0.6-1.67); otherwise it starts a new track.
    """
    tracks: list[Track] = []
    for t, det in zip(frame_indices, detections):
        det = det[det[:, 4] >= min_prob] if len(det) else det
        live = [tr for tr in tracks if t - tr.frames[-1] <= max_gap]
        pairs = []
        for di, d in enumerate(det):
            for ti, tr in enumerate(live):
                last = tr.boxes[-1]
                dist = np.linalg.norm(box_center(d) - box_center(last)) / box_side(last)
                ratio = box_side(d) / box_side(last)
                if dist < 0.5 and 0.6 < ratio < 1.67:
                    pairs.append((dist, di, ti))
        used_d, used_t = set(), set()
        for _, di, ti in sorted(pairs):
            if di in used_d or ti in used_t:
                continue
            used_d.add(di)
            used_t.add(ti)
            live[ti].add(int(t), det[di])
        for di, d in enumerate(det):
            if di not in used_d:
                tracks.append(Track())
                tracks[-1].add(int(t), d)
    return tracks


def _gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0 or len(x) < 2:
        return x.copy()
    radius = int(3 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(x, radius, mode="edge")  # hold the ends: no pull towards zero at the clip borders
    return np.convolve(padded, k, mode="valid")


def smooth_track(track: Track, frame_range: tuple[int, int], sigma: float, margin: float) -> np.ndarray:
    """Per-frame square crop boxes (N, 3) = centre x, centre y, side for frames in ``[start, end)``.

    Centre and face size are linearly interpolated between detections (held before the first and after the
    last), then Gaussian-smoothed: centre with ``sigma`` frames, size with 2x that (zoom jitter shows most).
    """
    frames = np.asarray(track.frames, np.float64)
    boxes = np.stack(track.boxes)
    t = np.arange(*frame_range, dtype=np.float64)
    cx = np.interp(t, frames, (boxes[:, 0] + boxes[:, 2]) / 2)
    cy = np.interp(t, frames, (boxes[:, 1] + boxes[:, 3]) / 2)
    # max(w, h): MTCNN boxes are a little taller than wide; the square must hold the whole face
    side = np.interp(t, frames, np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))
    side = _gaussian_smooth(side, 2 * sigma) * (1 + 2 * margin)
    out = np.stack([_gaussian_smooth(cx, sigma), _gaussian_smooth(cy, sigma), side], 1)
    # Rounding to 1/64 px makes reruns byte-identical even if MTCNN's floats differ in the last bits.
    return np.round(out * 64) / 64


def jitter(centers: np.ndarray, side: float) -> float:
    """Mean |second difference| of a per-frame centre trajectory (N, 2), as a fraction of ``side``: the part
    of the frame-to-frame motion that is not smooth (a steady drift scores 0, a shaky box scores high)."""
    if len(centers) < 3:
        return 0.0
    d2 = centers[2:] - 2 * centers[1:-1] + centers[:-2]
    return float(np.linalg.norm(d2, axis=1).mean() / side)
