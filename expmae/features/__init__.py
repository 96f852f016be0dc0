"""Per-sample features for the fusion stage: one folder per extractor, one ``<sample>.npy`` per sample.

Modalities (each in its own module, heavy libraries imported only there): ``audio`` (HuBERT/wav2vec2 on
the sound track), ``text`` (BERT-family on MER2023 transcripts), ``clip`` (CLIP image features of face
frames), ``tacotron_var`` (a Capacitron Tacotron 2's variational prosody embedding; optional coqui-tts), ``video`` / ``frame`` (our expMAE encoder: expmae.features.visual); console script
``expmae-features`` (expmae.features.cli). Shared mechanics: expmae.features.common.

For notebooks: ``expmae.features.extract(video_or_frames, encoder_dir)`` -> (D,) expMAE features.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "extract_audio_features": "expmae.features.audio",
    "extract_text_features": "expmae.features.text",
    "extract_clip_features": "expmae.features.clip",
    "extract_tacotron_var_features": "expmae.features.tacotron_var",
    "extract": "expmae.features.visual",
    "extract_visual_features": "expmae.features.visual",
    "VisualFeatureExtractor": "expmae.features.visual",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
