"""Audio features: each video's sound track -> 16 kHz mono -> a HuBERT / wav2vec2-style model (transformers).

Layer choice: the MER2023 baseline's audio extractor (zeroQiaoba/MERTools,
feature_extraction/audio/extract_transformers_embedding.py) uses ``layer_ids = [-1]``, the last hidden state,
summed over the chosen layers and mean-pooled over time for its ``chinese-hubert-large-UTT`` features; that is
our default. Other choices (``--layers -4,-3,-2,-1 --layer-reduce mean``) are one flag away.

Shapes: frame level (N, D) with N ~ 50 per second of audio (the conv front end's 320-sample hop at 16 kHz)
and D the model's hidden size (1024 for a large model); mean-pooled (D,).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from expmae.features.common import (
    LAYER_REDUCTIONS,
    check_layers,
    check_model_dir,
    combine_layers,
    feature_dir_name,
    list_inputs,
    model_fingerprint,
    parse_layers,
    resolve_device,
    resolve_dtype,
    run_extraction,
)
from expmae.shards import Shard

SAMPLE_RATE = 16_000
DEFAULT_LAYERS = (-1,)
MODEL_EXAMPLE = "TencentGameMate/chinese-hubert-large"


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The first audio stream of a video, resampled to ``sample_rate``, mono float32 (S,) in [-1, 1].

    Channels are averaged, i.e. (L + R) / 2, which is what ``ffmpeg -ac 1`` writes to the 16-bit wav files the
    MER2023 baseline reads (swresample's own float downmix would scale stereo by sqrt(2) instead).
    """
    import av  # deferred: console start-up: PyAV, +40 ms on expmae-features --help

    chunks = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream (the video has no sound track)")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", rate=sample_rate)  # keeps the channel layout
        for frame in container.decode(stream):
            chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray() for f in resampler.resample(None))  # flush the resampler's tail
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise ValueError(f"{path}: the audio stream holds no samples")
    return np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32)


def _receptive_field(config) -> int:
    """Samples the conv front end needs to emit one frame (400 for HuBERT / wav2vec2)."""
    field = 1
    for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
        field = (field - 1) * stride + kernel
    return field


class AudioEncoder:
    """A local HuBERT / wav2vec2 / WavLM folder as ``waveform (S,) 16 kHz -> features (N, D)``.

    Long audio is cut into ``chunk_seconds`` pieces (a sub-second tail joins the piece before it), run
    ``batch_size`` at a time; pieces see no context across their borders, so keep them long. The waveform is
    normalised as a whole first, as the model's feature extractor prescribes, then cut.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        layers: str | Sequence[int] = DEFAULT_LAYERS,
        layer_reduce: str = "sum",
        chunk_seconds: float = 30.0,
        batch_size: int = 4,
        device: str = "auto",
        dtype: str = "float32",
    ):
        # Check the folder before the slow imports, so a wrong path fails at once.
        self.model_dir = check_model_dir(model_dir, what="a HuBERT/wav2vec2 model", example=MODEL_EXAMPLE)
        # deferred: console start-up: torch and transformers, +1.5 s on expmae-features --help
        import torch
        from transformers import AutoFeatureExtractor, AutoModel

        if not (self.model_dir / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir}: no preprocessor_config.json (the audio feature extractor settings, "
                                    "e.g. whether to normalise the waveform); copy it from the model's hub page")
        if chunk_seconds <= 0 or batch_size < 1:
            raise ValueError(f"chunk_seconds={chunk_seconds}, batch_size={batch_size}; expected > 0 and >= 1")
        if layer_reduce not in LAYER_REDUCTIONS:
            raise ValueError(f"layer_reduce={layer_reduce!r}; expected one of {', '.join(LAYER_REDUCTIONS)}")
        self.layers, self.layer_reduce = parse_layers(layers), layer_reduce
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.processor = AutoFeatureExtractor.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
        self.model.to(self.device, self.dtype).eval()
        if not hasattr(self.model.config, "conv_kernel"):
            raise ValueError(f"{self.model_dir}: a {type(self.model).__name__}, not a HuBERT/wav2vec2-style speech model")
        check_layers(self.layers, self.model.config.num_hidden_layers + 1)
        self.sample_rate = int(getattr(self.processor, "sampling_rate", SAMPLE_RATE))
        self.chunk = int(round(chunk_seconds * self.sample_rate))
        self.batch_size = batch_size
        self.min_samples = _receptive_field(self.model.config)
        self._torch = torch

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        torch = self._torch
        if len(waveform) < self.min_samples:
            raise ValueError(f"audio is {len(waveform) / self.sample_rate:.3f} s long; the model needs at least "
                             f"{self.min_samples / self.sample_rate:.3f} s")
        values = self.processor(waveform, sampling_rate=self.sample_rate, return_tensors="np").input_values[0]
        pieces = [values[i : i + self.chunk] for i in range(0, len(values), self.chunk)]
        if len(pieces) > 1 and len(pieces[-1]) < self.sample_rate:  # a sub-second tail: give it its neighbour's context
            pieces[-2:] = [np.concatenate(pieces[-2:])]
        outputs = []
        with torch.inference_mode():
            start = 0
            while start < len(pieces):  # equal-length pieces share a batch: no padding, so no attention mask
                stop = start + 1
                while stop < len(pieces) and stop - start < self.batch_size and len(pieces[stop]) == len(pieces[start]):
                    stop += 1
                batch = torch.from_numpy(np.stack(pieces[start:stop])).to(self.device, self.dtype)
                hidden = self.model(batch, output_hidden_states=True).hidden_states
                feats = combine_layers(hidden, self.layers, self.layer_reduce).float().cpu().numpy()
                outputs.extend(feats)
                start = stop
        return np.concatenate(outputs, axis=0)


def extract_audio_features(
    videos: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    layers: str | Sequence[int] = DEFAULT_LAYERS,
    layer_reduce: str = "sum",
    pooling: str = "mean",
    chunk_seconds: float = 30.0,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "float32",
    limit: int | None = None,
    retry_failed: bool = False,
    shard: Shard = Shard(),
    prefetch: int = 2,
    progress: bool = True,
):
    """One ``<video stem>.npy`` per video in ``out_dir``: (D,) for ``pooling="mean"``, (N, D) for "none".
    A video without sound is recorded in failures.jsonl; the rest go on. Returns the job's JobSummary."""
    videos = list_inputs(videos)  # a bad INPUT fails before the model loads
    encoder = AudioEncoder(model_dir, layers=layers, layer_reduce=layer_reduce, chunk_seconds=chunk_seconds,
                           batch_size=batch_size, device=device, dtype=dtype)
    sample_rate = encoder.sample_rate

    def encode(waveform: np.ndarray):
        return encoder(waveform), {"seconds": round(len(waveform) / sample_rate, 3)}

    settings = {"modality": "audio", "model": encoder.model_dir.name, "model_config": model_fingerprint(encoder.model_dir),
                "layers": list(encoder.layers), "layer_reduce": layer_reduce, "sample_rate": sample_rate,
                "chunk_seconds": chunk_seconds, "dtype": dtype}
    return run_extraction(videos, out_dir, load=lambda p: load_audio(p, sample_rate), encode=encode,
                          pooling=pooling, settings=settings, limit=limit, retry_failed=retry_failed, shard=shard,
                          prefetch=prefetch, desc="audio features", progress=progress)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)),
                        help="hidden states to combine, e.g. -1 (MER2023 baseline, default) or -4,-3,-2,-1")
    parser.add_argument("--layer-reduce", choices=LAYER_REDUCTIONS, default="sum", help="how to combine several layers")
    parser.add_argument("--chunk-seconds", type=float, default=30.0, help="longer audio runs in pieces this long")
    parser.add_argument("--batch-size", type=int, default=4, help="pieces of one long recording per forward pass")


def run_cli(args: argparse.Namespace, out_root: Path):
    out_dir = out_root / (args.name or feature_dir_name(args.model, args.pooling, parse_layers(args.layers)))
    summary = extract_audio_features(args.input, out_dir, args.model, layers=args.layers, layer_reduce=args.layer_reduce,
                                     pooling=args.pooling, chunk_seconds=args.chunk_seconds, batch_size=args.batch_size,
                                     device=args.device, dtype=args.dtype, limit=args.limit,
                                     retry_failed=args.retry_failed, shard=args.shard, prefetch=args.prefetch, progress=not args.no_progress)
    return out_dir, summary
