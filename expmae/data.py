"""Pretraining clips: a map-style dataset over face clips (or raw videos) with VideoMAE-style augmentation.

``VideoClipDataset(source)[i]`` -> uint8 (3, T, H, W), augmented deterministically from (seed, epoch, index);
:func:`normalize_clips` normalises once per batch on the training device. ``repeated_samples=k`` makes k samples
of one decoded clip, and ``augment_on="device"`` leaves the crop, resize and flip to expmae.data_resample;
:func:`collate_samples` and :func:`batch_to_device` turn any kind of item into uint8 (B, 3, T, S, S) on the device.
Why uint8, the determinism and failure rules, repeated sampling: docs/guides/data.md ("The pretraining dataset").
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from expmae.data_resample import augment_on_device
from expmae.files import JsonlLog
from expmae.jobs import one_line
from expmae.shards import JsonlShards, manifest_files, process_shard, read_manifest
from expmae.labels import read_label_csv
from expmae.model_config import DEFAULT_SAMPLE_STRIDE, IMAGENET_MEAN, IMAGENET_STD  # one definition: the model un-normalises with them
from expmae.video import VIDEO_EXTENSIONS, list_videos, open_video, read_frames

VIDEOMAE_SCALES = (1.0, 0.875, 0.75, 0.66)  # GroupMultiScaleCrop scales of VideoMAE pretraining
SHORT_CLIP_MODES = ("pad", "loop")
AUGMENT_ON = ("cpu", "device")

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
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        manifest = source / "manifest.jsonl" if source.is_dir() else source
        sharded = source.is_dir() and bool(manifest_files(source))  # a crop folder, maybe of several processes
        if sharded or (manifest.suffix == ".jsonl" and manifest.is_file()):
            records = read_manifest(source) if sharded else JsonlLog(manifest).read()
            if any("path" not in r or "key" not in r for r in records):
                raise ValueError(f"{manifest}: every record needs 'key' and 'path' (an expmae-crop manifest)")
            seen: dict[str, dict] = {r["key"]: r for r in records}  # a repeated key (should not happen): last wins
            # Sorted by key, not in the manifest's order, which is the order parallel crop workers finished in:
            # the same clips must give the same dataset (index -> clip), and so the same run, however they were cropped.
            keys = sorted(seen)
            return [str(manifest.parent / seen[k]["path"]) for k in keys], keys
        if source.is_dir():
            files = list_videos(source) + sorted(p for p in source.rglob("*.npy") if not p.name.startswith("."))
            return [str(p) for p in files], [p.relative_to(source).with_suffix("").as_posix() for p in files]
        raise FileNotFoundError(f"{source}: not a folder of clips or a manifest.jsonl")
    paths = [Path(p) for p in source]
    return [str(p) for p in paths], [p.stem for p in paths]


class DecodedClip(NamedTuple):
    """The k samples of one decode, before augmentation."""
    frames: np.ndarray  # (U, H, W, 3) uint8: the union of the k windows' frames, in clip order
    where: np.ndarray  # (k, T): each sample's rows of ``frames``
    params: list  # k x ((top, left, h, w), flip): each sample's crop box and flip


class VideoClipDataset(torch.utils.data.Dataset):
    """Map-style dataset of T-frame clips for pretraining (works with any sampler, DistributedSampler included).

    ``source``: an ``expmae-crop`` output folder (reads its manifest.jsonl), a folder of videos / .npy clips, a
    manifest path, or a list of paths. ``labels``: optional ``{name: label}`` (or a MER2023 label CSV path);
    then only labelled clips are used and items are ``(clip, label)``. Names are manifest keys / file stems,
    which match MER2023 sample names.
    """

    def __init__(self, source, num_frames: int = 16, sample_stride: int = DEFAULT_SAMPLE_STRIDE, input_size: int = 224, train: bool = True,
                 seed: int = 0, *, scales: Sequence[float] = VIDEOMAE_SCALES, flip: bool = True,
                 short_clip: str = "pad", normalize: bool = False, labels: Mapping[str, Any] | str | os.PathLike | None = None,
                 max_retries: int = 10, failure_log: str | os.PathLike | None = None, repeated_samples: int = 1,
                 augment_on: str = "cpu"):
        if short_clip not in SHORT_CLIP_MODES:
            raise ValueError(f"short_clip={short_clip!r}: expected one of {SHORT_CLIP_MODES}")
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on={augment_on!r}: expected one of {AUGMENT_ON}")
        if repeated_samples < 1:
            raise ValueError(f"repeated_samples={repeated_samples}: expected an integer >= 1")
        if (repeated_samples > 1 or augment_on == "device") and (labels is not None or normalize):
            raise ValueError("repeated_samples > 1 and augment_on='device' are for pretraining: they do not combine "
                             "with labels or normalize=True")
        if num_frames < 1 or sample_stride < 1 or input_size < 1:
            raise ValueError(f"num_frames={num_frames}, sample_stride={sample_stride}, input_size={input_size}: all must be >= 1")
        self.paths, self.names = _resolve_source(source)
        self.labels = None
        if labels is not None:
            if isinstance(labels, (str, os.PathLike)):
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
        self.repeated_samples, self.augment_on = int(repeated_samples), augment_on
        self.failure_log = Path(failure_log) if failure_log else None
        self.epoch = 0
        self.keep_decoded, self._cache = 0, OrderedDict()  # decoded clips kept for their other samples (dataset[i, r])
        self.num_failed = 0  # in this process (each DataLoader worker counts its own; failure_log has them all)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """New augmentation for a new epoch (call it like DistributedSampler.set_epoch, before iterating)."""
        self.epoch = int(epoch)

    def _rng(self, index: int, attempt: int = 0) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, index, attempt))

    def _open(self, index: int):
        """The clip's frame source: a memory-mapped .npy array or a decord reader (one per clip: opened once)."""
        path = self.paths[index]
        if path.endswith(".npy"):
            try:
                clip = np.load(path, mmap_mode="r")  # only the sampled frames are read from disk
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: cannot read as a .npy clip ({exc})") from None
            if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8 or len(clip) == 0:
                raise ValueError(f"{path}: expected a uint8 array (T, H, W, 3) with T > 0, got {clip.dtype}{clip.shape}")
            return clip
        return open_video(path)

    def _read(self, source, index: int, idx: np.ndarray) -> np.ndarray:
        if isinstance(source, np.ndarray):
            return np.ascontiguousarray(source[idx])
        return read_frames(source, idx, self.paths[index])

    def _window(self, num_available: int, rng: np.random.Generator | None) -> np.ndarray:
        return sample_frame_indices(num_available, self.num_frames, self.sample_stride, rng, self.short_clip)

    def load_frames(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
        """The sampled raw frames of clip ``index``: uint8 (T, H, W, 3)."""
        source = self._open(index)
        return self._read(source, index, self._window(len(source), rng))

    def crop_params(self, height: int, width: int, rng: np.random.Generator | None) -> tuple[tuple[int, int, int, int], bool]:
        """One sample's crop box (top, left, h, w) and flip: VideoMAE's multi-scale crop, or the centre square."""
        if rng is None:
            return center_crop_box(height, width), False
        box = multi_scale_crop_box(height, width, self.input_size, rng, self.scales)
        return box, bool(self.flip and rng.random() < 0.5)

    def transform(self, frames: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        """Raw frames (T, H, W, 3) -> uint8 (3, T, S, S): one crop (+ flip) for all frames."""
        box, flip = self.crop_params(*frames.shape[1:3], rng)
        return crop_resize_frames(frames, box, self.input_size, flip)

    def _decode(self, index: int, attempt: int) -> DecodedClip:
        """The k = repeated_samples samples of one decode, before augmentation. The draws, in order: k windows,
        then (crop, flip) per sample; with k = 1 that is the order of load_frames + transform."""
        rng = self._rng(index, attempt) if self.train else None
        source = self._open(index)
        windows = np.stack([self._window(len(source), rng) for _ in range(self.repeated_samples)])  # (k, T)
        union, where = np.unique(windows, return_inverse=True)  # each needed frame decoded once, in order
        frames = self._read(source, index, union)  # (U, H, W, 3)
        params = [self.crop_params(*frames.shape[1:3], rng) for _ in range(self.repeated_samples)]
        return DecodedClip(frames, where.reshape(windows.shape), params)  # where: (k, T) rows of frames

    def _decoded(self, index: int, attempt: int) -> DecodedClip:
        """:meth:`_decode`, through this process's cache of the last ``keep_decoded`` clips."""
        key = (self.epoch, index, attempt)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        clip = self._cache[key] = self._decode(index, attempt)
        while len(self._cache) > self.keep_decoded:
            self._cache.popitem(last=False)
        return clip

    def _get(self, index: int, attempt: int, rep: int | None = None):
        """All k samples of clip ``index`` (an item as the class docstring says), or only sample ``rep``."""
        if rep is None:
            return self._augment(self._decode(index, attempt), range(self.repeated_samples), stacked=self.repeated_samples > 1)
        return self._augment(self._decoded(index, attempt), [rep], stacked=False)

    def _augment(self, clip: DecodedClip, reps: Sequence[int], stacked: bool):
        """Samples ``reps`` of a decoded clip: device-augmentation inputs, or CPU-augmented uint8 clips,
        (3, T, S, S) for one sample or (len(reps), 3, T, S, S) when ``stacked``."""
        frames, where = clip.frames, clip.where[list(reps)]  # where: (n, T)
        if len(reps) < self.repeated_samples:  # ship only the frames these samples use
            used, where = np.unique(where, return_inverse=True)
            frames, where = frames[used], where.reshape(len(reps), -1)
        params = [clip.params[r] for r in reps]
        if self.augment_on == "device":
            return {"frames": torch.from_numpy(frames), "frame_index": torch.from_numpy(where.astype(np.int64)),
                    "box": torch.tensor([box for box, _ in params], dtype=torch.int64),
                    "flip": torch.tensor([flip for _, flip in params], dtype=torch.bool)}
        clips = [crop_resize_frames(frames[w], box, self.input_size, flip) for w, (box, flip) in zip(where, params)]
        out = torch.stack(clips) if stacked else clips[0]  # (n, 3, T, S, S) or (3, T, S, S)
        return normalize_clips(out) if self.normalize else out

    def reference_clips(self, n: int) -> torch.Tensor:
        """uint8 (n, 3, T, S, S): the first sample of items 0..n-1 in the current epoch, the same bytes whatever
        ``augment_on`` says; a fixed batch to draw reconstruction grids of."""
        items = [self[i] for i in range(min(n, len(self)))]
        return torch.stack([first_sample(item, self.input_size) for item in items])

    def __getitem__(self, key):
        """``dataset[i]``: the item of clip i; ``dataset[i, r]``: its sample r alone (0 <= r < repeated_samples),
        one sample of the same decode, which this process keeps for the next ``keep_decoded`` clips' samples."""
        index, rep = (int(key), None) if np.ndim(key) == 0 else (int(key[0]), int(key[1]))
        if rep is not None and not 0 <= rep < self.repeated_samples:
            raise IndexError(f"sample {rep} of clip {index}: expected 0 <= sample < repeated_samples={self.repeated_samples}")
        tried = index
        for attempt in range(self.max_retries + 1):
            try:
                clip = self._get(tried, attempt, rep)
                return clip if self.labels is None else (clip, self.labels[tried])
            except Exception as exc:  # noqa: BLE001 - one bad clip must not end the epoch
                self._record_failure(tried, exc)
                # A deterministic stand-in: the same (seed, epoch, index) always falls back to the same clip.
                tried = int(self._rng(index, attempt + 1).integers(len(self)))
        raise RuntimeError(f"{self.max_retries + 1} clips in a row failed to load, starting at {self.paths[index]}; see the log")

    def _record_failure(self, index: int, exc: Exception) -> None:
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



# ------------------------------------------------------------------------------------ batches of samples


def collate_samples(items: Sequence) -> torch.Tensor | dict[str, torch.Tensor]:
    """A DataLoader ``collate_fn`` for every kind of VideoClipDataset item -> one batch of samples.

    Clips (3, T, S, S) -> (B, 3, T, S, S) (the default collate, so k = 1 batches are what they always were);
    repeated clips (k, 3, T, S, S) -> (B * k, 3, T, S, S) with a clip's samples adjacent; device-augmentation
    items -> their frames packed along the first axis, frame_index shifted to index the packed frames.
    """
    first = items[0]
    if isinstance(first, torch.Tensor):
        batch = default_collate(list(items))  # in a worker: stacked straight into shared memory
        return batch.flatten(0, 1) if first.ndim == 5 else batch  # (n, k, 3, T, S, S) -> (n k, 3, T, S, S): a view
    if isinstance(first, dict):
        sizes = {tuple(item["frames"].shape[1:]) for item in items}
        if len(sizes) > 1:
            raise ValueError(f"augment_on='device' needs clips of one frame size (an expmae-crop folder); this batch "
                             f"has {sorted(sizes)}: use data.augment_on=cpu for sources of mixed sizes")
        offsets = np.cumsum([0] + [len(item["frames"]) for item in items[:-1]])
        frames = torch.empty((sum(len(item["frames"]) for item in items), *sizes.pop()), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            frames.share_memory_()  # in a worker: written once, straight where the main process reads it
        return {"frames": torch.cat([item["frames"] for item in items], out=frames),  # (F, H, W, 3)
                "frame_index": torch.cat([item["frame_index"] + int(o) for item, o in zip(items, offsets)]),  # (B, T)
                "box": torch.cat([item["box"] for item in items]), "flip": torch.cat([item["flip"] for item in items])}
    return default_collate(list(items))  # (clip, label) pairs


def batch_to_device(batch: torch.Tensor | dict[str, torch.Tensor], device, input_size: int) -> torch.Tensor:
    """A collated batch -> uint8 clips (B, 3, T, S, S) on ``device`` (device-augmentation batches are augmented
    there). What the training loop calls in place of ``clips.to(device)``; normalize_clips comes after."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return augment_on_device({k: v.to(device, non_blocking=True) for k, v in batch.items()}, input_size)


def first_sample(item, input_size: int) -> torch.Tensor:
    """uint8 (3, T, S, S): the first sample of a VideoClipDataset item of any kind, CPU-augmented."""
    if isinstance(item, dict):  # PIL here: the same bytes as augment_on_device, and fast on the CPU
        frames = item["frames"].numpy()[item["frame_index"][0].numpy()]  # (T, H, W, 3)
        return crop_resize_frames(frames, tuple(item["box"][0].tolist()), input_size, bool(item["flip"][0]))
    return item[0] if item.ndim == 5 else item


def resolve_augment_on(setting: str, device) -> str:
    """``data.augment_on``: 'auto' -> 'device' when training on a GPU (frees the CPU cores), else 'cpu'."""
    if setting == "auto":
        return "device" if torch.device(device).type == "cuda" else "cpu"
    if setting not in AUGMENT_ON:
        raise ValueError(f"augment_on={setting!r}: expected auto or one of {AUGMENT_ON}")
    return setting
