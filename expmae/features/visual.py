"""expMAE visual features from an exported encoder folder (``expmae-export``): ``video`` and ``frame`` level.

``video`` mean-pools each sliding T-frame window's tubelet tokens through the clip encoder; ``frame`` mean-pools
each sampled frame's patch tokens through the frame encoder (the exported timm model's ``forward()``). Any depth and
read-out (token mean, or per patch position) is available; ``encode_readouts`` returns many from one forward pass.
Windows, inputs, preprocessing and shapes: docs/guides/features.md ("expMAE features").
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from expmae.features.clip import frame_indices
from expmae.features.common import (LAYER_REDUCTIONS, check_layers, list_inputs, model_fingerprint, parse_layers, pool,
                                    resolve_device, resolve_dtype, run_extraction, weights_fingerprint)
from expmae.shards import Shard
from expmae.model_config import DEFAULT_SAMPLE_STRIDE
from expmae.video import open_video, read_frames

MODALITIES = ("video", "frame")
DEFAULT_FRAME_COUNT = 16
READOUTS = ("mean", "position", "tokens")
CLI_READOUTS = READOUTS[:2]  # "tokens" is (N, T'*S, D) per window: for the attentive probe in memory, not a file


# ----------------------------------------------------------------------------------------------- sampling
def clip_windows(num_available: int, num_frames: int, sample_stride: int, clip_stride: int | None = None,
                 max_clips: int = 0) -> np.ndarray:
    """Frame indices (N, num_frames) of the sliding windows over a video of ``num_available`` frames.

    Windows start at 0, clip_stride, 2 x clip_stride, ... while they fit; ``max_clips`` > 0 keeps that many,
    spread evenly. A video shorter than one window gives one window padded with its last frame.
    """
    from expmae.data import sample_frame_indices  # deferred: console start-up: torch

    if num_frames < 1 or sample_stride < 1 or (clip_stride is not None and clip_stride < 1) or max_clips < 0:
        raise ValueError(f"num_frames={num_frames}, sample_stride={sample_stride}, clip_stride={clip_stride}, "
                         f"max_clips={max_clips}: expected positive values (max_clips >= 0)")
    span = (num_frames - 1) * sample_stride + 1
    if num_available < span:
        return sample_frame_indices(num_available, num_frames, sample_stride, None, "pad")[None]
    starts = np.arange(0, num_available - span + 1, clip_stride or num_frames * sample_stride)
    if 0 < max_clips < len(starts):
        starts = starts[np.unique(np.linspace(0, len(starts) - 1, max_clips).round().astype(np.int64))]
    return starts[:, None] + np.arange(num_frames)[None] * sample_stride


def frame_reader(source) -> tuple[int, Any]:
    """(frame count, read(indices) -> uint8 (N, H, W, 3)) for a video file, a .npy face clip or a frame array."""
    if isinstance(source, np.ndarray) or _is_tensor(source):
        frames = source.numpy() if _is_tensor(source) else source
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise ValueError(f"frames: expected uint8 (T, H, W, 3) with T > 0, got {frames.dtype}{tuple(frames.shape)}")
        return len(frames), lambda idx: np.ascontiguousarray(frames[idx])
    path = Path(source)
    if path.suffix.lower() == ".npy":
        try:
            clip = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read as a .npy face clip ({exc})") from None
        if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8 or len(clip) == 0:
            raise ValueError(f"{path}: a {clip.dtype} array shaped {clip.shape}; expected a uint8 (T, H, W, 3) face clip")
        return len(clip), lambda idx: np.ascontiguousarray(clip[idx])

    reader = open_video(path)
    return len(reader), lambda idx: read_frames(reader, idx, path)


def _is_tensor(x) -> bool:
    import torch  # deferred: console start-up: torch, +1.5 s on expmae-features --help

    return torch.is_tensor(x)


def crop_face_frames(path: str | os.PathLike, size: int = 224, device: str = "cpu") -> tuple[np.ndarray, dict]:
    """The main face of a raw video as uint8 (T, size, size, 3), cropped by expmae.facecrop_video (MTCNN, tracking,
    smoothing) into a temporary file; returns the frames and the crop tool's record (detection rate, ...)."""
    from expmae.facecrop_video import CropOptions, crop_video  # deferred: console start-up: +9 ms on expmae-features --help

    with tempfile.TemporaryDirectory(prefix="expmae-crop-") as tmp:
        out = Path(tmp) / "face.npy"
        record = crop_video(path, out, CropOptions(size=size, format="npy", device=device))
        return np.load(out), record


def read_out(tokens, readout: str, num_patches: int):
    """Patch / tubelet tokens (B, T'*S, D) in (t, y, x) order, S = num_patches -> float32 features:

    - "mean": the mean over all tokens, (B, D) (the encoder's global average pool);
    - "position": the mean over time only, one vector per patch position, flattened: (B, S*D);
    - "tokens": all tokens, (B, T'*S, D) (for the attentive probe).
    """
    tokens = tokens.float()
    if readout == "mean":
        return tokens.mean(dim=1)
    B, N, D = tokens.shape
    if readout == "position":
        return tokens.reshape(B, N // num_patches, num_patches, D).mean(dim=1).reshape(B, num_patches * D)
    if readout == "tokens":
        return tokens
    raise ValueError(f"readout {readout!r}; expected one of {', '.join(READOUTS)}")


def pool_readouts(readouts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One video's encode_readouts (one row per window) -> one entry per key, pooled as expmae-features pools a
    video (``pooling="mean"``): "mean" / "position" read-outs averaged over the windows, (F,); "tokens" kept, the
    windows' tokens one after another, (N_windows * T'*S, D) (for the attentive probe; stack videos of different
    lengths with expmae.probe.stack_tokens)."""
    return {key: x.reshape(-1, x.shape[-1]) if x.ndim == 3 else pool(x, "mean") for key, x in readouts.items()}


# ----------------------------------------------------------------------------------------------- extractor
class VisualFeatureExtractor:
    """An expMAE encoder as ``video / frames -> features (N, D)``: ``load`` (CPU: decode, crop, resize) then
    ``encode`` (batched, on the GPU when there is one); ``extractor(source)`` does both.

    ``encoder``: an encoder folder, or an already loaded ExpMAEEncoder / ExpMAE (``expmae.load_encoder``).
    """

    def __init__(self, encoder, *, modality: str = "video", num_frames: int | None = None,
                 sample_stride: int | None = None, clip_stride: int | None = None, max_clips: int = 0,
                 batch_size: int = 8, device: str = "auto", dtype: str = "float32", crop: bool = False,
                 layers: str | int | Sequence[int] = (-1,), readout: str = "mean", layer_reduce: str = "sum"):
        # deferred: console start-up: torch and the weights, +1.5 s on expmae-features --help
        import torch

        from expmae.weights import load_encoder, read_encoder_config, unwrap_encoder

        if modality not in MODALITIES:
            raise ValueError(f"modality={modality!r}: expected one of {MODALITIES}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        if readout not in CLI_READOUTS or layer_reduce not in LAYER_REDUCTIONS:
            raise ValueError(f"readout={readout!r}, layer_reduce={layer_reduce!r}: expected one of {CLI_READOUTS} "
                             f"and one of {LAYER_REDUCTIONS}")
        self.layers, self.readout, self.layer_reduce = parse_layers(layers), readout, layer_reduce
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.encoder_dir: Path | None = None
        recorded_stride = None
        if isinstance(encoder, (str, os.PathLike)):
            self.encoder_dir = Path(encoder)
            recorded_stride = read_encoder_config(self.encoder_dir)["expmae"].get("clip", {}).get("sample_stride")
            encoder = load_encoder(self.encoder_dir)
        encoder = unwrap_encoder(encoder)
        self.encoder = encoder.to(self.device, self.dtype).eval()
        for layer in self.layers:
            self.layer_index(layer)  # validate now
        self.cfg = cfg = encoder.cfg
        self.modality, self.batch_size, self.crop = modality, batch_size, crop
        self.sample_stride = int(sample_stride or recorded_stride or DEFAULT_SAMPLE_STRIDE)
        if modality == "video":
            self.num_frames = num_frames or cfg.num_frames
            if self.num_frames % cfg.tubelet_size or self.num_frames > cfg.num_frames:
                raise ValueError(f"num_frames={self.num_frames}: expected a multiple of tubelet_size={cfg.tubelet_size} "
                                 f"and at most the encoder's num_frames={cfg.num_frames}")
        else:
            self.num_frames = DEFAULT_FRAME_COUNT if num_frames is None else num_frames
            if self.num_frames < 0:
                raise ValueError(f"num_frames={self.num_frames}: expected >= 0 (0: every frame)")
        self.clip_stride, self.max_clips = clip_stride, max_clips
        if modality == "video":
            clip_windows(1, self.num_frames, self.sample_stride, clip_stride, max_clips)  # validate now
        self._torch = torch

    @property
    def settings(self) -> dict:
        """What determines the features (recorded in the feature folder's extractor.json)."""
        out = {"modality": self.modality, "num_frames": self.num_frames, "crop": self.crop,
               "dtype": str(self.dtype).replace("torch.", "")}
        if self.modality == "video":
            out.update(sample_stride=self.sample_stride, clip_stride=self.clip_stride, max_clips=self.max_clips)
        # Recorded only when not the default, so folders made before these options existed still resume.
        if self.layers != (-1,) or self.readout != "mean":
            out.update(layers=[self.layer_index(layer) for layer in self.layers], readout=self.readout)
            if len(self.layers) > 1:
                out.update(layer_reduce=self.layer_reduce)
        if self.encoder_dir is not None:
            out.update(encoder=self.encoder_dir.resolve().name, encoder_config=model_fingerprint(self.encoder_dir),
                       encoder_weights=weights_fingerprint(self.encoder_dir))  # expmae encoders get retrained
        return out

    def load(self, source) -> dict:
        """Decode (and crop) one video / .npy clip / frame array: uint8 frames (3, U, S, S) + which to use."""
        from expmae.data import center_crop_box, crop_resize_frames  # deferred: console start-up: torch

        info: dict[str, Any] = {}
        if self.crop:
            if not isinstance(source, (str, os.PathLike)):
                raise ValueError("crop=True needs a video path (frames given as an array are used as they are)")
            size = self.cfg.img_size
            if size < 32 or size % 2 or size in (48, 72):  # sizes the crop tool refuses (video / decord limits)
                size = 224
            frames, record = crop_face_frames(source, size, str(self.device) if self.device.type == "cuda" else "cpu")
            info["crop"] = {k: record[k] for k in ("start", "frames", "detection_rate", "face_side") if k in record}
            source = frames
        total, read = frame_reader(source)
        if self.modality == "video":
            windows = clip_windows(total, self.num_frames, self.sample_stride, self.clip_stride, self.max_clips)
        else:
            windows = frame_indices(total, self.num_frames)[:, None]  # one "window" of one frame each
        unique, inverse = np.unique(windows, return_inverse=True)
        frames = read(unique)
        h, w = frames.shape[1:3]
        pixels = crop_resize_frames(frames, center_crop_box(h, w), self.cfg.img_size)  # (3, U, S, S) uint8
        info.update(source_frames=int(total), size=[int(h), int(w)])
        return {"pixels": pixels, "windows": inverse.reshape(windows.shape), "info": info}

    def layer_index(self, layer: int) -> int:
        """A hidden-state index as parse_layers gives it (0 = embeddings, i = block i, negative from the end) ->
        0..depth, the form used in encode_readouts' keys."""
        n = len(self.encoder.blocks) + 1
        check_layers([layer], n)
        return layer % n

    def encode_readouts(self, loaded: dict, layers: Sequence[int] = (-1,),
                        readouts: Sequence[str] = ("mean",)) -> dict[str, np.ndarray]:
        """Every requested read-out of every requested hidden state, one forward pass per batch of windows:
        {"L{i}/{readout}": float32 array with one row per clip (video) or frame (frame)}, i = layer_index(layer).

        Each state gets the encoder's final LayerNorm (ExpMAEEncoder.forward_intermediates), so the last one is
        exactly the encoder's output. Read-outs (see :func:`read_out`): "mean" (N, D), "position" (N, S*D),
        "tokens" (N, T'*S, D); S = patches per frame, T' = time steps per window (1 for "frame")."""
        from expmae.data import normalize_clips  # deferred: console start-up: torch

        bad = [r for r in readouts if r not in READOUTS]
        if bad or not readouts:
            raise ValueError(f"readouts {list(readouts)}: expected one or more of {', '.join(READOUTS)}")
        index = {self.layer_index(layer): layer for layer in layers}
        torch, encoder = self._torch, self.encoder
        pixels, windows = loaded["pixels"], torch.from_numpy(loaded["windows"])
        out: dict[str, list[np.ndarray]] = {f"L{i}/{r}": [] for i in index for r in readouts}
        with torch.inference_mode():
            for start in range(0, len(windows), self.batch_size):
                idx = windows[start : start + self.batch_size]
                x = pixels[:, idx].permute(1, 0, 2, 3, 4).to(self.device)  # (B, 3, T, S, S) uint8
                x = normalize_clips(x, dtype=self.dtype, mean=self.cfg.mean, std=self.cfg.std)
                x = encoder.embed_clips(x) if self.modality == "video" else encoder.embed_frames(x[:, :, 0])
                for i, tokens in encoder.forward_intermediates(x, sorted(index)).items():
                    tokens = tokens[:, encoder.num_prefix_tokens:]  # patch / tubelet tokens (not a class token)
                    for r in readouts:
                        out[f"L{i}/{r}"].append(read_out(tokens, r, self.cfg.num_patches).cpu().numpy())
        return {key: np.concatenate(parts, axis=0) for key, parts in out.items()}

    def encode(self, loaded: dict) -> tuple[np.ndarray, dict]:
        """(N, F) float32: one row per clip (video) or frame (frame), this extractor's read-out (default: the last
        state's tokens mean-pooled, (N, D)); several layers are combined by ``layer_reduce``."""
        feats = self.encode_readouts(loaded, self.layers, (self.readout,))
        parts = [feats[f"L{self.layer_index(layer)}/{self.readout}"] for layer in self.layers]
        if len(parts) == 1:
            combined = parts[0]
        else:
            combined = np.sum(parts, axis=0) if self.layer_reduce == "sum" else np.mean(parts, axis=0)
        count = "clips" if self.modality == "video" else "frames"
        return combined, {**loaded["info"], count: int(len(loaded["windows"]))}

    def __call__(self, source) -> np.ndarray:
        return self.encode(self.load(source))[0]


def extract(video_or_frames, encoder, *, modality: str = "video", pooling: str = "mean", **options) -> np.ndarray:
    """Features of one video (a path: video file or .npy face clip) or of frames (uint8 (T, H, W, 3)), for
    notebooks: (D,) with ``pooling="mean"``, else (N, D) per clip (video) or frame (frame).

    ``encoder``: an encoder folder or a loaded encoder (``expmae.load_encoder(folder)``: load it once when
    calling this in a loop). ``options``: see :class:`VisualFeatureExtractor` (num_frames, sample_stride,
    clip_stride, max_clips, batch_size, device, dtype, crop, layers, readout, layer_reduce).
    """
    extractor = VisualFeatureExtractor(encoder, modality=modality, **options)
    return pool(extractor(video_or_frames), pooling)


def extract_visual_features(
    videos: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    encoder_dir: str | os.PathLike,
    *,
    modality: str = "video",
    pooling: str = "mean",
    num_frames: int | None = None,
    sample_stride: int | None = None,
    clip_stride: int | None = None,
    max_clips: int = 0,
    crop: bool = False,
    layers: str | int | Sequence[int] = (-1,),
    readout: str = "mean",
    layer_reduce: str = "sum",
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    limit: int | None = None,
    retry_failed: bool = False,
    shard: Shard = Shard(),
    prefetch: int = 2,
    progress: bool = True,
):
    """One ``<video stem>.npy`` per video in ``out_dir`` ((D,) for pooling="mean", (N, D) for "none"); resumable,
    failures recorded in failures.jsonl. Returns the job's JobSummary."""
    videos = list_inputs(videos)  # a bad INPUT fails before the model loads
    extractor = VisualFeatureExtractor(encoder_dir, modality=modality, num_frames=num_frames,
                                       sample_stride=sample_stride, clip_stride=clip_stride, max_clips=max_clips,
                                       batch_size=batch_size, device=device, dtype=dtype, crop=crop, layers=layers,
                                       readout=readout, layer_reduce=layer_reduce)
    return run_extraction(videos, out_dir, load=extractor.load, encode=extractor.encode, pooling=pooling,
                          settings=extractor.settings, limit=limit, retry_failed=retry_failed, shard=shard, prefetch=prefetch,
                          desc=f"expMAE {modality} features", progress=progress)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-frames", type=int, default=None,
                        help="video: frames per clip (default: the encoder's); frame: frames per video, evenly "
                             f"spaced (default {DEFAULT_FRAME_COUNT}, 0: every frame)")
    parser.add_argument("--sample-stride", type=int, default=None,
                        help="video: frame step inside a clip (default: the one recorded at pretraining, else "
                             f"{DEFAULT_SAMPLE_STRIDE})")
    parser.add_argument("--clip-stride", type=int, default=None,
                        help="video: frames between clip starts (default num_frames x sample_stride: back to back)")
    parser.add_argument("--max-clips", type=int, default=0, help="video: at most this many clips, evenly spread (0: all)")
    parser.add_argument("--crop", action="store_true",
                        help="inputs are raw videos: crop the main face first (expmae-crop's MTCNN pipeline)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips (video) or frames (frame) per forward pass")
    parser.add_argument("--layers", default="-1",
                        help="hidden states to read (0: patch embeddings + position code, i: block i, -1: the last; "
                             "each after the final norm), e.g. -1 (default) or 2,-1; several are combined by "
                             "--layer-reduce")
    parser.add_argument("--layer-reduce", choices=LAYER_REDUCTIONS, default="sum", help="how to combine several layers")
    parser.add_argument("--readout", choices=CLI_READOUTS, default="mean",
                        help="mean: tokens averaged, (D,) per clip / frame; position: averaged over time only, one "
                             "vector per patch position, concatenated, (S*D,) with S = (img_size / patch_size)^2")


def run_cli(args: argparse.Namespace, out_root: Path):
    level = "UTT" if args.pooling == "mean" else "FRA"
    layers = parse_layers(args.layers)
    tag = "" if layers == (-1,) else "-L" + "_".join(map(str, layers))  # another setting, another default folder
    tag += "" if args.readout == "mean" else f"-{args.readout}"
    out_dir = out_root / (args.name or f"{Path(args.model).expanduser().resolve().name}-{args.modality}{tag}-{level}")
    summary = extract_visual_features(
        args.input, out_dir, args.model, modality=args.modality, pooling=args.pooling, num_frames=args.num_frames,
        sample_stride=args.sample_stride, clip_stride=args.clip_stride, max_clips=args.max_clips, crop=args.crop,
        layers=layers, readout=args.readout, layer_reduce=args.layer_reduce, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, limit=args.limit,
        retry_failed=args.retry_failed, shard=args.shard, prefetch=args.prefetch, progress=not args.no_progress)
    return out_dir, summary
