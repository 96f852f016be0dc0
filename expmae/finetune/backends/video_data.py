"""The clips of end-to-end finetuning: a folder's clips by sample name, a run's per-epoch seeds, and the
deterministic evaluation views of a clip (``test_views`` windows spread over it, centre-cropped)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from expmae.data import center_crop_box, crop_resize_frames, sample_frame_indices
from expmae.features.common import list_inputs
from expmae.features.visual import clip_windows, frame_reader
from expmae.jobs import one_line


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch's shuffle and DataLoader worker seeds: a function of (seed, epoch) only, so a
    resumed run draws what an uninterrupted one does (the augmentation already is: expmae.data)."""
    return int(np.random.SeedSequence((seed, epoch)).generate_state(1)[0])


def index_videos(source: str | os.PathLike) -> dict[str, Path]:
    """``{sample name: clip}`` of an expmae-crop output folder or a folder of videos; the name is the file stem,
    as for the feature folders (expmae.features.common.list_inputs) and the MER2023 label names."""
    index: dict[str, Path] = {}
    for path in list_inputs(source):
        if path.stem in index:
            raise ValueError(f"{source}: two clips are named {path.stem!r} ({index[path.stem]} and {path}); "
                             "sample names (file stems) must be unique")
        index[path.stem] = path
    return index


def eval_windows(num_available: int, num_frames: int, sample_stride: int, views: int = 1) -> np.ndarray:
    """Frame indices (V, num_frames) of a clip's evaluation views, V <= ``views``, distinct windows only.

    One view: the centre window (expmae.data's deterministic view). More: windows from the first frame to the
    last, evenly spread (expmae.features.visual.clip_windows at a 1-frame step; VideoMAE's test-time temporal
    views), overlapping when the clip holds fewer back-to-back windows. A clip shorter than one window has one
    view, padded with its last frame; one just a few frames longer has as many views as distinct starts.
    """
    if views < 1:
        raise ValueError(f"views={views}: expected >= 1")
    if views == 1:
        return sample_frame_indices(num_available, num_frames, sample_stride)[None]
    return clip_windows(num_available, num_frames, sample_stride, clip_stride=1, max_clips=views)


class EvalViews(torch.utils.data.Dataset):
    """A clip's evaluation views (:func:`eval_windows`, centre crop), deterministic: ``(row, views, "")`` with
    views uint8 (V, 3, T, S, S), or ``(row, no views, reason)`` for a clip that fails to load: an evaluation pass
    never stops on one clip, and never silently scores another sample's clip in its place."""

    def __init__(self, paths: Sequence[str], num_frames: int, sample_stride: int, input_size: int, views: int):
        self.paths, self.num_frames, self.sample_stride = list(paths), num_frames, sample_stride
        self.input_size, self.views = input_size, views

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        try:
            total, read = frame_reader(self.paths[row])
            windows = eval_windows(total, self.num_frames, self.sample_stride, self.views)
            unique, inverse = np.unique(windows, return_inverse=True)  # overlapping views: each frame decoded once
            frames = read(unique)
            pixels = crop_resize_frames(frames, center_crop_box(*frames.shape[1:3]), self.input_size)  # (3, U, S, S)
            views = pixels[:, torch.from_numpy(inverse.reshape(windows.shape))].transpose(0, 1).contiguous()
            return row, views, ""
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            size = self.input_size
            return row, torch.zeros(0, 3, self.num_frames, size, size, dtype=torch.uint8), one_line(exc)
