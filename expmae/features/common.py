"""What every feature extractor shares: inputs, devices, layer choice, pooling, and the resumable .npy job.

Output layout (the fusion stage, ``expmae.mer``, reads it unchanged): one folder per extractor, holding one
``<sample>.npy`` per sample (float32, (D,) when mean-pooled, (N, D) at frame level), plus the job's
``manifest.jsonl`` / ``failures.jsonl`` (see ``expmae.jobs``) and ``extractor.json`` (the settings that made
the folder, so a resumed run can never mix two settings in one folder).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from expmae.files import create_exclusive, save_npy_atomic
from expmae.jobs import JobSummary, Prefetcher, run_jobs
from expmae.shards import Shard, read_manifest
from expmae.runlock import FolderLock
from expmae.video import VIDEO_EXTENSIONS, list_videos

POOLINGS = ("mean", "none")
LAYER_REDUCTIONS = ("sum", "mean")
SETTINGS_FILE = "extractor.json"


# ----------------------------------------------------------------------------------------------- inputs
def list_inputs(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The samples named by ``source``, each keyed by its file stem:

    - an ``expmae-crop`` output folder (it has ``clips/``): its face clips, .mp4 or .npy;
    - any other folder: its videos, searched recursively (``expmae.video.list_videos``);
    - a .txt file, one path per line (relative to the list; ``#`` starts a comment), or a single video;
    - an iterable of paths.
    """
    if not isinstance(source, (str, os.PathLike)):
        return [Path(p) for p in source]
    source = Path(source)
    if source.is_dir():
        clips = source / "clips"
        if clips.is_dir():
            files = sorted(p for p in clips.rglob("*") if p.suffix.lower() in (*VIDEO_EXTENSIONS, ".npy") and not p.name.startswith("."))
        else:
            files = list_videos(source)
        if not files:
            raise FileNotFoundError(f"{source}: no videos ({', '.join(VIDEO_EXTENSIONS)}) in this folder")
        return files
    if source.is_file() and source.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in source.read_text(encoding="utf-8").splitlines()]
        return [p if p.is_absolute() else source.parent / p for p in map(Path, lines) if str(p) not in ("", ".") and not str(p).startswith("#")]
    if source.is_file() and source.suffix.lower() in VIDEO_EXTENSIONS:
        return [source]
    raise FileNotFoundError(f"{source}: not a folder of videos, a .txt list of paths, or a video file")


# ----------------------------------------------------------------------------------------------- models
def resolve_device(device: str | None = "auto"):
    """"auto" -> a GPU when there is one, else the CPU. "auto" and "cuda" (no index) mean this process's own GPU
    under a launcher (``LOCAL_RANK`` of accelerate launch / torchrun), so 8 launched processes use 8 GPUs."""
    import torch  # deferred: console start-up: torch, +1.5 s on expmae-crop --help and expmae-features --help

    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(device)


def resolve_dtype(name: str):
    import torch  # deferred: console start-up: torch, +1.5 s on expmae-crop --help and expmae-features --help

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r}; expected one of {', '.join(dtypes)}")
    return dtypes[name]


def check_model_dir(path: str | os.PathLike, *, what: str, example: str) -> Path:
    """A local Hugging Face model folder, or a one-line error saying where to get one (we never download)."""
    path = Path(path).expanduser()
    how = (f"download {what} on a machine with network access (e.g. `huggingface-cli download {example} "
           f"--local-dir {path}`) and copy the folder here; this tool never downloads")
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} not found: {how}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json (not a Hugging Face model folder): {how}")
    return path


def model_fingerprint(model: Path) -> str:
    """A short hash of the model's config (``config.json`` in a model folder, or the config file given): the same
    model still matches after its folder moves."""
    path = Path(model)
    return hashlib.sha256((path / "config.json" if path.is_dir() else path).read_bytes()).hexdigest()[:16]


def weights_fingerprint(model_dir: Path) -> str:
    """A short hash of the ``*.safetensors`` files of a model folder: a retrained model exported to the same folder
    (same config, new weights) no longer matches features made with the old one."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- layers / pooling
def parse_layers(spec: str | int | Sequence[int]) -> tuple[int, ...]:
    """``"-4,-3,-2,-1"`` -> (-4, -3, -2, -1). Indices are into ``hidden_states`` (0 = embeddings, -1 = last)."""
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, str):
        try:
            layers = tuple(int(s) for s in spec.replace(" ", "").split(",") if s)
        except ValueError:
            raise ValueError(f"layers {spec!r}; expected comma-separated integers such as '-4,-3,-2,-1'") from None
    else:
        layers = tuple(int(s) for s in spec)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers {spec!r}; expected one or more distinct hidden-state indices")
    return layers


def check_layers(layers: Sequence[int], num_hidden_states: int) -> None:
    """Every index must exist: a model with L layers has L + 1 hidden states (0 = the embeddings)."""
    n = num_hidden_states
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(f"layers {list(layers)}: index {bad[0]} out of range for a model with {n} hidden states (0..{n - 1} or -{n}..-1)")


def combine_layers(hidden_states: Sequence, layers: Sequence[int], reduce: str = "sum"):
    """Sum (the MER2023 baseline) or mean of the chosen hidden states, each (B, T, D) -> (B, T, D)."""
    import torch  # deferred: console start-up: torch, +1.5 s on expmae-crop --help and expmae-features --help

    check_layers(layers, len(hidden_states))
    if reduce not in LAYER_REDUCTIONS:
        raise ValueError(f"layer reduction {reduce!r}; expected one of {', '.join(LAYER_REDUCTIONS)}")
    stacked = torch.stack([hidden_states[i] for i in layers])
    return stacked.sum(0) if reduce == "sum" else stacked.mean(0)


def pool(frames: np.ndarray, pooling: str) -> np.ndarray:
    """(N, D) -> (D,) for "mean", unchanged for "none"; always float32."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 2 or frames.shape[0] == 0:
        raise ValueError(f"features of shape {frames.shape}; expected (N, D) with N >= 1")
    return frames.mean(axis=0) if pooling == "mean" else frames


def feature_dir_name(model_dir: str | os.PathLike, pooling: str, layers: Sequence[int] | None = None) -> str:
    """The MER2023 baseline's folder naming: ``chinese-hubert-large-UTT``, ``chinese-macbert-large-4-UTT``
    (``-4``: four layers combined), ``-FRA`` for frame level."""
    name = Path(model_dir).expanduser().resolve().name
    if layers is not None and len(layers) > 1:
        name += f"-{len(layers)}"
    return f"{name}-{'UTT' if pooling == 'mean' else 'FRA'}"


# ----------------------------------------------------------------------------------------------- the job
def check_settings(out_dir: str | os.PathLike, settings: dict) -> None:
    """Record ``settings`` in ``out_dir/extractor.json``, or refuse to add to a folder made with other settings.

    Several processes may start on one folder at once: the file is created exclusively (a hard link of a complete
    temporary file, atomic on local and network filesystems), so the first one's settings are the folder's and
    every other process compares its own with them before it writes anything."""
    path = Path(out_dir) / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # tuples -> lists, so a reread compares equal
    if not path.is_file():  # another process may have been first: compare with its settings below
        create_exclusive(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    old = json.loads(path.read_text(encoding="utf-8"))
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        k = diff[0]
        raise ValueError(f"{path}: this folder was made with {k}={old.get(k)!r}, not {settings.get(k)!r}; "
                         "write to another folder (--name) or delete this one")


def run_extraction(
    items: Sequence,
    out_dir: str | os.PathLike,
    *,
    load: Callable[[Any], Any],
    encode: Callable[[Any], tuple[np.ndarray, dict]],
    pooling: str,
    settings: dict,
    key: Callable[[Any], str] = lambda item: Path(item).stem,
    limit: int | None = None,
    retry_failed: bool = False,
    prefetch: int = 2,
    desc: str = "features",
    progress: bool = True,
    shard: Shard = Shard(),
) -> JobSummary:
    """Per input: ``load`` (CPU, prefetched in threads) -> ``encode`` -> (N, D) + info -> pool -> ``<key>.npy``.

    Resumable, atomic and failure-recording through :func:`expmae.jobs.run_jobs`; a failing input becomes a
    line in ``failures.jsonl`` and the job goes on. The model runs in this process (``workers=0``): it is
    loaded once, on the GPU when there is one. ``shard``: this process's share of ``items`` (``expmae.shards``);
    every process checks the folder's settings (model and weights hashes included) before it writes anything.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    out_dir = Path(out_dir)
    # A lone process owns the folder (one writer, expmae.runlock); the processes of a sharded run write disjoint
    # shard logs and clean the temporary files of their own share only, so they share it (docs/cluster.md).
    with FolderLock(out_dir, what="feature folder") if shard.count == 1 else contextlib.nullcontext():
        out_dir.mkdir(parents=True, exist_ok=True)
        check_settings(out_dir, {**settings, "pooling": pooling})
        skip = {r["key"] for r in read_manifest(out_dir)}
        if not retry_failed:
            skip |= {r["key"] for r in read_manifest(out_dir, "failures")}
        loader = Prefetcher([it for it in items if shard.owns(key(it))], load, key, skip, prefetch)

        def work(item) -> dict:
            frames, info = encode(loader(item))
            feature = pool(frames, pooling)
            if not np.isfinite(feature).all():
                raise ValueError(f"{item}: the model produced NaN or inf (try --dtype float32)")
            save_npy_atomic(out_dir / f"{key(item)}.npy", feature)
            return {"shape": list(feature.shape), "frames": int(np.shape(frames)[0]), **info}

        try:
            return run_jobs(items, work, out_dir, key=key, workers=0, limit=limit, retry_failed=retry_failed,
                            desc=desc, progress=progress, shard=shard, output_of=lambda k: out_dir / f"{k}.npy")
        finally:
            loader.close()
