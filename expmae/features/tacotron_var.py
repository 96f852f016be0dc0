"""Cross-modal features: Tacotron-Var, the variational prosody embedding of a Capacitron Tacotron 2 (coqui-tts).

Capacitron (Battenberg et al. 2019, arXiv:1906.03402) adds to Tacotron 2 a reference encoder over the utterance's
mel spectrogram and a Gaussian posterior q(z | audio [, text]); the feature is that posterior's mean mu
(``embedding="posterior"``, deterministic) or the reference encoder's output (``embedding="reference"``, audio
only). Built from coqui-tts's own layers and the checkpoint's config.json; weights load state-dict-only and the
mel statistics through an unpickler that admits arrays only. The rest (weights, transcripts, limits):
docs/guides/features.md ("Audio, lexical and cross-modal features").
"""
from __future__ import annotations

import argparse
import importlib
import os
import pickle
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from expmae.features.audio import load_audio
from expmae.features.common import feature_dir_name, list_inputs, model_fingerprint, resolve_device, run_extraction
from expmae.features.text import read_transcripts
from expmae.shards import Shard

EMBEDDINGS = ("posterior", "reference")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")
MODEL_EXAMPLE = "tts_models/en/blizzard2013/capacitron-t2-c150_v2"
CHECKPOINT_NAMES = ("model_file.pth", "model_file.pth.tar", "model.pth", "checkpoint.pth")
INSTALL_HINT = "pip install 'expmae[tts]' (coqui-tts)"


def coqui(module: str):
    """A module of coqui-tts (the optional ``tts`` extra), or the one-line error that names the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"tacotron_var needs the optional coqui-tts stack ({exc}): {INSTALL_HINT}") from None


# ----------------------------------------------------------------------------------------------- inputs / weights
def list_speech_inputs(source) -> list[Path]:
    """``list_inputs``'s videos and lists, plus a single audio file or a folder of audio files."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS:
            return [path]
        if path.is_dir() and not (path / "clips").is_dir():
            audio = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith("."))
            if audio:
                return audio
    return list_inputs(source)


def resolve_checkpoint(model: str | os.PathLike, config: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(checkpoint, config.json): ``model`` is the checkpoint file or the folder holding it (one ``*.pth``)."""
    path = Path(model).expanduser()
    how = (f"download a Capacitron model once where the hub is reachable (`tts --model_name {MODEL_EXAMPLE} "
           "--text hi --out_path x.wav` stores model_file.pth and config.json) and copy the folder here; "
           "this tool never downloads")
    if path.is_dir():  # coqui's own rule (TTS.utils.manage): a known name, else the one checkpoint there
        named = [path / n for n in CHECKPOINT_NAMES if (path / n).is_file()]
        found = named[:1] or sorted({*path.glob("*.pth"), *path.glob("*.pth.tar")})
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: {len(found)} .pth files; expected one coqui checkpoint "
                                    f"(model_file.pth), or name the file: {how}")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"Capacitron checkpoint {path} not found: {how}")
    config = Path(config).expanduser() if config else path.parent / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: the coqui config.json saved with {path.name} (give it with --config)")
    return path, config


def load_state_dict(checkpoint: Path) -> dict:
    """The model's tensors from a coqui checkpoint (``{"model": state_dict, ...}``) or a bare state dict."""
    import torch  # deferred: console start-up: torch, +1.5 s on expmae-features --help

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{checkpoint}: not loadable with torch.load(weights_only=True) ({reason}); "
                         "expected a coqui checkpoint holding tensors ({'model': state_dict, ...})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint}: holds a {type(state).__name__}, not a state dict; "
                         "expected a coqui checkpoint ({'model': state_dict, ...})")
    return state


class _StatsUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts and plain values (a coqui ``scale_stats.npy``), never anything callable."""

    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part")
        return super().find_class(module, name)


def read_scale_stats(path: Path) -> dict:
    """A coqui mel statistics file (``np.save`` of a dict, i.e. a pickle) read without running code."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            _, _, dtype = (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)
            stats = _StatsUnpickler(f).load() if dtype.hasobject else None
    except (ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{path}: not a coqui scale_stats.npy of plain arrays ({exc})") from None
    stats = stats.item() if isinstance(stats, np.ndarray) and stats.shape == () else stats
    keys = ("mel_mean", "mel_std", "linear_mean", "linear_std")
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), np.ndarray) for k in keys):
        raise ValueError(f"{path}: expected a coqui scale_stats.npy (a dict with {', '.join(keys)})")
    return stats


def find_stats(stats_path: str, config_path: Path) -> Path:
    """The config's ``audio.stats_path``, or a file of that name beside config.json (a copied model folder)."""
    for path in (Path(stats_path).expanduser(), config_path.parent / Path(stats_path).name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{config_path}: audio.stats_path {stats_path} not found, nor beside the config")


def load_capacitron_config(config_path: Path):
    """(coqui config, mel statistics or None) of a Capacitron Tacotron 2; ``audio.stats_path`` is read here, safely,
    and cleared, so coqui never unpickles it."""
    cfg = coqui("TTS.config").load_config(str(config_path))
    if cfg.get("model") != "tacotron2" or not cfg.get("use_capacitron_vae") or cfg.get("capacitron_vae") is None:
        raise ValueError(f"{config_path}: model={cfg.get('model')!r}, use_capacitron_vae="
                         f"{cfg.get('use_capacitron_vae')!r}; expected a Capacitron Tacotron 2 config")
    if cfg.capacitron_vae.capacitron_use_speaker_embedding:
        raise ValueError(f"{config_path}: capacitron_use_speaker_embedding is set; multi-speaker Capacitron "
                         "models are not supported (coqui marks them untested)")
    stats = None
    if cfg.audio.stats_path and cfg.audio.signal_norm:
        stats = read_scale_stats(find_stats(cfg.audio.stats_path, config_path))
    cfg.audio.stats_path = None
    return cfg, stats


def build_capacitron(cfg, checkpoint: Path, config_path: Path):
    """coqui's Tacotron2 from ``cfg`` with the checkpoint's weights (which must fit it exactly)."""
    Tacotron2 = coqui("TTS.tts.models.tacotron2").Tacotron2
    try:
        net = Tacotron2(cfg)
    except OSError as exc:  # the tokenizer's phonemizer is a system program (espeak for the published models)
        raise FileNotFoundError(f"{config_path}: coqui cannot build this model's text tokenizer ({exc}); "
                                f"phonemizer {cfg.get('phonemizer')!r} is a system package "
                                "(e.g. apt install espeak-ng), needed even for the reference embedding") from None
    try:
        missing, unexpected = net.load_state_dict(load_state_dict(checkpoint), strict=False)
    except RuntimeError as exc:  # a tensor of the wrong size
        raise ValueError(f"{checkpoint}: does not fit {config_path.name} "
                         f"({str(exc).strip().splitlines()[-1].strip()[:200]})") from None
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: does not fit {config_path.name} (missing {missing[:2]}, "
                         f"unexpected {unexpected[:2]}); expected the checkpoint saved with this config")
    return net


# ----------------------------------------------------------------------------------------------- the model
class TacotronVarEncoder:
    """A coqui Capacitron Tacotron 2 as ``waveform (S,) at sample_rate [, transcript] -> (embedding (1, D), info)``."""

    def __init__(self, model: str | os.PathLike, *, config: str | os.PathLike | None = None,
                 embedding: str = "posterior", device: str = "auto"):
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding {embedding!r}; expected one of {', '.join(EMBEDDINGS)}")
        # Check the files before the slow imports, so a wrong path fails at once.
        self.checkpoint, self.config_path = resolve_checkpoint(model, config)
        import torch  # deferred: console start-up: torch, +1.5 s on expmae-features --help

        coqui("TTS")  # the optional extra: a one-line error before anything else loads
        cfg, stats = load_capacitron_config(self.config_path)
        net = build_capacitron(cfg, self.checkpoint, self.config_path)
        self.device, self.embedding = resolve_device(device), embedding
        self.vae = net.capacitron_vae_layer.to(self.device).eval()
        self.text_embedding = net.embedding.to(self.device).eval()  # the character/phoneme table the text summary reads
        self.ap, self.tokenizer = net.ap, net.tokenizer
        if stats is not None:  # what coqui's AudioProcessor does with a stats file: mean-std scaling, no clipping
            self.ap.setup_scaler(stats["mel_mean"], stats["mel_std"], stats["linear_mean"], stats["linear_std"])
            self.ap.max_norm = self.ap.clip_norm = self.ap.symmetric_norm = None
        self.sample_rate = int(self.ap.sample_rate)
        self.needs_text = embedding == "posterior" and bool(cfg.capacitron_vae.capacitron_use_text_summary_embeddings)
        self._torch = torch

    def mel(self, waveform: np.ndarray) -> np.ndarray:
        """The reference mel spectrogram (T, num_mels), as coqui computes it for a style wav."""
        ap = self.ap
        x = np.asarray(waveform, dtype=np.float64)  # coqui reads wavs as float64 (soundfile)
        if ap.do_trim_silence:
            x = ap.trim_silence(x)
        if ap.do_sound_norm:
            x = ap.sound_norm(x)
        if len(x) < ap.win_length:
            raise ValueError(f"{len(x) / self.sample_rate:.3f} s of sound after silence trimming; the model needs at "
                             f"least one {ap.win_length}-sample window")
        return ap.melspectrogram(x).T  # (num_mels, T) -> (T, num_mels)

    def __call__(self, waveform: np.ndarray, text: str | None = None) -> tuple[np.ndarray, dict]:
        torch = self._torch
        mel = self.mel(waveform)
        mels = torch.from_numpy(np.ascontiguousarray(mel))[None].to(self.device)  # (1, T, num_mels)
        lengths = torch.tensor([len(mel)], device=self.device)
        with torch.inference_mode():
            if self.embedding == "reference":
                out = self.vae.encoder(mels, lengths)  # (1, 128)
            else:
                _, posterior, _, _ = self.vae(reference_mel_info=[mels, lengths], text_info=self._text_info(text))
                out = posterior.mean  # (1, D): mu of q(z | audio [, text])
        return out.float().cpu().numpy(), {"mel_frames": len(mel)}

    def _text_info(self, text: str | None):
        """[embedded tokens (1, L, E), lengths (1,)] for a text-summary model, as coqui's inference() builds it."""
        if not self.needs_text:
            return None
        if not (text or "").strip():
            raise ValueError("empty transcript; this model's posterior reads the text too (or use embedding='reference')")
        ids = self._torch.tensor([self.tokenizer.text_to_ids(text.strip())], device=self.device)
        return [self.text_embedding(ids), self._torch.tensor([ids.shape[1]])]


# ----------------------------------------------------------------------------------------------- the job
def extract_tacotron_var_features(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    model: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    embedding: str = "posterior",
    transcripts: str | os.PathLike | Mapping[str, str] | None = None,
    language: str = "en",
    column: str | None = None,
    pooling: str = "mean",
    device: str = "auto",
    limit: int | None = None,
    retry_failed: bool = False,
    shard: Shard = Shard(),
    prefetch: int = 2,
    progress: bool = True,
):
    """One ``<stem>.npy`` per video / audio file in ``out_dir``: (D,) for ``pooling="mean"``, (1, D) for "none".
    Transcripts (a MER2023-style CSV or ``{name: text}``) are read only when the model's posterior needs them;
    a sample without one is recorded in failures.jsonl. Returns the job's JobSummary."""
    paths = list_speech_inputs(inputs)  # a bad INPUT fails before the model loads
    encoder = TacotronVarEncoder(model, config=config, embedding=embedding, device=device)
    texts = None
    if encoder.needs_text:
        if transcripts is None:
            raise ValueError(f"{encoder.config_path}: this model's posterior also reads the transcript "
                             "(capacitron_use_text_summary_embeddings); give --transcripts, or --embedding reference")
        if isinstance(transcripts, Mapping):
            texts = dict(transcripts)
        else:
            texts = read_transcripts(transcripts, language=language, column=column)

    def load(path: Path):
        wav = load_audio(path, encoder.sample_rate)
        if texts is not None and path.stem not in texts:
            raise LookupError(f"{path.stem}: no row for this sample in the transcripts")
        return wav, (texts[path.stem] if texts is not None else None)

    def encode(item):
        wav, text = item
        feature, info = encoder(wav, text)
        return feature, {"seconds": round(len(wav) / encoder.sample_rate, 3), **info}

    settings = {"modality": "tacotron_var", "model": encoder.checkpoint.parent.name, "checkpoint": encoder.checkpoint.name,
                "model_config": model_fingerprint(encoder.config_path), "embedding": embedding,
                "sample_rate": encoder.sample_rate, "text": encoder.needs_text,
                "language": language if encoder.needs_text else None, "column": column if encoder.needs_text else None}
    return run_extraction(paths, out_dir, load=load, encode=encode, pooling=pooling, settings=settings, limit=limit,
                          retry_failed=retry_failed, shard=shard, prefetch=prefetch, desc="Tacotron-Var features", progress=progress)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="coqui config.json (default: beside the checkpoint)")
    parser.add_argument("--embedding", choices=EMBEDDINGS, default="posterior",
                        help="posterior: the variational embedding's mean (Tacotron-Var, default); "
                             "reference: the reference encoder's output (audio only)")
    parser.add_argument("--transcripts", type=Path, default=None,
                        help="transcript CSV (name + text column), for models whose posterior reads the text")
    parser.add_argument("--language", choices=("en", "zh"), default="en", help="which transcript column (en: english)")
    parser.add_argument("--text-column", default=None, help="use this CSV column instead of the language's default")


def default_name(model: str | os.PathLike, embedding: str, pooling: str) -> str:
    """``<model folder>-UTT`` (the checkpoint's folder), ``<model folder>-ref-UTT`` for the reference embedding."""
    path = Path(model).expanduser()
    name = feature_dir_name(path if path.is_dir() else path.parent, pooling)
    if embedding == "reference":
        stem, level = name.rsplit("-", 1)
        name = f"{stem}-ref-{level}"
    return name


def run_cli(args: argparse.Namespace, out_root: Path):
    if args.dtype != "float32":
        raise ValueError(f"--dtype {args.dtype}: tacotron_var runs in float32 (the posterior is built on the CPU)")
    out_dir = out_root / (args.name or default_name(args.model, args.embedding, args.pooling))
    summary = extract_tacotron_var_features(args.input, out_dir, args.model, config=args.config, embedding=args.embedding,
                                            transcripts=args.transcripts, language=args.language, column=args.text_column,
                                            pooling=args.pooling, device=args.device, limit=args.limit,
                                            retry_failed=args.retry_failed, shard=args.shard, prefetch=args.prefetch,
                                            progress=not args.no_progress)
    return out_dir, summary
