"""expMAE video / frame features: window and frame sampling against hand-computed indices, values against the
encoder (clips) and the exported timm model (frames), folder jobs (one file per video, resume, failures,
determinism), the notebook API, the CLI, on-the-fly face cropping, and real face crops when available.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import moving_pattern, write_video

from expmae.export import create_timm_model, load_encoder, save_encoder
from expmae.features.visual import VisualFeatureExtractor, clip_windows, extract, extract_visual_features
from expmae.model import create_model

# 32 px, patch 8, 4 frames, tubelet 2, width 48: features are 48-d. Pretraining recorded sample_stride=2.
# Non-ImageNet mean / std, so the test sees that the encoder's own normalisation is used.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
TINY = dict(img_size=32, num_frames=4, patch_size=8, embed_dim=48, depth=2, num_heads=3, mean=MEAN, std=STD)
D = 48


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("tiny", **TINY)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1 / 0: perturb so every weight matters
            p.add_(torch.randn_like(p) * 0.05)
    return save_encoder(model, tmp_path_factory.mktemp("enc") / "expmae-tiny", sample_stride=2, model_name="tiny")


def normalise(frames_uint8: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> normalised with the encoder's MEAN / STD, channels moved to dim -3 (by hand)."""
    x = torch.from_numpy(frames_uint8).float() / 255.0
    x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    return x.movedim(-1, -3)


# ---------------------------------------------------------------------------------- sampling
def test_clip_windows_hand_computed():
    # 4 frames 2 apart span 7 frames; back to back means starts 8 apart: 0, 8, 16 fit in 23 frames
    assert clip_windows(23, 4, 2).tolist() == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18, 20, 22]]
    assert clip_windows(22, 4, 2).tolist() == [[0, 2, 4, 6], [8, 10, 12, 14]]
    assert clip_windows(23, 4, 2, clip_stride=5).tolist() == [[0, 2, 4, 6], [5, 7, 9, 11], [10, 12, 14, 16],
                                                              [15, 17, 19, 21]]
    assert clip_windows(40, 4, 1, clip_stride=1, max_clips=3).tolist() == [[0, 1, 2, 3], [18, 19, 20, 21],
                                                                           [36, 37, 38, 39]]
    assert clip_windows(3, 4, 2).tolist() == [[0, 2, 2, 2]]  # shorter than one window: hold the last frame
    with pytest.raises(ValueError, match="positive"):
        clip_windows(10, 4, 0)


# ---------------------------------------------------------------------------------- values
@pytest.fixture
def npy_clips(tmp_path):
    """An expmae-crop output folder with .npy face clips: 23 frames (3 clips) and 3 frames (1 padded clip)."""
    rng = np.random.default_rng(0)
    clips = {"long": rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8),
             "short": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)}
    (tmp_path / "crops" / "clips").mkdir(parents=True)
    for name, clip in clips.items():
        np.save(tmp_path / "crops" / "clips" / f"{name}.npy", clip)
    return tmp_path / "crops", clips


def test_video_features_are_the_encoder_on_the_documented_windows(encoder_dir, npy_clips, tmp_path):
    crops, clips = npy_clips
    summary = extract_visual_features(crops, tmp_path / "fra", encoder_dir, modality="video", pooling="none",
                                      progress=False)
    assert (summary.done, summary.failed) == (2, 0)
    encoder = load_encoder(encoder_dir)
    windows = {"long": [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18, 20, 22]], "short": [[0, 2, 2, 2]]}
    for name, idx in windows.items():
        x = normalise(clips[name][np.array(idx)]).transpose(1, 2)  # (N, 3, T, H, W)
        with torch.no_grad():
            expected = encoder.forward_clips(x).mean(dim=1).numpy()
        got = np.load(tmp_path / "fra" / f"{name}.npy")
        assert got.shape == (len(idx), D) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # utterance level is the mean over clips
    extract_visual_features(crops, tmp_path / "utt", encoder_dir, modality="video", progress=False)
    utt = np.load(tmp_path / "utt" / "long.npy")
    assert utt.shape == (D,)
    np.testing.assert_allclose(utt, np.load(tmp_path / "fra" / "long.npy").mean(0), atol=1e-6)


def test_frame_features_are_the_exported_timm_model(encoder_dir, npy_clips, tmp_path):
    crops, clips = npy_clips
    extract_visual_features(crops, tmp_path / "fra", encoder_dir, modality="frame", num_frames=5, pooling="none",
                            progress=False)
    timm_model = create_timm_model(encoder_dir)
    for name, idx in {"long": [0, 6, 11, 16, 22], "short": [0, 1, 2]}.items():  # evenly spaced, ends included
        got = np.load(tmp_path / "fra" / f"{name}.npy")
        with torch.no_grad():
            expected = timm_model(normalise(clips[name][idx])).numpy()
        assert got.shape == (len(idx), D)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_features_of_a_class_token_encoder_pool_the_patch_tokens(npy_clips, tmp_path):
    """class_token=True: frame features are still the exported timm model's forward() (global_pool="avg" over the
    patch tokens), video features the mean of the tubelet tokens; the class token is left out of both."""
    torch.manual_seed(0)
    model = create_model("tiny", **TINY, class_token=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = save_encoder(model, tmp_path / "enc-cls", sample_stride=2)
    crops, clips = npy_clips
    extract_visual_features(crops, tmp_path / "frame", folder, modality="frame", num_frames=3, pooling="none",
                            progress=False)
    with torch.no_grad():
        expected = create_timm_model(folder)(normalise(clips["short"])).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "frame" / "short.npy"), expected, atol=1e-5, rtol=0)
    extract_visual_features(crops, tmp_path / "video", folder, modality="video", pooling="none", progress=False)
    x = normalise(clips["short"][np.array([[0, 2, 2, 2]])]).transpose(1, 2)
    with torch.no_grad():
        tokens = load_encoder(folder).forward_clips(x)
    got = np.load(tmp_path / "video" / "short.npy")
    np.testing.assert_allclose(got, tokens[:, 1:].mean(dim=1).numpy(), atol=1e-5, rtol=0)
    assert np.abs(got - tokens.mean(dim=1).numpy()).max() > 1e-3  # the class token is not in it


def test_notebook_api_matches_the_folder_job(encoder_dir, npy_clips, tmp_path):
    import expmae.features

    crops, clips = npy_clips
    extract_visual_features(crops, tmp_path / "fra", encoder_dir, modality="video", pooling="none", progress=False)
    expected = np.load(tmp_path / "fra" / "long.npy")
    np.testing.assert_allclose(expmae.features.extract(crops / "clips" / "long.npy", encoder_dir, pooling="none"),
                               expected, atol=1e-6)
    encoder = load_encoder(encoder_dir)  # a loaded encoder works too; frames as an array or a uint8 tensor
    np.testing.assert_allclose(extract(clips["long"], encoder, pooling="none", sample_stride=2), expected, atol=1e-6)
    utt = extract(torch.from_numpy(clips["long"]), encoder, sample_stride=2)
    np.testing.assert_allclose(utt, expected.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match=r"expected uint8 \(T, H, W, 3\)"):
        extract(clips["long"].astype(np.float32), encoder)
    with pytest.raises(ValueError, match="num_frames=6: expected a multiple of tubelet_size=2 and at most"):
        extract(clips["long"], encoder, num_frames=6)


# ---------------------------------------------------------------------------------- folder jobs on videos
@pytest.fixture
def video_folder(tmp_path):
    root = tmp_path / "videos"
    write_video(root / "a.mp4", moving_pattern(num_frames=24, size=64, seed=1))
    write_video(root / "b.mp4", moving_pattern(num_frames=10, size=64, seed=2))
    (root / "broken.mp4").write_bytes(b"\x00\x01not a video" * 50)
    return root


def test_video_folder_one_file_per_video_resume_failures_determinism(encoder_dir, video_folder, tmp_path):
    out = tmp_path / "features"
    summary = extract_visual_features(video_folder, out, encoder_dir, pooling="none", progress=False)
    assert (summary.total, summary.done, summary.failed) == (3, 2, 1)
    assert sorted(p.name for p in out.glob("*.npy")) == ["a.npy", "b.npy"]
    assert np.load(out / "a.npy").shape == (3, D)  # 24 frames: windows at 0, 8, 16 (64 px resized to 32)
    assert np.load(out / "b.npy").shape == (1, D)  # 10 frames: one window
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["key"] for f in failures] == ["broken"] and "\n" not in failures[0]["reason"]
    records = {json.loads(line)["key"]: json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()}
    assert records["a"]["clips"] == 3 and records["a"]["source_frames"] == 24 and records["a"]["size"] == [64, 64]

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    again = extract_visual_features(video_folder, out, encoder_dir, pooling="none", progress=False)
    assert (again.done, again.skipped, again.failed) == (0, 2, 1)  # resumed: nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")} == before

    other = tmp_path / "features2"
    extract_visual_features(video_folder, other, encoder_dir, pooling="none", progress=False, prefetch=0)
    for name in ("a.npy", "b.npy"):
        assert np.array_equal(np.load(out / name), np.load(other / name))  # deterministic

    with pytest.raises(ValueError, match="sample_stride=2, not 3"):  # one folder never mixes settings
        extract_visual_features(video_folder, out, encoder_dir, pooling="none", sample_stride=3, progress=False)
    # nor encoders: a retrained encoder exported to the same place (same config, new weights) is refused, not
    # silently resumed on the old one's features
    import shutil

    retrained = tmp_path / encoder_dir.name
    shutil.copytree(encoder_dir, retrained)
    extract_visual_features(video_folder, out, retrained, pooling="none", progress=False)  # a copy: still the same
    model = create_model("tiny", **TINY)
    save_encoder(model, retrained, sample_stride=2, model_name="tiny", overwrite=True)
    shutil.copy(encoder_dir / "config.json", retrained / "config.json")  # as a re-export of the same run writes it
    with pytest.raises(ValueError, match="made with encoder_weights="):
        extract_visual_features(video_folder, out, retrained, pooling="none", progress=False)


def test_cli_video_and_frame(encoder_dir, video_folder, tmp_path, capsys):
    from expmae.features.cli import main

    out = tmp_path / "features"
    assert main(["frame", str(video_folder), str(out), "--model", str(encoder_dir), "--num-frames", "4",
                 "--pooling", "none", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["done"] == 2 and printed["failed"] == 1
    assert printed["out_dir"] == str(out / "expmae-tiny-frame-FRA")
    assert np.load(out / "expmae-tiny-frame-FRA" / "a.npy").shape == (4, D)
    assert main(["video", str(video_folder), str(out), "--model", str(encoder_dir), "--no-progress"]) == 0
    assert np.load(out / "expmae-tiny-video-UTT" / "b.npy").shape == (D,)
    capsys.readouterr()
    assert main(["video", str(video_folder), str(out), "--model", str(tmp_path / "no-encoder")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an expmae encoder folder" in err[0]


# ---------------------------------------------------------------------------------- raw videos, real faces
def test_raw_videos_are_face_cropped_on_the_fly(encoder_dir, tmp_path):
    from expmae.synthetic import make_face_videos, make_noface_video

    raw = tmp_path / "raw"
    make_face_videos(raw, n=1, num_frames=16, size=128)
    make_noface_video(raw / "noface.mp4", num_frames=16, size=128)
    out = tmp_path / "features"
    summary = extract_visual_features(raw, out, encoder_dir, modality="frame", num_frames=4, pooling="none",
                                      crop=True, progress=False)
    assert (summary.done, summary.failed) == (1, 1)
    (face,) = [p for p in out.glob("*.npy")]
    assert np.load(face).shape == (4, D)
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert record["crop"]["detection_rate"] > 0.5
    reason = json.loads((out / "failures.jsonl").read_text().splitlines()[0])["reason"]
    assert reason.startswith("NoFaceError")


def test_real_face_crops(encoder_dir, shared_data):
    crops = sorted((shared_data / "marlin").glob("cropped*.mp4"))
    if not crops:
        pytest.skip(f"no marlin face crops in {shared_data}")
    encoder = load_encoder(encoder_dir)
    for path in crops[:2]:
        frames = extract(path, encoder, modality="frame", num_frames=3, pooling="none")
        clips = extract(path, encoder, modality="video", max_clips=2, pooling="none")
        assert frames.shape == (3, D) and clips.shape[1] == D and 1 <= clips.shape[0] <= 2
        assert np.isfinite(frames).all() and np.isfinite(clips).all()
        assert not np.allclose(frames[0], frames[-1])  # different frames of a real face video differ


def test_extractor_settings_record_the_encoder(encoder_dir):
    extractor = VisualFeatureExtractor(encoder_dir, modality="video")
    assert extractor.num_frames == 4 and extractor.sample_stride == 2  # the encoder's T and recorded stride
    settings = extractor.settings
    assert settings["encoder"] == "expmae-tiny" and len(settings["encoder_config"]) == 16
    assert VisualFeatureExtractor(encoder_dir, modality="frame").num_frames == 16
    with pytest.raises(ValueError, match="modality='audio'"):
        VisualFeatureExtractor(encoder_dir, modality="audio")


# ---------------------------------------------------------------------------------- depths and read-outs
def by_hand_states(encoder, x: torch.Tensor) -> list[torch.Tensor]:
    """Every hidden state of a clip batch, by hand: embeddings (+ class token), then block after block; each
    through the final norm. (B, P + N, D) each."""
    h = encoder.embed_clips(x)
    if encoder.cls_token is not None:
        h = torch.cat([encoder.cls_token.expand(len(h), -1, -1), h], dim=1)
    states = [h]
    for block in encoder.blocks:
        states.append(block(states[-1]))
    return [encoder.norm(s) for s in states]


def old_encode(extractor, loaded) -> np.ndarray:
    """encode() as it was before read-outs existed (forward_clips / forward_frames, mean of the patch tokens)."""
    from expmae.data import normalize_clips

    windows, out = torch.from_numpy(loaded["windows"]), []
    with torch.inference_mode():
        for start in range(0, len(windows), extractor.batch_size):
            x = loaded["pixels"][:, windows[start : start + extractor.batch_size]].permute(1, 0, 2, 3, 4)
            x = normalize_clips(x, dtype=torch.float32, mean=MEAN, std=STD)
            enc = extractor.encoder
            tokens = enc.forward_clips(x) if extractor.modality == "video" else enc.forward_frames(x[:, :, 0])
            out.append(tokens[:, enc.num_prefix_tokens:].float().mean(dim=1).numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("modality", ["video", "frame"])
def test_encode_is_the_last_state_mean_readout_bit_for_bit(encoder_dir, npy_clips, modality):
    _, clips = npy_clips
    extractor = VisualFeatureExtractor(encoder_dir, modality=modality, batch_size=2,
                                       num_frames=None if modality == "video" else 5)
    loaded = extractor.load(clips["long"])
    expected = old_encode(extractor, loaded)
    got, info = extractor.encode(loaded)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)  # exactly today's features: one code path, same arithmetic
    readouts = extractor.encode_readouts(loaded, layers=(-1, 0), readouts=("mean",))
    assert sorted(readouts) == ["L0/mean", "L2/mean"]  # keys name the non-negative index
    np.testing.assert_array_equal(readouts["L2/mean"], expected)


def test_readouts_of_every_depth_against_hand_computed_states(npy_clips):
    """A class-token encoder, 8 frames = 4 time steps (tubelet 2) of 4 x 4 patches: mean, per-position (mean over
    the time steps of the tokens at one patch position, tokens in (t, y, x) order) and all tokens, at depths 0-2."""
    torch.manual_seed(1)
    model = create_model("tiny", **{**TINY, "num_frames": 8}, class_token=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    extractor = VisualFeatureExtractor(model.encoder, modality="video", sample_stride=1, batch_size=2)
    _, clips = npy_clips
    loaded = extractor.load(clips["long"])
    got = extractor.encode_readouts(loaded, layers=(0, 1, -1), readouts=("mean", "position", "tokens"))
    assert sorted(got) == sorted(f"L{i}/{r}" for i in (0, 1, 2) for r in ("mean", "position", "tokens"))
    x = normalise(clips["long"][clip_windows(23, 8, 1)]).transpose(1, 2)  # (N, 3, T, H, W)
    with torch.no_grad():
        states = by_hand_states(model.encoder, x)
    S, N = 16, len(x)  # 32 px / patch 8 = 4 x 4 positions; 2 windows of 8 frames (stride 1) in 23 frames, batch 2
    for i, state in enumerate(states):
        tokens = state[:, 1:].numpy()  # (N, 4 * 16, D), class token left out
        assert got[f"L{i}/tokens"].shape == (N, 4 * S, D)
        np.testing.assert_allclose(got[f"L{i}/tokens"], tokens, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got[f"L{i}/mean"], tokens.mean(1), atol=1e-5, rtol=0)
        # (N, S*D): position s at time t is token t * S + s
        position = np.concatenate([np.mean([tokens[:, t * S + s] for t in range(4)], 0) for s in range(S)], 1)
        np.testing.assert_allclose(got[f"L{i}/position"], position, atol=1e-5, rtol=0)
    assert not np.allclose(got["L0/mean"], got["L2/mean"], atol=1e-3)  # the depths do differ
    # frames: one time step, so the per-position read-out is the tokens, flattened
    frames = VisualFeatureExtractor(model.encoder, modality="frame", num_frames=3)
    out = frames.encode_readouts(frames.load(clips["short"]), layers=(1,), readouts=("position", "tokens"))
    assert out["L1/position"].shape == (3, S * D)
    np.testing.assert_array_equal(out["L1/position"], out["L1/tokens"].reshape(3, -1))
    with pytest.raises(ValueError, match="index 3 out of range"):
        extractor.encode_readouts(loaded, layers=(3,))
    with pytest.raises(ValueError, match="readouts \\['cls'\\]"):
        extractor.encode_readouts(loaded, readouts=("cls",))


def test_every_block_scored_in_one_call_equals_each_block_on_its_own(encoder_dir, single_thread):
    """encode_readouts of all depths in one pass -> pool_readouts per video (as expmae-features pools) ->
    probe_readouts: a result per depth and read-out, each equal to probing that depth's features extracted alone."""
    from expmae.features.visual import pool_readouts
    from expmae.probe import knn_probe, linear_probe, probe_readouts, stack_tokens

    rng = np.random.default_rng(4)
    videos = [rng.integers(0, 256, (int(rng.integers(4, 20)), 32, 32, 3), dtype=np.uint8) for _ in range(16)]
    labels = np.arange(16) % 2
    extractor = VisualFeatureExtractor(encoder_dir, modality="video", sample_stride=1)
    per_video = [pool_readouts(extractor.encode_readouts(extractor.load(v), layers=(0, 1, 2),
                                                         readouts=("mean", "position", "tokens"))) for v in videos]
    assert per_video[0]["L2/mean"].shape == (D,) and per_video[0]["L2/position"].shape == (16 * D,)
    windows = [len(clip_windows(len(v), 4, 1, max_clips=0)) for v in videos]
    assert [p["L1/tokens"].shape for p in per_video] == [(w * 2 * 16, D) for w in windows]  # windows x T' x S
    feats = {k: (stack_tokens if k.endswith("tokens") else np.stack)([p[k] for p in per_video]) for k in per_video[0]}
    train, test = {k: v[:10] for k, v in feats.items()}, {k: v[10:] for k, v in feats.items()}
    scores = probe_readouts(train, labels[:10], test, labels[10:], knn_k=3, attentive={"epochs": 2})
    assert sorted(scores) == sorted(f"L{i}/{r}" for i in range(3) for r in ("mean", "position", "tokens"))
    for i in range(3):  # the same numbers as one depth at a time, through the extractor's single-layer path
        alone = VisualFeatureExtractor(encoder_dir, modality="video", sample_stride=1, layers=(i,))
        x = np.stack([alone(v).mean(0) for v in videos])
        assert scores[f"L{i}/mean"]["knn"] == knn_probe(x[:10], labels[:10], x[10:], labels[10:], k=3)
        assert scores[f"L{i}/mean"]["linear"] == linear_probe(x[:10], labels[:10], x[10:], labels[10:])
    np.testing.assert_array_equal(feats["L2/mean"], np.stack([extractor(v).mean(0) for v in videos]))


def test_cli_layers_and_readout_name_record_and_guard_the_folder(encoder_dir, video_folder, tmp_path, capsys):
    from expmae.features.cli import main

    out = tmp_path / "features"
    assert main(["video", str(video_folder), str(out), "--model", str(encoder_dir), "--no-progress"]) == 0
    assert "layers" not in json.loads((out / "expmae-tiny-video-UTT" / "extractor.json").read_text())  # as before
    assert main(["video", str(video_folder), str(out), "--model", str(encoder_dir), "--no-progress",
                 "--layers", "1", "--readout", "position"]) == 0
    folder = out / "expmae-tiny-video-L1-position-UTT"
    assert np.load(folder / "a.npy").shape == (16 * D,)  # (S*D,): 4 x 4 positions
    settings = json.loads((folder / "extractor.json").read_text())
    assert settings["layers"] == [1] and settings["readout"] == "position"
    extractor = VisualFeatureExtractor(encoder_dir)
    loaded = extractor.load(video_folder / "a.mp4")
    feats = extractor.encode_readouts(loaded, layers=(1, 2), readouts=("position", "mean"))
    np.testing.assert_allclose(np.load(folder / "a.npy"), feats["L1/position"].mean(0), atol=1e-6)
    # several layers: summed, as the audio / text extractors do
    assert main(["video", str(video_folder), str(out), "--model", str(encoder_dir), "--no-progress",
                 "--layers", "1,-1", "--name", "two"]) == 0
    np.testing.assert_allclose(np.load(out / "two" / "a.npy"), (feats["L1/mean"] + feats["L2/mean"]).mean(0), atol=1e-5)
    capsys.readouterr()
    assert main(["video", str(video_folder), str(out), "--model", str(encoder_dir), "--no-progress",
                 "--layers", "0,-1", "--name", "two"]) == 2  # another setting into the same folder: refused
    err = capsys.readouterr().err
    assert "made with layers=[1, 2], not [0, 2]" in err
