"""The features backend: a sample is its rows in the feature folders; each fold trains a fresh head on them."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors.torch import save_file

from expmae.features.common import resolve_device
from expmae.files import atomic_path
from expmae.finetune.config import RUN_KEYS, FinetuneConfig
from expmae.finetune.featureset import FeatureSet, list_feature_names, load_features, parse_feature_specs
from expmae.finetune.heads import TOKEN_HEADS, create_head, is_trainable
from expmae.finetune.training import FitResult, fit_head, predict


class FeatureBackend:
    """Feature-folder mode: how samples load, and how a fold's head is built, trained, applied and saved."""

    run_keys = RUN_KEYS  # settings that change what a fold computes

    def __init__(self, cfg: FinetuneConfig):
        if not cfg.features:
            raise ValueError("at least one feature folder (features) is required, or videos + encoder for end-to-end mode")
        self.cfg = cfg
        self.branches = parse_feature_specs(cfg.features)

    def load(self, names: Sequence[str], missing: str) -> FeatureSet:
        return load_features(self.branches, names, missing=missing, progress=self.cfg.progress,
                             tokens=self.cfg.head in TOKEN_HEADS)

    def available_names(self) -> set[str]:
        """Samples present in every input (the unlabeled pool of pseudo-labelling is drawn from them)."""
        folders = [f for fs in self.branches.values() for f in fs]
        common = set(list_feature_names(folders[0]))
        for folder in folders[1:]:
            common &= set(list_feature_names(folder))
        return common

    def fingerprint(self) -> list:
        """What identifies the inputs beyond the loaded feature values (nothing here)."""
        return []

    def describe(self, train: FeatureSet) -> dict:
        return {"branches": {b: [str(f) for f in fs] for b, fs in self.branches.items()}, "feature_dims": train.dims}

    def fit(self, train: FeatureSet, label: np.ndarray, targets: np.ndarray, val, *, scorer, seed: int, writer=None,
            tag: str = "", checkpoint: Path | None = None, fingerprint: str = ""):
        """A fresh head trained on ``train``; returns (head holding its best state, FitResult). A fold takes
        seconds here, so ``checkpoint`` / ``fingerprint`` (the end-to-end backend's resume state) are not used."""
        cfg = self.cfg
        head = create_head(cfg.head, train.dims, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout, factor_k=cfg.factor_k,
                           num_layers=cfg.head_layers, svm_c=cfg.svm_c, num_classes=len(scorer.classes),
                           num_targets=len(scorer.target_names))
        if not is_trainable(head):  # scikit-learn: one fit, no epochs
            head.fit(train.arrays, label)
            best = {}
            if val is not None:
                probs, regression = head.predict(val[0].arrays)
                best = scorer(val[1], probs, val[2], regression)
            return head, FitResult(0, best, [{"epoch": 0, **best}], {})
        head = head.to(resolve_device(cfg.device))
        fit = fit_head(head, train, label, targets, val, scorer=scorer, epochs=cfg.epochs, batch_size=cfg.batch_size,
                       lr=cfg.lr, weight_decay=cfg.weight_decay, valence_weight=cfg.valence_weight, seed=seed,
                       writer=writer, tag=tag)
        return head, fit

    def predict(self, model, features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (N, C) and regression columns (N, R)."""
        return predict(model, features) if is_trainable(model) else model.predict(features.arrays)

    def save(self, model, fit: FitResult, run_dir: Path) -> None:
        """head.safetensors (a torch head's best state); a scikit-learn head leaves only its predictions."""
        if not fit.state_dict:
            return
        with atomic_path(run_dir / "head.safetensors") as tmp:
            save_file({n: v.contiguous().cpu() for n, v in fit.state_dict.items()}, str(tmp))
