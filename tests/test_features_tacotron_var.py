"""Tacotron-Var features (expmae.features.tacotron_var, ``expmae-features tacotron_var``): coqui-tts's Capacitron.

Random-init Capacitron Tacotron 2 models are built from coqui configs and saved the way coqui saves them
(``model_file.pth`` = {"model": state_dict, "config": ...} beside config.json); no hub. Oracle: coqui itself, in
a second model loaded from the same files: its own wav reader and mel (``ap.load_wav`` + ``ap.melspectrogram``,
what ``synthesize(style_wav=...)`` does), run through the model's ``inference()`` (or the whole ``synthesize``),
reading the posterior the Capacitron layer keeps. These tests need the optional extra (pip install 'expmae[tts]').
"""
from __future__ import annotations

import csv
import json
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from expmae.features.cli import main
from expmae.features.tacotron_var import TacotronVarEncoder, extract_tacotron_var_features

VAE_DIM = 32  # capacitron_VAE_embedding_dim of the test models; the reference encoder's output is 128


@pytest.fixture(scope="module")
def coqui():
    return pytest.importorskip("TTS.tts.models.tacotron2",
                               reason="the optional coqui-tts stack is not installed (pip install 'expmae[tts]')")


def build_capacitron(folder: Path, *, text_summary: bool, seed: int = 0, vae_dim: int = VAE_DIM) -> Path:
    """A random Capacitron Tacotron 2 saved like a coqui release: model_file.pth + config.json."""
    from TTS.tts.configs.shared_configs import CapacitronVAEConfig
    from TTS.tts.configs.tacotron2_config import Tacotron2Config
    from TTS.tts.models.tacotron2 import Tacotron2

    config = Tacotron2Config(use_capacitron_vae=True, use_phonemes=False, max_decoder_steps=3,
                             capacitron_vae=CapacitronVAEConfig(capacitron_VAE_embedding_dim=vae_dim,
                                                                capacitron_use_text_summary_embeddings=text_summary))
    torch.manual_seed(seed)
    model = Tacotron2(config)
    for bn in model.capacitron_vae_layer.encoder.bns:  # running statistics that differ from train mode's batch stats
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": config.to_dict(), "step": 0}, folder / "model_file.pth")
    config.save_json(str(folder / "config.json"))
    return folder


def load_coqui(folder: Path):
    """The oracle: coqui's own model from the same files (its loader, its config reader)."""
    from TTS.config import load_config
    from TTS.tts.models.tacotron2 import Tacotron2

    model = Tacotron2(load_config(str(folder / "config.json")))
    model.load_checkpoint(model.config, str(folder / "model_file.pth"), eval=True)
    return model


def write_wav(path: Path, seconds: float, rate: int = 22050, f0: float = 140.0, seed: int = 0) -> Path:
    """A voiced-speech stand-in: harmonics of a gliding f0 under a syllable-rate envelope, between silences
    (which coqui's silence trimming removes), 16-bit mono PCM."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.2 * np.sin(2 * np.pi * 0.7 * t))) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)) ** 2
    voice = 0.3 * voice / np.abs(voice).max() + 0.002 * rng.standard_normal(len(t))
    silence = np.zeros(rate // 5)
    signal = np.concatenate([silence, voice, silence])
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(signal, -1, 1) * 32767).round().astype("<i2").tobytes())
    return path


def coqui_posterior(model, wav: Path, transcript: str | None = None, *, reference: bool = False) -> np.ndarray:
    """coqui's reference mel of ``wav`` through its inference(): the posterior mean (or the reference encoder's output)."""
    ap = model.ap
    mel = torch.tensor(ap.melspectrogram(ap.load_wav(str(wav), sr=ap.sample_rate)), dtype=torch.float)[None].transpose(1, 2)
    ids = torch.tensor([model.tokenizer.text_to_ids(transcript or "a")])
    seen = []
    hook = model.capacitron_vae_layer.encoder.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        model.inference(ids, aux_input={"style_mel": mel, "style_text": ids if transcript is not None else None})
    finally:
        hook.remove()
    out = seen[0] if reference else model.capacitron_vae_layer.approximate_posterior_distribution.mean
    return out.detach().numpy()


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("speech")
    wavs = [write_wav(root / "wavs" / f"u{i}.wav", seconds=s, f0=f0, seed=i)
            for i, (s, f0) in enumerate([(1.2, 120.0), (0.7, 210.0), (2.0, 160.0)])]
    transcripts = root / "transcription.csv"
    with open(transcripts, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "chinese", "english"])
        w.writerow(["u0", "你好", "hello there"])
        w.writerow(["u1", "很好", "very good, thanks"])  # u2 has no row
    return {"root": root, "wavs": wavs, "transcripts": transcripts,
            "texts": {"u0": "hello there", "u1": "very good, thanks"}}


@pytest.fixture(scope="module")
def models(coqui, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("capacitron")
    return {"audio": build_capacitron(root / "capacitron-audio", text_summary=False, seed=0),
            "text": build_capacitron(root / "capacitron-text", text_summary=True, seed=1)}


def run_cli(args, capsys) -> tuple[int, dict | None, str]:
    rc = main([str(a) for a in args] + ["--no-progress"])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.startswith("{")]
    return rc, (json.loads(lines[-1]) if lines else None), captured.err


# ----------------------------------------------------------------------------------------------- against coqui
def test_posterior_mean_equals_coqui_synthesize(models, speech, tmp_path):
    """Audio-only posterior: the whole coqui pipeline (synthesize with a style wav) is the oracle."""
    out = tmp_path / "feats"
    summary = extract_tacotron_var_features(speech["root"] / "wavs", out, models["audio"], device="cpu", progress=False)
    assert (summary.done, summary.failed) == (3, 0)
    oracle = load_coqui(models["audio"])
    for wav in speech["wavs"]:
        ours = np.load(out / f"{wav.stem}.npy")
        assert ours.shape == (VAE_DIM,) and ours.dtype == np.float32
        oracle.synthesize("hello", style_wav=str(wav))
        expected = oracle.capacitron_vae_layer.approximate_posterior_distribution.mean.detach().numpy()[0]
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    feats = [np.load(out / f"{w.stem}.npy") for w in speech["wavs"]]
    assert np.abs(feats[0] - feats[1]).max() > 1e-3  # different utterances, different embeddings
    # the folder is a finetuning branch as it stands (expmae-finetune --features tacotron_var=DIR)
    from expmae.finetune import featureset

    fused = featureset.load_features({"tacotron_var": [out]}, ["u0", "u1", "u2"], progress=False)
    assert fused.dims == {"tacotron_var": VAE_DIM}
    np.testing.assert_array_equal(fused.arrays["tacotron_var"][2], feats[2])


def test_text_summary_posterior_reads_the_transcript(models, speech, tmp_path, capsys):
    """The published models' posterior reads the text too: CLI with the transcript CSV vs coqui's inference()."""
    out_root = tmp_path / "features"
    rc, summary, err = run_cli(["tacotron_var", speech["root"] / "wavs", out_root, "--model", models["text"],
                                "--transcripts", speech["transcripts"], "--device", "cpu"], capsys)
    assert rc == 0 and (summary["done"], summary["failed"]) == (2, 1)  # u2 has no transcript: recorded, the rest go on
    assert Path(summary["out_dir"]).name == "capacitron-text-UTT" and "1 sample(s) failed" in err
    out = out_root / "capacitron-text-UTT"
    failure = json.loads((out / "failures.jsonl").read_text())
    assert failure["key"] == "u2" and "no row for this sample" in failure["reason"]
    oracle = load_coqui(models["text"])
    for name, text in speech["texts"].items():
        expected = coqui_posterior(oracle, speech["root"] / "wavs" / f"{name}.wav", text)[0]
        np.testing.assert_allclose(np.load(out / f"{name}.npy"), expected, rtol=1e-4, atol=1e-5)
    # the transcript matters: another text gives another posterior for the same audio
    other = coqui_posterior(oracle, speech["wavs"][0], "something else entirely")[0]
    assert np.abs(np.load(out / "u0.npy") - other).max() > 1e-4


def test_reference_embedding_is_the_reference_encoder_output(models, speech, tmp_path):
    out = tmp_path / "ref"
    extract_tacotron_var_features(speech["wavs"][:2], out, models["text"], embedding="reference", device="cpu",
                                  pooling="none", progress=False)  # needs no transcript
    oracle = load_coqui(models["text"])
    for wav in speech["wavs"][:2]:
        ours = np.load(out / f"{wav.stem}.npy")
        assert ours.shape == (1, 128)
        np.testing.assert_allclose(ours, coqui_posterior(oracle, wav, "x", reference=True), rtol=1e-4, atol=1e-5)


def test_sound_track_of_a_video(models, speech, tmp_path):
    """Videos work like wavs: the sound track, resampled to the model's rate (PyAV)."""
    av = pytest.importorskip("av")
    from expmae.features.audio import load_audio

    video = tmp_path / "clip.mkv"
    rate = 22050
    pcm = load_audio(speech["wavs"][0], rate)
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        for start in range(0, len(pcm), 1024):
            chunk = (np.clip(pcm[start : start + 1024], -1, 1) * 32767).round().astype(np.int16)[None]
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    encoder = TacotronVarEncoder(models["audio"], device="cpu")
    from_video, _ = encoder(load_audio(video, encoder.sample_rate))
    from_wav, _ = encoder(load_audio(speech["wavs"][0], encoder.sample_rate))
    np.testing.assert_allclose(from_video, from_wav, rtol=1e-5, atol=1e-6)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_mel_statistics_are_read_without_pickle(models, speech, tmp_path):
    """A config with audio.stats_path (coqui's scale_stats.npy, an np.save'd dict): the same mel scaling as
    coqui's own AudioProcessor, read by an unpickler that runs no code."""
    folder = tmp_path / "with-stats"
    folder.mkdir()
    (folder / "model_file.pth").write_bytes((models["audio"] / "model_file.pth").read_bytes())
    cfg = json.loads((models["audio"] / "config.json").read_text())
    rng = np.random.default_rng(0)
    n_mels, n_linear = cfg["audio"]["num_mels"], cfg["audio"]["fft_size"] // 2 + 1
    stats = {"mel_mean": rng.normal(-2, 1, n_mels), "mel_std": rng.uniform(0.5, 2, n_mels),
             "linear_mean": rng.normal(-2, 1, n_linear), "linear_std": rng.uniform(0.5, 2, n_linear),
             "audio_config": cfg["audio"]}
    np.save(folder / "scale_stats.npy", stats, allow_pickle=True)
    # the config names the file where the downloader kept it; the copy beside config.json is found
    cfg["audio"]["stats_path"] = "/somewhere/else/scale_stats.npy"
    (folder / "config.json").write_text(json.dumps(cfg))
    ours, _ = TacotronVarEncoder(folder, device="cpu")(_wav_samples(speech["wavs"][0]))
    cfg["audio"]["stats_path"] = str(folder / "scale_stats.npy")
    (folder / "config.json").write_text(json.dumps(cfg))
    oracle = load_coqui(folder)  # coqui reads the stats itself (with pickle: this test's own file)
    np.testing.assert_allclose(ours, coqui_posterior(oracle, speech["wavs"][0]), rtol=1e-4, atol=1e-5)
    plain = coqui_posterior(load_coqui(models["audio"]), speech["wavs"][0])
    assert np.abs(ours - plain).max() > 1e-4  # the statistics were used

    marker = tmp_path / "pwned"
    np.save(folder / "scale_stats.npy", np.array({"mel_mean": _Exploit(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a coqui scale_stats.npy of plain arrays"):
        TacotronVarEncoder(folder, device="cpu")
    assert not marker.exists()


def _wav_samples(wav: Path) -> np.ndarray:
    from expmae.features.audio import load_audio

    return load_audio(wav, 22050)


# ----------------------------------------------------------------------------------------------- failure modes
def test_text_model_without_transcripts_is_a_one_line_error(models, speech, tmp_path, capsys):
    rc, summary, err = run_cli(["tacotron_var", speech["wavs"][0], tmp_path, "--model", models["text"]], capsys)
    assert rc == 2 and summary is None and err.count("\n") == 1
    assert "reads the transcript" in err and "--transcripts" in err and "--embedding reference" in err


def test_wrong_checkpoint_is_a_one_line_error(coqui, models, speech, tmp_path, capsys):
    # weights of another size (a 64-d posterior) under this config
    other = build_capacitron(tmp_path / "other", text_summary=False, vae_dim=64)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "model_file.pth").write_bytes((other / "model_file.pth").read_bytes())
    (mixed / "config.json").write_bytes((models["audio"] / "config.json").read_bytes())
    rc, _, err = run_cli(["tacotron_var", speech["wavs"][0], tmp_path / "out", "--model", mixed], capsys)
    assert rc == 2 and err.count("\n") == 1 and "does not fit config.json" in err and "size mismatch" in err
    # not a torch file at all
    (mixed / "model_file.pth").write_text("not a checkpoint")
    rc, _, err = run_cli(["tacotron_var", speech["wavs"][0], tmp_path / "out", "--model", mixed], capsys)
    assert rc == 2 and err.count("\n") == 1 and "not loadable with torch.load(weights_only=True)" in err
    # a pickled object torch refuses to unpickle safely
    torch.save({"model": object()}, mixed / "model_file.pth")
    rc, _, err = run_cli(["tacotron_var", speech["wavs"][0], tmp_path / "out", "--model", mixed], capsys)
    assert rc == 2 and err.count("\n") == 1 and "weights_only" in err
    # a TTS config that is not a Capacitron Tacotron 2
    cfg = json.loads((models["audio"] / "config.json").read_text())
    (mixed / "config.json").write_text(json.dumps({**cfg, "use_capacitron_vae": False}))
    rc, _, err = run_cli(["tacotron_var", speech["wavs"][0], tmp_path / "out", "--model", mixed], capsys)
    assert rc == 2 and err.count("\n") == 1 and "expected a Capacitron Tacotron 2 config" in err


def test_missing_phonemizer_is_a_one_line_error(models, speech, tmp_path, capsys):
    """The published models phonemise with espeak, a system package: without it, say so."""
    import shutil

    if shutil.which("espeak") or shutil.which("espeak-ng"):
        pytest.skip("espeak is installed here: the missing-phonemizer error cannot happen")
    folder = tmp_path / "phonemes"
    folder.mkdir()
    (folder / "model_file.pth").write_bytes((models["audio"] / "model_file.pth").read_bytes())
    cfg = json.loads((models["audio"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "use_phonemes": True, "phonemizer": "espeak"}))
    rc, _, err = run_cli(["tacotron_var", speech["wavs"][0], tmp_path / "out", "--model", folder,
                          "--embedding", "reference"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "apt install espeak-ng" in err and "espeak" in err


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    """Runs without coqui-tts too: the files are checked before the optional imports."""
    wav = write_wav(tmp_path / "a.wav", 0.5)
    missing = tmp_path / "capacitron-t2-c150_v2"
    rc, _, err = run_cli(["tacotron_var", wav, tmp_path / "out", "--model", missing], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert f"Capacitron checkpoint {missing} not found" in err and "never downloads" in err
    missing.mkdir()
    (missing / "model_file.pth").write_bytes(b"")
    rc, _, err = run_cli(["tacotron_var", wav, tmp_path / "out", "--model", missing], capsys)
    assert rc == 2 and err.count("\n") == 1 and "config.json not found" in err and "--config" in err
    assert not (tmp_path / "out").exists()


def test_without_the_extra_the_error_names_it(tmp_path, monkeypatch, capsys):
    """As a user without expmae[tts] sees it (coqui hidden from the import system here)."""
    folder = tmp_path / "capacitron"
    folder.mkdir()
    (folder / "model_file.pth").write_bytes(b"")
    (folder / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "TTS", None)  # import TTS -> ImportError
    monkeypatch.setitem(sys.modules, "TTS.config", None)
    wav = write_wav(tmp_path / "a.wav", 0.5)
    rc, _, err = run_cli(["tacotron_var", wav, tmp_path / "out", "--model", folder], capsys)
    assert rc == 2 and err.count("\n") == 1 and "pip install 'expmae[tts]'" in err


def test_the_library_functions_without_the_extra_raise_the_one_line_error(tmp_path, monkeypatch):
    """load_capacitron_config and build_capacitron, called directly (not through the encoder's guard)."""
    from expmae.features.tacotron_var import build_capacitron, load_capacitron_config

    for name in ("TTS", "TTS.config", "TTS.tts", "TTS.tts.models", "TTS.tts.models.tacotron2"):
        monkeypatch.setitem(sys.modules, name, None)
    for call in (lambda: load_capacitron_config(tmp_path / "config.json"),
                 lambda: build_capacitron(None, tmp_path / "model.pth", tmp_path / "config.json")):
        with pytest.raises(ImportError, match=r"pip install 'expmae\[tts\]'") as info:
            call()
        assert "\n" not in str(info.value)
