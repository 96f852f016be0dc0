"""Audio / lexical / cross-modal feature extraction (expmae.features.{audio,text,clip}, expmae-features).

Tiny random-weight HuBERT, BERT and CLIP models are built from configs and saved, with a feature extractor,
tokenizer and image processor made here, to a temp folder (no hub). Synthetic videos carry real audio
tracks (AAC in mp4, 16-bit PCM in mkv) written with PyAV. Oracles: the transformers models called directly,
scipy's resampler, and hand-made transcripts / frame values.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, moving_pattern

from expmae.features import common
from expmae.features.audio import AudioEncoder, load_audio
from expmae.features.cli import main
from expmae.features.clip import ClipImageEncoder, frame_indices, read_face_frames
from expmae.features.text import TextEncoder, read_transcripts

HIDDEN, PROJECTION = 32, 16  # the tiny models' feature sizes: audio/text D = 32, CLIP D = 16


# ----------------------------------------------------------------------------------------------- helpers
def tone(freqs: list[float], seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    """One sine per channel: float32 (C, S)."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.stack([amplitude * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)


def write_av_video(path, frames: np.ndarray, *, fps: int = 25, audio: np.ndarray | None = None,
                   rate: int = 44100, codec: str = "aac") -> Path:
    """mpeg4 video (decord reads it) plus, when ``audio`` (C, S) is given, an ``aac`` or ``pcm_s16le`` track."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.options = {"qscale": "2"}
        sound = None
        if audio is not None:
            layout = "mono" if audio.shape[0] == 1 else "stereo"
            sound = container.add_stream(codec, rate=rate, layout=layout)
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        if sound is not None:
            planar = codec != "pcm_s16le"  # aac takes planar float, pcm_s16le packed int16
            for start in range(0, audio.shape[1], 1024):
                chunk = audio[:, start : start + 1024]
                if planar:
                    data, fmt = np.ascontiguousarray(chunk, dtype=np.float32), "fltp"
                else:
                    data, fmt = (np.clip(chunk, -1, 1) * 32767).round().astype(np.int16).T.reshape(1, -1), "s16"
                frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
                frame.sample_rate, frame.pts = rate, start
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode(None):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    return path


def run_cli(args: list[str], capsys) -> tuple[int, dict | None, str]:
    rc = main([str(a) for a in args] + ["--no-progress"])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.startswith("{")]
    return rc, (json.loads(lines[-1]) if lines else None), captured.err


def load_dir(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted(folder.glob("*.npy"))}


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random HuBERT / BERT / CLIP folders, laid out like the real hub folders."""
    from transformers import (BertConfig, BertModel, BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel,
                              HubertConfig, HubertModel, Wav2Vec2FeatureExtractor)

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    hubert = root / "tiny-hubert"
    HubertModel(HubertConfig(hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)).save_pretrained(hubert)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(hubert)

    # MacBERT's folder holds config.json + weights + vocab.txt (no tokenizer.json): build it that way.
    bert = root / "tiny-macbert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"我今天很高兴你好吗不开心真的", "i", "am", "very", "happy", "today", "sad", "."]
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=24)).save_pretrained(bert)
    assert BertTokenizer.from_pretrained(bert)("我很高兴")["input_ids"] == [2, 5, 8, 9, 10, 3]  # the vocab is really used

    clip = root / "tiny-clip"
    text_cfg = dict(vocab_size=99, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision_cfg = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=PROJECTION)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    return {"audio": hubert, "text": bert, "clip": clip}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    """Four face-clip stand-ins: three with sound (AAC stereo 44.1 kHz, AAC mono 16 kHz, PCM stereo 48 kHz),
    one silent; and a transcript CSV (MER2023 layout) that lacks one of them and has one empty text."""
    root = tmp_path_factory.mktemp("media")
    videos = root / "videos"
    write_av_video(videos / "s01.mp4", moving_pattern(30, 64, seed=0), audio=tone([220, 220], 1.2, 44100))
    write_av_video(videos / "s02.mp4", moving_pattern(20, 64, seed=1), audio=tone([330], 0.8, 16000), rate=16000)
    write_av_video(videos / "s03.mkv", moving_pattern(25, 64, seed=2), audio=tone([440, 550], 1.0, 48000), rate=48000, codec="pcm_s16le")
    write_av_video(videos / "s04_silent.mp4", moving_pattern(12, 64, seed=3))
    transcripts = root / "transcription.csv"
    with open(transcripts, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "chinese", "english"])
        w.writerow(["s01", "我今天很高兴", "I am very happy today."])
        w.writerow(["s02", "", ""])
        w.writerow(["s04_silent", "你好吗", "how are you"])
    return {"videos": videos, "transcripts": transcripts, "names": ["s01", "s02", "s03", "s04_silent"],
            "frames": {"s01": 30, "s02": 20, "s03": 25, "s04_silent": 12}}


# ----------------------------------------------------------------------------------------------- audio
def test_load_audio_resamples_to_16k_and_averages_channels(tmp_path):
    from scipy.signal import resample_poly

    stereo = tone([440, 440], 1.0, 48000) * np.array([[1.0], [0.2]], dtype=np.float32)  # L amplitude .5, R .1
    path = write_av_video(tmp_path / "pcm.mkv", moving_pattern(25, 64), audio=stereo, rate=48000, codec="pcm_s16le")
    wave = load_audio(path)
    expected = resample_poly(stereo.mean(axis=0), 1, 3)  # (L + R) / 2 at 16 kHz, by an independent resampler
    assert wave.dtype == np.float32 and wave.shape == expected.shape == (16000,)
    inner = slice(200, -200)  # the two resamplers' filters differ only at the edges
    assert np.abs(wave[inner] - expected[inner]).max() < 5e-3
    assert np.sqrt(2) * wave[inner].std() == pytest.approx(0.3, abs=5e-3)

    aac = write_av_video(tmp_path / "aac.mp4", moving_pattern(25, 64), audio=tone([440, 440], 1.0, 44100))
    wave = load_audio(aac)  # lossy codec: check length (AAC adds ~1024 priming samples) and pitch
    assert 16000 <= len(wave) <= 16000 + 2048 * 16000 // 44100 + 1
    spectrum = np.abs(np.fft.rfft(wave))
    assert np.fft.rfftfreq(len(wave), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=2)


def test_load_audio_without_audio_stream_is_a_clear_error(media):
    with pytest.raises(ValueError, match="no audio stream"):
        load_audio(media["videos"] / "s04_silent.mp4")


def test_audio_encoder_matches_hubert_hidden_states(models):
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    wave = np.random.default_rng(0).uniform(-0.5, 0.5, 12345).astype(np.float32)
    oracle = HubertModel.from_pretrained(models["audio"]).eval()
    values = Wav2Vec2FeatureExtractor.from_pretrained(models["audio"])(wave, sampling_rate=16000, return_tensors="pt").input_values
    assert abs(values.mean()) < 1e-4 and abs(values.std() - 1) < 1e-2  # the saved preprocessor normalises
    with torch.no_grad():
        hidden = oracle(values, output_hidden_states=True).hidden_states
    frames = (12345 - 400) // 320 + 1  # the conv front end: 400-sample window, 320-sample hop

    last = AudioEncoder(models["audio"], device="cpu")(wave)  # default: the baseline's last layer
    assert last.shape == (frames, HIDDEN)
    np.testing.assert_allclose(last, hidden[-1][0].numpy(), atol=1e-5)

    four = AudioEncoder(models["audio"], layers="-4,-3,-2,-1", layer_reduce="mean", device="cpu")(wave)
    np.testing.assert_allclose(four, torch.stack(hidden[-4:]).mean(0)[0].numpy(), atol=1e-5)
    assert not np.allclose(four, last, atol=1e-3)


def test_audio_encoder_runs_long_audio_in_chunks(models):
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    wave = np.random.default_rng(1).uniform(-0.5, 0.5, 27200).astype(np.float32)  # 1.7 s
    values = Wav2Vec2FeatureExtractor.from_pretrained(models["audio"])(wave, sampling_rate=16000, return_tensors="pt").input_values
    oracle = HubertModel.from_pretrained(models["audio"]).eval()
    # 0.5 s chunks: 8000 + 8000 + 8000 + a 3200-sample tail, which (under 1 s) joins the third piece.
    with torch.no_grad():
        expected = torch.cat([oracle(values[:, a:b]).last_hidden_state[0] for a, b in [(0, 8000), (8000, 16000), (16000, 27200)]])
    for batch_size in (1, 2):
        got = AudioEncoder(models["audio"], chunk_seconds=0.5, batch_size=batch_size, device="cpu")(wave)
        assert got.shape == (24 + 24 + 34, HIDDEN)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)

    with pytest.raises(ValueError, match="at least 0.025 s"):
        AudioEncoder(models["audio"], device="cpu")(wave[:300])


# ----------------------------------------------------------------------------------------------- text
def test_read_transcripts_understands_the_mer2023_layouts(tmp_path):
    new = tmp_path / "transcription.csv"
    new.write_text("\ufeffname,chinese,english\na,你好, hello \nb,,\nc,nan,nan\n", encoding="utf-8")  # BOM as Excel saves it
    assert read_transcripts(new) == {"a": "你好", "b": "", "c": ""}
    assert read_transcripts(new, language="en") == {"a": "hello", "b": "", "c": ""}
    old = tmp_path / "baseline.csv"  # the MER2023 baseline's ASR output: name,sentence
    old.write_text("name,sentence\na,今天\n", encoding="utf-8")
    assert read_transcripts(old) == {"a": "今天"}
    assert read_transcripts(old, column="Sentence") == {"a": "今天"}

    with pytest.raises(ValueError, match=r"baseline\.csv: columns \['name', 'sentence'\]; expected name and english"):
        read_transcripts(old, language="en")
    dup = tmp_path / "dup.csv"
    dup.write_text("name,chinese\na,x\na,y\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'a' appears twice"):
        read_transcripts(dup)


def test_text_encoder_matches_bert_last_four_layers(models):
    from transformers import AutoTokenizer, BertModel

    tok, oracle = AutoTokenizer.from_pretrained(models["text"]), BertModel.from_pretrained(models["text"]).eval()
    text = "我今天很高兴 I am very happy."
    with torch.no_grad():
        hidden = oracle(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
    expected = torch.stack(hidden[-4:]).sum(0)[0, 1:-1].numpy()  # the baseline: sum of four layers, no [CLS]/[SEP]

    encoder = TextEncoder(models["text"], device="cpu")
    tokens, info = encoder(text)
    assert tokens.shape == (11, HIDDEN) and info == {"tokens": 11}
    np.testing.assert_allclose(tokens, expected, atol=1e-5)

    zeros, info = encoder("  ")
    assert info["empty_text"] and zeros.shape == (1, HIDDEN) and not zeros.any()
    long, info = encoder("我" * 40)  # 42 tokens with [CLS]/[SEP]; the tiny model has 24 positions
    assert info == {"tokens": 22, "truncated": True} and long.shape == (22, HIDDEN)
    with pytest.raises(ValueError, match="index -6 out of range for a model with 5 hidden states"):
        TextEncoder(models["text"], layers="-6,-1", device="cpu")  # at load time, not once per sample


# ----------------------------------------------------------------------------------------------- clip
def test_read_frames_picks_evenly_spaced_frames(tmp_path):
    assert frame_indices(25, 4).tolist() == [0, 8, 16, 24]
    assert frame_indices(3, 8).tolist() == [0, 1, 2] and frame_indices(5, 0).tolist() == [0, 1, 2, 3, 4]
    levels = 20 + 8 * np.arange(25)  # frame t is flat grey 20 + 8 t
    frames = np.broadcast_to(levels[:, None, None, None], (25, 64, 64, 3)).astype(np.uint8)
    path = write_av_video(tmp_path / "grey.mp4", frames)
    got = read_face_frames(path, num_frames=4)
    assert got.shape == (4, 64, 64, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(got.reshape(4, -1).mean(1), levels[[0, 8, 16, 24]], atol=3)


def test_read_frames_refuses_decord_misstrided_widths(tmp_path):
    path = write_av_video(tmp_path / "w48.mp4", np.zeros((6, 64, 48, 3), np.uint8))
    with pytest.raises(Exception, match=r"w48\.mp4: decord 0\.6\.0 .*width"):  # a clear error, never garbage frames
        read_face_frames(path, num_frames=4)


def test_clip_reads_an_expmae_crop_folder_of_npy_clips(models, tmp_path):
    crops = tmp_path / "crops"
    clip = moving_pattern(10, 64, seed=5)
    (crops / "clips").mkdir(parents=True)
    np.save(crops / "clips" / "s09.npy", clip)
    np.save(crops / "clips" / "bad.npy", clip.astype(np.float32))
    (crops / "manifest.jsonl").write_text('{"key": "s09", "path": "clips/s09.npy"}\n')
    assert [p.name for p in common.list_inputs(crops)] == ["bad.npy", "s09.npy"]
    np.testing.assert_array_equal(read_face_frames(crops / "clips" / "s09.npy", 4), clip[[0, 3, 6, 9]])

    from expmae.features import extract_clip_features

    summary = extract_clip_features(crops, tmp_path / "out", models["clip"], num_frames=4, device="cpu", progress=False)
    assert (summary.done, summary.failed) == (1, 1) and "expected a uint8 (T, H, W, 3) face clip" in summary.failures[0]["reason"]
    expected = ClipImageEncoder(models["clip"], device="cpu")(clip[[0, 3, 6, 9]]).mean(0)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "s09.npy"), expected, rtol=1e-5, atol=1e-6)


def test_clip_encoder_matches_get_image_features(models, media):
    from transformers import CLIPImageProcessor, CLIPModel

    frames = read_face_frames(media["videos"] / "s01.mp4", num_frames=8)
    oracle = CLIPModel.from_pretrained(models["clip"]).eval()
    pixels = CLIPImageProcessor.from_pretrained(models["clip"])(images=list(frames), return_tensors="pt").pixel_values
    with torch.no_grad():
        out = oracle.get_image_features(pixel_values=pixels)
    expected = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
    got = ClipImageEncoder(models["clip"], batch_size=3, device="cpu")(frames)  # 3 + 3 + 2
    assert got.shape == (8, PROJECTION)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------- the jobs
@pytest.fixture(scope="module")
def extracted(models, media, tmp_path_factory) -> dict:
    """Utterance-level features of the four clips through the Python API: {modality: (folder, JobSummary)}."""
    from expmae.features import extract_audio_features, extract_clip_features, extract_text_features

    root, videos = tmp_path_factory.mktemp("features"), media["videos"]
    return {
        "audio": (root / "audio", extract_audio_features(videos, root / "audio", models["audio"], device="cpu", progress=False)),
        "text": (root / "text", extract_text_features(media["transcripts"], root / "text", models["text"], names=media["names"],
                                                      device="cpu", progress=False)),
        "clip": (root / "clip", extract_clip_features(videos, root / "clip", models["clip"], num_frames=8, device="cpu",
                                                      progress=False)),
    }


def test_one_file_per_sample_and_failures_reported(extracted, media):
    summaries = {m: s.as_dict() for m, (_, s) in extracted.items()}
    assert summaries == {"audio": {"total": 4, "done": 3, "skipped": 0, "failed": 1},
                         "text": {"total": 4, "done": 3, "skipped": 0, "failed": 1},
                         "clip": {"total": 4, "done": 4, "skipped": 0, "failed": 0}}
    feats = {m: load_dir(d) for m, (d, _) in extracted.items()}
    assert sorted(feats["audio"]) == ["s01", "s02", "s03"]
    assert sorted(feats["text"]) == ["s01", "s02", "s04_silent"]
    assert sorted(feats["clip"]) == media["names"]
    for modality, dim in (("audio", HIDDEN), ("text", HIDDEN), ("clip", PROJECTION)):
        assert all(a.shape == (dim,) and a.dtype == np.float32 and np.isfinite(a).all() for a in feats[modality].values())
    assert not feats["text"]["s02"].any()  # empty transcript -> zeros, as in the baseline
    assert len({a.tobytes() for a in feats["audio"].values()}) == 3  # different clips, different features

    def records(modality, name):
        return {r["key"]: r for r in map(json.loads, (extracted[modality][0] / name).read_text().splitlines())}

    silent = media["videos"] / "s04_silent.mp4"
    assert records("audio", "failures.jsonl")["s04_silent"]["reason"] == f"ValueError: {silent}: no audio stream (the video has no sound track)"
    assert records("text", "failures.jsonl")["s03"]["reason"] == "LookupError: s03: no row for this sample in transcription.csv"
    assert len(records("audio", "failures.jsonl")) == len(records("text", "failures.jsonl")) == 1
    assert records("audio", "manifest.jsonl")["s03"] == {"key": "s03", "shape": [HIDDEN], "seconds": 1.0, "frames": (16000 - 400) // 320 + 1}
    assert records("text", "manifest.jsonl")["s02"] == {"key": "s02", "shape": [HIDDEN], "frames": 1, "tokens": 0, "empty_text": True}
    settings = json.loads((extracted["text"][0] / "extractor.json").read_text())
    assert settings["layers"] == [-4, -3, -2, -1] and settings["layer_reduce"] == "sum" and settings["pooling"] == "mean"


def test_cli_frame_level_deterministic_and_resumable(extracted, models, media, tmp_path, capsys):
    videos, out = media["videos"], tmp_path / "features"
    pooled = {m: load_dir(d) for m, (d, _) in extracted.items()}
    runs = {
        "audio": ["audio", videos, out, "--model", models["audio"]],
        "text": ["text", videos, out, "--model", models["text"], "--transcripts", media["transcripts"]],
        "clip": ["clip", videos, out, "--model", models["clip"], "--num-frames", "8"],
    }
    # Utterance level through the CLI: the baseline's folder names, and the same bytes as the API run.
    for modality, args in runs.items():
        rc, summary, _ = run_cli(args, capsys)
        assert rc == 0 and Path(summary["out_dir"]).name == {"audio": "tiny-hubert-UTT", "text": "tiny-macbert-4-UTT",
                                                              "clip": "tiny-clip-UTT"}[modality]
        again = load_dir(Path(summary["out_dir"]))
        assert again.keys() == pooled[modality].keys() and all(np.array_equal(again[k], pooled[modality][k]) for k in again)

    # Frame level: (N, D), N = audio frames / tokens / sampled frames; its mean is the pooled feature.
    for modality, args in runs.items():
        assert run_cli(args + ["--pooling", "none", "--prefetch", "0"], capsys)[0] == 0
    frames = {m: load_dir(out / {"audio": "tiny-hubert-FRA", "text": "tiny-macbert-4-FRA", "clip": "tiny-clip-FRA"}[m]) for m in runs}
    assert frames["audio"]["s03"].shape == ((16000 - 400) // 320 + 1, HIDDEN)
    assert frames["text"]["s01"].shape == (6, HIDDEN) and frames["text"]["s02"].shape == (1, HIDDEN)
    assert {k: v.shape for k, v in frames["clip"].items()} == {k: (min(8, n), PROJECTION) for k, n in media["frames"].items()}
    for modality in runs:
        for key, array in frames[modality].items():
            np.testing.assert_allclose(array.mean(0), pooled[modality][key], rtol=1e-5, atol=1e-6)

    # Resumable: a rerun skips the finished samples and rewrites nothing.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "tiny-hubert-UTT").glob("*.npy")}
    rc, resumed, err = run_cli(runs["audio"], capsys)
    assert rc == 0 and (resumed["done"], resumed["skipped"], resumed["failed"]) == (0, 3, 1)
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "tiny-hubert-UTT").glob("*.npy")}
    assert "1 sample(s) failed, reasons in" in err


def test_fusion_stage_reads_the_folders_unchanged(extracted, media):
    from expmae.finetune import featureset

    dirs = {m: d for m, (d, _) in extracted.items()}
    fused = featureset.load_features({m: [d] for m, d in dirs.items()}, media["names"], missing="drop", progress=False)
    assert list(fused.names) == ["s01", "s02"] and fused.dims == {"audio": HIDDEN, "text": HIDDEN, "clip": PROJECTION}
    assert fused.missing == {str(dirs["audio"]): ["s04_silent"], str(dirs["text"]): ["s03"]}
    np.testing.assert_array_equal(fused.arrays["clip"][0], np.load(dirs["clip"] / "s01.npy"))


def test_text_samples_from_the_csv_or_a_name_list(models, media, tmp_path, capsys):
    rc, out, _ = run_cli(["text", media["transcripts"], tmp_path, "--model", models["text"], "--language", "en",
                          "--name", "macbert-en"], capsys)
    assert rc == 0 and (out["done"], out["failed"]) == (3, 0)
    assert sorted(load_dir(tmp_path / "macbert-en")) == ["s01", "s02", "s04_silent"]
    english = TextEncoder(models["text"], device="cpu")("I am very happy today.")[0].mean(0)
    np.testing.assert_allclose(np.load(tmp_path / "macbert-en" / "s01.npy"), english, rtol=1e-5, atol=1e-6)

    listing = tmp_path / "names.txt"
    listing.write_text("# samples to embed\ns01\nvideos/s04_silent.mp4\n\ns99.v2\n")
    rc, out, _ = run_cli(["text", listing, tmp_path, "--model", models["text"], "--transcripts", media["transcripts"],
                          "--name", "listed"], capsys)
    assert rc == 0 and (out["done"], out["failed"]) == (2, 1)  # s99.v2 has no transcript: reported, not fatal
    failed = json.loads((tmp_path / "listed" / "failures.jsonl").read_text())
    assert failed["key"] == "s99.v2" and "no row for this sample" in failed["reason"]


def test_missing_model_dir_is_a_one_line_error(media, tmp_path):
    missing = tmp_path / "chinese-hubert-large"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "extract_features.py"), "audio", str(media["videos"]),
                           str(tmp_path / "out"), "--model", str(missing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"model directory {missing} not found" in proc.stderr and "huggingface-cli download" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_never_mixes_two_settings(models, media, tmp_path, capsys):
    base = ["audio", media["videos"], tmp_path, "--model", models["audio"], "--name", "hubert", "--limit", "1"]
    assert run_cli(base, capsys)[0] == 0
    rc, _, err = run_cli(base + ["--layers=-2"], capsys)
    assert rc == 2 and "made with layers=[-1], not [-2]" in err
    assert len(list((tmp_path / "hubert").glob("*.npy"))) == 1


def test_layer_and_pooling_helpers_reject_bad_values():
    hidden = [torch.full((1, 2, 3), float(i)) for i in range(5)]
    assert common.parse_layers("-4, -3,-2,-1") == (-4, -3, -2, -1) and common.parse_layers(-1) == (-1,)
    assert common.combine_layers(hidden, (-1, 0), "sum").flatten().tolist() == [4.0] * 6
    assert common.combine_layers(hidden, (1, 2), "mean").flatten().tolist() == [1.5] * 6
    with pytest.raises(ValueError, match="index 5 out of range for a model with 5 hidden states"):
        common.combine_layers(hidden, (5,))
    for bad in ("last", "-1,-1", ""):
        with pytest.raises(ValueError, match="layers"):
            common.parse_layers(bad)
    with pytest.raises(ValueError, match="expected one of mean, none"):
        common.pool(np.ones((2, 3)), "max")
    with pytest.raises(ValueError, match=r"shape \(0, 3\)"):
        common.pool(np.ones((0, 3)), "mean")
    assert common.feature_dir_name("/m/chinese-macbert-large/", "mean", (-4, -3, -2, -1)) == "chinese-macbert-large-4-UTT"
    assert common.feature_dir_name("/m/chinese-hubert-large", "none", (-1,)) == "chinese-hubert-large-FRA"
