"""Backends: how samples load and how a fold's model is built, trained, applied and saved. ``features``: feature
folders and a head; ``video``: the expMAE encoder finetuned end to end on face clips (+ feature folders)."""
from __future__ import annotations

from expmae.finetune.backends.features import FeatureBackend
from expmae.finetune.backends.video import VideoBackend
from expmae.finetune.config import FinetuneConfig


def make_backend(cfg: FinetuneConfig):
    """The end-to-end backend when videos or an encoder are given, else the features backend."""
    if cfg.videos or cfg.encoder:
        return VideoBackend(cfg)
    return FeatureBackend(cfg)
