"""Pretraining clips: a map-style dataset over face clips (or raw videos) with VideoMAE-style augmentation.

``VideoClipDataset(source)[i]`` -> uint8 (3, T, H, W): T frames ``sample_stride`` apart, one multi-scale crop
and one flip applied identically to every frame. Normalisation is left to :func:`normalize_clips`, once per
batch on the training device (4x less host->device traffic than float clips, and no per-worker float work).

Augmentation randomness comes only from ``numpy.random.default_rng((seed, epoch, index))``: the same sample
in the same epoch gets the same frames and crop whatever the worker, the call order or a resume. A sample
that fails to load is logged, counted and replaced by a deterministic other one; an epoch never dies on it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from expmae.model import IMAGENET_MEAN, IMAGENET_STD  # one definition: the model un-normalises with them
from expmae.video import VIDEO_EXTENSIONS

VIDEOMAE_SCALES = (1.0, 0.875, 0.75, 0.66)  # GroupMultiScaleCrop scales of VideoMAE pretraining
SHORT_CLIP_MODES = ("pad", "loop")

log = logging.getLogger(__name__)


def normalize_clips(x: torch.Tensor, dtype: torch.dtype = torch.float32, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 clips (B, 3, T, H, W) or (3, T, H, W) -> ``(x / 255 - mean) / std`` in ``dtype`` on x's device."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_clips expects uint8 clips (0..255), got {x.dtype}")
    if x.ndim not in (4, 5) or x.shape[-4] != 3:
        raise ValueError(f"normalize_clips expects (B, 3, T, H, W) or (3, T, H, W), got {tuple(x.shape)}")
    shape = (3, 1, 1, 1)
    # Compute in float32 (bf16 has 8 bits of mantissa: x/255 would already be off by ~0.4%), cast at the end.
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape) * 255
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape) * 255
    return ((x.float() - m) / s).to(dtype)


def sample_frame_indices(num_available: int, num_frames: int, stride: int, rng: np.random.Generator | None = None,
                         short_clip: str = "pad") -> np.ndarray:
    """``num_frames`` indices ``stride`` apart: a random window with ``rng``, else the centre one.

    Clips shorter than the window either hold their last frame (``pad``, what VideoMAE's loader does) or
    wrap around to the start (``loop``).
    """
    if num_available < 1:
        raise ValueError(f"cannot sample from a clip with {num_available} frames")
    offsets = np.arange(num_frames) * stride
    span = offsets[-1] + 1
    if num_available >= span:
        room = num_available - span
        start = int(rng.integers(0, room + 1)) if rng is not None else room // 2
        return start + offsets
    if short_clip == "loop":
        start = int(rng.integers(0, num_available)) if rng is not None else 0
        return (start + offsets) % num_available
    if short_clip == "pad":
        return np.minimum(offsets, num_available - 1)
    raise ValueError(f"short_clip={short_clip!r}: expected one of {SHORT_CLIP_MODES}")


def multi_scale_crop_box(height: int, width: int, input_size: int, rng: np.random.Generator,
                         scales: Sequence[float] = VIDEOMAE_SCALES, max_distort: int = 1,
                         more_fix_crop: bool = True) -> tuple[int, int, int, int]:
    """VideoMAE's GroupMultiScaleCrop: (top, left, crop_h, crop_w).

    Crop sides are ``scales`` x the shorter side (snapped to ``input_size`` when within 3 px), height and width
    scales at most ``max_distort`` steps apart; the offset is one of 5 (13 with ``more_fix_crop``) fixed
    positions: corners, centre, edge midpoints and quarter points.
    """
    base = min(height, width)
    sizes = [int(base * s) for s in scales]
    sizes = [input_size if abs(s - input_size) < 3 else s for s in sizes]
    pairs = [(h, w) for i, h in enumerate(sizes) for j, w in enumerate(sizes) if abs(i - j) <= max_distort]
    crop_h, crop_w = pairs[rng.integers(len(pairs))]
    hs, ws = (height - crop_h) // 4, (width - crop_w) // 4
    offsets = [(0, 0), (0, 4 * ws), (4 * hs, 0), (4 * hs, 4 * ws), (2 * hs, 2 * ws)]
    if more_fix_crop:
        offsets += [(2 * hs, 0), (2 * hs, 4 * ws), (4 * hs, 2 * ws), (0, 2 * ws),
                    (hs, ws), (hs, 3 * ws), (3 * hs, ws), (3 * hs, 3 * ws)]
    top, left = offsets[rng.integers(len(offsets))]
    return int(top), int(left), int(crop_h), int(crop_w)


def center_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize_frames(frames: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool = False) -> torch.Tensor:
    """uint8 frames (T, H, W, 3), crop ``box`` = (top, left, h, w) -> uint8 (3, T, size, size).

    PIL's bilinear resize works on uint8 directly and antialiases when shrinking; per clip it is several
    times cheaper than torch's float interpolate (which also needs float conversion and rounding).
    """
    from PIL import Image

    top, left, h, w = box
    if (top, left, h, w) == (0, 0, size, size) and frames.shape[1:3] == (size, size):
        out = np.asarray(frames)  # the whole frame at the right size: nothing to resample
    else:
        out = np.empty((len(frames), size, size, 3), np.uint8)
        for i, frame in enumerate(frames):
            out[i] = np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))
    if flip:
        out = out[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(out.transpose(3, 0, 1, 2)))


def _resolve_source(source) -> tuple[list[str], list[str]]:
    """(paths, names) from a crop output folder (manifest.jsonl), a manifest file, a folder, or a list."""
    from expmae.jobs import JsonlLog
    from expmae.video import list_videos

    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        manifest = source / "manifest.jsonl" if source.is_dir() else source
        if manifest.suffix == ".jsonl" and manifest.is_file():
            records = JsonlLog(manifest).read()
            if any("path" not in r or "key" not in r for r in records):
                raise ValueError(f"{manifest}: every record needs 'key' and 'path' (an expmae-crop manifest)")
            seen: dict[str, dict] = {r["key"]: r for r in records}  # a repeated key (should not happen): last wins
            return [str(manifest.parent / r["path"]) for r in seen.values()], list(seen)
        if source.is_dir():
            files = list_videos(source) + sorted(p for p in source.rglob("*.npy") if not p.name.startswith("."))
            return [str(p) for p in files], [p.relative_to(source).with_suffix("").as_posix() for p in files]
        raise FileNotFoundError(f"{source}: not a folder of clips or a manifest.jsonl")
    paths = [Path(p) for p in source]
    return [str(p) for p in paths], [p.stem for p in paths]


class VideoClipDataset(torch.utils.data.Dataset):
    """Map-style dataset of T-frame clips for pretraining (works with any sampler, DistributedSampler included).

    ``source``: an ``expmae-crop`` output folder (reads its manifest.jsonl), a folder of videos / .npy clips, a
    manifest path, or a list of paths. ``labels``: optional ``{name: label}`` (or a MER2023 label CSV path);
    then only labelled clips are used and items are ``(clip, label)``. Names are manifest keys / file stems,
    which match MER2023 sample names.
    """

    def __init__(self, source, num_frames: int = 16, sample_stride: int = 4, input_size: int = 224, train: bool = True,
                 seed: int = 0, *, scales: Sequence[float] = VIDEOMAE_SCALES, flip: bool = True,
                 short_clip: str = "pad", normalize: bool = False, labels: Mapping[str, Any] | str | os.PathLike | None = None,
                 max_retries: int = 10, failure_log: str | os.PathLike | None = None):
        if short_clip not in SHORT_CLIP_MODES:
            raise ValueError(f"short_clip={short_clip!r}: expected one of {SHORT_CLIP_MODES}")
        if num_frames < 1 or sample_stride < 1 or input_size < 1:
            raise ValueError(f"num_frames={num_frames}, sample_stride={sample_stride}, input_size={input_size}: all must be >= 1")
        self.paths, self.names = _resolve_source(source)
        self.labels = None
        if labels is not None:
            if isinstance(labels, (str, os.PathLike)):
                from expmae.finetune.datasets import read_label_csv

                labels = read_label_csv(labels, require_valence=False)
            keep = [i for i, n in enumerate(self.names) if n in labels]
            if len(keep) < len(self.names):
                log.warning("%d of %d clips have no label and are left out", len(self.names) - len(keep), len(self.names))
            self.paths, self.names = [self.paths[i] for i in keep], [self.names[i] for i in keep]
            self.labels = [labels[n] for n in self.names]
        if not self.paths:
            raise ValueError(f"{source if isinstance(source, (str, os.PathLike)) else 'source list'}: no clips found "
                             f"(expected a manifest.jsonl, .npy clips or videos {', '.join(VIDEO_EXTENSIONS[:4])}, ...{' with labels' if labels is not None else ''})")
        self.num_frames, self.sample_stride, self.input_size = num_frames, sample_stride, input_size
        self.train, self.seed, self.scales, self.flip = train, seed, tuple(scales), flip
        self.short_clip, self.normalize, self.max_retries = short_clip, normalize, max_retries
        self.failure_log = Path(failure_log) if failure_log else None
        self.epoch = 0
        self.num_failed = 0  # in this process (each DataLoader worker counts its own; failure_log has them all)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """New augmentation for a new epoch (call it like DistributedSampler.set_epoch, before iterating)."""
        self.epoch = int(epoch)

    def _rng(self, index: int, attempt: int = 0) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, index, attempt))

    def load_frames(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
        """The sampled raw frames of clip ``index``: uint8 (T, H, W, 3)."""
        path = self.paths[index]
        if path.endswith(".npy"):
            try:
                clip = np.load(path, mmap_mode="r")  # only the sampled frames are read from disk
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: cannot read as a .npy clip ({exc})") from None
            if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8 or len(clip) == 0:
                raise ValueError(f"{path}: expected a uint8 array (T, H, W, 3) with T > 0, got {clip.dtype}{clip.shape}")
            idx = sample_frame_indices(len(clip), self.num_frames, self.sample_stride, rng, self.short_clip)
            return np.ascontiguousarray(clip[idx])
        from expmae.video import open_video, read_frames

        reader = open_video(path)
        idx = sample_frame_indices(len(reader), self.num_frames, self.sample_stride, rng, self.short_clip)
        return read_frames(reader, idx, path)

    def transform(self, frames: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        """Raw frames (T, H, W, 3) -> uint8 (3, T, S, S): one crop (+ flip) for all frames."""
        h, w = frames.shape[1:3]
        if rng is not None:
            top, left, ch, cw = multi_scale_crop_box(h, w, self.input_size, rng, self.scales)
            flip = self.flip and rng.random() < 0.5
        else:
            (top, left, ch, cw), flip = center_crop_box(h, w), False
        return crop_resize_frames(frames, (top, left, ch, cw), self.input_size, flip)

    def _get(self, index: int, attempt: int):
        rng = self._rng(index, attempt) if self.train else None
        clip = self.transform(self.load_frames(index, rng), rng)
        return normalize_clips(clip) if self.normalize else clip

    def __getitem__(self, index: int):
        index = int(index)
        tried = index
        for attempt in range(self.max_retries + 1):
            try:
                clip = self._get(tried, attempt)
                return clip if self.labels is None else (clip, self.labels[tried])
            except Exception as exc:  # noqa: BLE001 - one bad clip must not end the epoch
                self._record_failure(tried, exc)
                # A deterministic stand-in: the same (seed, epoch, index) always falls back to the same clip.
                tried = int(self._rng(index, attempt + 1).integers(len(self)))
        raise RuntimeError(f"{self.max_retries + 1} clips in a row failed to load, starting at {self.paths[index]}; see the log")

    def _record_failure(self, index: int, exc: Exception) -> None:
        from expmae.jobs import JsonlLog, JsonlShards, one_line, process_shard

        self.num_failed += 1
        reason = one_line(exc)
        log.warning("skipping clip %s: %s", self.paths[index], reason)
        record = {"key": self.names[index], "path": self.paths[index], "epoch": self.epoch, "reason": reason}
        if self.failure_log is None:
            return
        if self.failure_log.suffix == ".jsonl":  # one file, for one machine's processes
            JsonlLog(self.failure_log).append(record)
        else:  # a folder: one file per rank and worker, merged on read (multi-node safe)
            JsonlShards(self.failure_log).append(record, shard=process_shard())
