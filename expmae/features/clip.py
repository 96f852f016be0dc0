"""Cross-modal features: CLIP image embeddings of face frames, from a local CLIP folder (transformers).

Input: face clips, already cropped: an ``expmae-crop`` output folder (mp4 or npy clips) or any folder of
face videos. ``num_frames`` frames spread evenly over each clip go through the image tower and its
projection into CLIP's joint image-text space (``get_image_features``; a ``CLIPVisionModelWithProjection``
folder works too).

Shapes: frame level (N, D) with N = min(num_frames, frames in the clip) (all frames when num_frames=0) and
D the projection size (768 for ViT-L/14); mean-pooled (D,).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from expmae.features.common import (
    check_model_dir,
    feature_dir_name,
    list_inputs,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    run_extraction,
)
from expmae.shards import Shard
from expmae.video import open_video, read_frames

MODEL_EXAMPLE = "openai/clip-vit-large-patch14"


def frame_indices(total: int, num_frames: int) -> np.ndarray:
    """``num_frames`` indices spread evenly over ``total`` frames, first and last included (all when 0 or short)."""
    if total <= 0:
        raise ValueError(f"a clip with {total} frames")
    if num_frames <= 0 or total <= num_frames:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, num_frames).round().astype(np.int64))


def read_face_frames(path: str | os.PathLike, num_frames: int = 16) -> np.ndarray:
    """Evenly spaced RGB frames of a face clip, uint8 (N, H, W, 3): a video (decoded by ``expmae.video``,
    which refuses decord's mis-strided frame widths) or an ``expmae-crop --format npy`` array (T, H, W, 3)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        clip = np.load(path, mmap_mode="r", allow_pickle=False)
        if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8 or len(clip) == 0:
            raise ValueError(f"{path}: a {clip.dtype} array shaped {clip.shape}; expected a uint8 (T, H, W, 3) face clip")
        return np.ascontiguousarray(clip[frame_indices(len(clip), num_frames)])
    reader = open_video(path)
    return read_frames(reader, frame_indices(len(reader), num_frames), path)


class ClipImageEncoder:
    """A local CLIP folder as ``frames uint8 (N, H, W, 3) -> image embeddings (N, D)``, ``batch_size`` at a time."""

    def __init__(self, model_dir: str | os.PathLike, *, batch_size: int = 32, device: str = "auto", dtype: str = "float32"):
        # Check the folder before the slow imports, so a wrong path fails at once.
        self.model_dir = check_model_dir(model_dir, what="a CLIP model", example=MODEL_EXAMPLE)
        # deferred: console start-up: torch and transformers, +1.5 s on expmae-features --help
        import torch
        from transformers import AutoImageProcessor, AutoModel

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected >= 1")
        self.device, self.dtype, self.batch_size = resolve_device(device), resolve_dtype(dtype), batch_size
        self.processor = AutoImageProcessor.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
        self.model.to(self.device, self.dtype).eval()
        if not (hasattr(self.model, "get_image_features") or hasattr(self.model, "visual_projection")):
            raise ValueError(f"{self.model_dir}: a {type(self.model).__name__}, not a CLIP model with an image projection")
        self._torch = torch

    def _embed(self, pixel_values):
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixel_values)
            return out if isinstance(out, self._torch.Tensor) else out.pooler_output  # transformers 4 vs 5
        return self.model(pixel_values=pixel_values).image_embeds  # CLIPVisionModelWithProjection

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(frames), self.batch_size):
                batch = list(frames[start : start + self.batch_size])
                pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
                out.append(self._embed(pixels.to(self.device, self.dtype)).float().cpu().numpy())
        return np.concatenate(out, axis=0)


def extract_clip_features(
    videos: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    num_frames: int = 16,
    pooling: str = "mean",
    batch_size: int = 32,
    device: str = "auto",
    dtype: str = "float32",
    limit: int | None = None,
    retry_failed: bool = False,
    shard: Shard = Shard(),
    prefetch: int = 2,
    progress: bool = True,
):
    """One ``<video stem>.npy`` per face video in ``out_dir``: (D,) for ``pooling="mean"``, (N, D) for "none".
    Returns the job's JobSummary."""
    videos = list_inputs(videos)  # a bad INPUT fails before the model loads
    encoder = ClipImageEncoder(model_dir, batch_size=batch_size, device=device, dtype=dtype)

    def encode(frames: np.ndarray):
        return encoder(frames), {"size": list(frames.shape[1:3])}

    settings = {"modality": "clip", "model": encoder.model_dir.name, "model_config": model_fingerprint(encoder.model_dir),
                "num_frames": num_frames, "dtype": dtype}
    return run_extraction(videos, out_dir, load=lambda p: read_face_frames(p, num_frames), encode=encode,
                          pooling=pooling, settings=settings, limit=limit, retry_failed=retry_failed, shard=shard,
                          prefetch=prefetch, desc="CLIP features", progress=progress)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-frames", type=int, default=16, help="frames per clip, evenly spaced (0: every frame)")
    parser.add_argument("--batch-size", type=int, default=32, help="frames per forward pass")


def run_cli(args: argparse.Namespace, out_root: Path):
    out_dir = out_root / (args.name or feature_dir_name(args.model, args.pooling))
    summary = extract_clip_features(args.input, out_dir, args.model, num_frames=args.num_frames, pooling=args.pooling,
                                    batch_size=args.batch_size, device=args.device, dtype=args.dtype, limit=args.limit,
                                    retry_failed=args.retry_failed, shard=args.shard, prefetch=args.prefetch, progress=not args.no_progress)
    return out_dir, summary
