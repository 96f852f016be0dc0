"""Shared fixtures: tiny synthetic videos (PyAV mpeg4, readable by decord) and the real sample media.

No test may need the network. Real media lives outside the repository in ../shared/data and is
read-only; tests that need it skip with a clear reason when it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Two cores on CI: keep intra-op threads modest so parallel DataLoader workers don't thrash.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO_ROOT = Path(__file__).resolve().parents[1]

# The tests' tiny models (create_model("tiny", **TINY)); each file picks the geometry its checks need.
# 32 px, patch 8 (16 patches), 4 frames, tubelet 2, width 48, 2 blocks, one-block decoders: pretraining and export.
TINY = dict(img_size=32, num_frames=4, patch_size=8, embed_dim=48, depth=2, num_heads=3, mae_decoder_embed_dim=32,
            mae_decoder_depth=1, mae_decoder_num_heads=2, video_decoder_embed_dim=32, video_decoder_depth=1,
            video_decoder_num_heads=2)
# as TINY, 64 wide with 4 heads and a two-block clip decoder: the model's own tests (32 tubelets)
TINY_MODEL = dict(TINY, embed_dim=64, num_heads=4, mae_decoder_num_heads=4, video_decoder_depth=2,
                  video_decoder_num_heads=4)
# 64 px, patch 16 (4 x 4 patches), one block: reconstruction pictures large enough to see
TINY_PICTURES = dict(TINY, img_size=64, patch_size=16, depth=1, embed_dim=64, num_heads=2)
SHARED_DATA = Path(os.environ.get("EXPMAE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def write_video(path, frames: np.ndarray, fps: int = 25) -> Path:
    """Write uint8 frames (T, H, W, 3) as an mpeg4 video (the codec PyAV's wheel ships)."""
    # decord 0.6.0 returns a mis-strided buffer (4 or 6 "channels") for some widths (16, 48, 72 seen);
    # 32, 64, 96, 112, 128, 224 read back fine. Tests use those.
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless, so decoded values stay close to written ones
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_checkpoint(run_dir, model, *, file: str = "weights.safetensors", prefix: str = "", step: int = 7) -> Path:
    """``run_dir/checkpoints/step_<step>/`` as pretrain/train.py leaves it as far as the model goes: ``file``
    (weights.safetensors, or accelerate's model.safetensors / pytorch_model.bin; ``prefix`` e.g. DDP's
    'module.'), model_config.json and train_state.json. No optimizer state or DeepSpeed shards."""
    import json

    ckpt = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    ckpt.mkdir(parents=True)
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    if file.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(ckpt / file))
    else:
        torch.save(state, ckpt / file)
    (ckpt / "model_config.json").write_text(json.dumps(model.cfg.to_dict()))
    (ckpt / "train_state.json").write_text(json.dumps({"step": step}))
    return ckpt


def moving_pattern(num_frames: int = 24, size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth, moving colour pattern (T, H, W, 3) uint8: compressible and different per frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * np.pi, size=3)
    frames = []
    for t in range(num_frames):
        chans = [np.sin(2 * np.pi * (xx * (c + 1) + yy * (2 - c)) + phase[c] + 0.3 * t) for c in range(3)]
        frames.append(((np.stack(chans, -1) + 1) * 127.5).astype(np.uint8))
    return np.stack(frames)


def write_moving_clips(root: Path, n: int = 12) -> Path:
    """``n`` moving-pattern mp4 clips (24 frames, 64 px) in ``root``: the launched pretraining tests' data."""
    for i in range(n):
        write_video(root / f"clip_{i:02d}.mp4", moving_pattern(num_frames=24, size=64, seed=i))
    return root


@pytest.fixture
def make_video(tmp_path):
    """Factory: make_video(name, num_frames=24, size=64, fps=25, seed=0) -> Path of a synthetic mp4."""

    def _make(name: str = "clip.mp4", num_frames: int = 24, size: int = 64, fps: int = 25, seed: int = 0) -> Path:
        return write_video(tmp_path / name, moving_pattern(num_frames, size, seed), fps=fps)

    return _make


@pytest.fixture
def single_thread():
    """Pin torch to one thread for the test: tiny models and heads train several times faster on one thread
    than on two contended ones (a loaded 2-core CI box). Restores the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    """The real sample media folder (../shared/data); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample media not found at {SHARED_DATA} (set EXPMAE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def load_tool():
    """load_tool("bench_pretrain") -> tools/bench_pretrain.py as a module (tools/ is not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def key_token_set(n, rng, tokens=32, dim=16, classes=4):
    """Each sample: `tokens` tokens of loud label-free noise, one of them (at a random place) the key: it carries
    its class's prototype (plus a little noise) and a flag in the last dimension. Averaged, the key's content is
    drowned (1/K of the mean, under noise of std 3/sqrt(K)); attention can find the flag and read the key. The
    oracle of the attentive probe and head: x float32 (n, tokens, dim), y (n,)."""
    protos = np.random.default_rng(123).normal(size=(classes, dim - 1))
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, tokens, dim)) * 3.0
    x[:, :, -1] = 0.0
    where = rng.integers(0, tokens, n)
    x[np.arange(n), where, :-1] = protos[y] + rng.normal(size=(n, dim - 1)) * 0.3
    x[np.arange(n), where, -1] = 5.0
    return x.astype(np.float32), y
