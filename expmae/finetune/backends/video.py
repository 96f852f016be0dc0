"""End-to-end finetuning of an exported encoder (``expmae-finetune --videos --encoder``): the protocol's
:class:`VideoBackend` loads face clips, trains a fold's encoder + fusion head (``video_model``) with warmup + cosine
lr, evaluates it over ``test_views`` windows per clip (``video_data``), saves it, and resumes a fold after its last
finished epoch (each epoch's data order and augmentation depend on (seed, epoch) only, so a resumed fold ends as an
uninterrupted one).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from expmae.data import VideoClipDataset, normalize_clips
from expmae.features.common import resolve_device
from expmae.files import JsonlLog, atomic_path
from expmae.finetune import heads  # heads.task_loss looked up per call: the tests wrap it
from expmae.finetune.backends.resume import FoldCheckpoint
from expmae.finetune.backends.video_data import EvalViews, epoch_seed, index_videos
from expmae.finetune.backends.video_model import (VIDEO_BRANCH, VideoFusionModel, check_unfreeze_blocks,
                                                  layer_decay_param_groups, load_finetune_encoder)
from expmae.finetune.common import digest, log
from expmae.finetune.config import RUN_KEYS, FinetuneConfig
from expmae.finetune.featureset import FeatureSet, list_feature_names, load_features, parse_feature_specs
from expmae.finetune.training import FitResult, fit_epochs
from expmae.model_config import DEFAULT_SAMPLE_STRIDE
from expmae.optim import cosine_lr, set_lr
from expmae.weights import CONFIG_NAME, read_encoder_config, save_encoder


class VideoBackend:
    """End-to-end mode of expmae.finetune: samples are face clips (+ optional feature folders); a fold
    finetunes a copy of the pretrained encoder together with a fresh fusion head."""

    run_keys = RUN_KEYS + ("freeze_encoder", "layer_decay", "warmup_epochs", "min_lr", "drop_path",
                            "sample_stride", "augment", "precision")

    def __init__(self, cfg: FinetuneConfig):
        if not (cfg.videos and cfg.encoder):
            raise ValueError(f"end-to-end mode needs both videos (face clips) and encoder (an expmae-export folder); "
                             f"got videos={cfg.videos!r}, encoder={cfg.encoder!r}")
        if cfg.head == "svm":
            raise ValueError("head 'svm' is fit on precomputed features; end-to-end finetuning needs a trained head "
                             "(attention, attentive, mfb, concat, transformer)")
        if cfg.missing == "zero":
            raise ValueError("missing='zero' zero-fills feature files; in end-to-end mode a sample needs its clip: "
                             "use missing='drop' or 'error'")
        if not 0 <= cfg.min_lr <= cfg.lr:  # the field checks ran in FinetuneConfig; this one spans two
            raise ValueError(f"min_lr={cfg.min_lr!r}: expected in [0, lr={cfg.lr}]")
        self.cfg = cfg
        # Evaluation picks the best epoch, so test_views is part of a fold's fingerprint; these settings join it
        # only away from their defaults, so that folds finished or checkpointed before they existed stay valid.
        self.run_keys = type(self).run_keys + tuple(k for k, default in (("test_views", 1), ("unfreeze_blocks", -1))
                                                    if getattr(cfg, k) != default)
        self.branches = parse_feature_specs(cfg.features) if cfg.features else {}
        if VIDEO_BRANCH in self.branches:
            raise ValueError(f"feature branch {VIDEO_BRANCH!r} is the encoder's in end-to-end mode; "
                             "name the feature folder another branch (BRANCH=FOLDER)")
        self.videos = index_videos(cfg.videos)
        self.pretrained = load_finetune_encoder(cfg.encoder, cfg.drop_path).cpu()  # each fold trains a copy
        self.unfreeze_blocks = check_unfreeze_blocks(cfg.unfreeze_blocks, self.pretrained.cfg.depth, cfg.freeze_encoder)
        self.encoder_info = _encoder_folder_info(cfg.encoder)
        self.sample_stride = int(cfg.sample_stride or self.encoder_info.get("sample_stride") or DEFAULT_SAMPLE_STRIDE)
        self.device = resolve_device(cfg.device)
        self.failure_log = Path(cfg.out_dir) / "clip_failures.jsonl"
        self._failed: dict[str, str] = {}  # evaluation failures already reported

    # ---- samples
    def load(self, names: Sequence[str], missing: str) -> FeatureSet:
        names = list(names)
        absent = [n for n in names if n not in self.videos]
        if absent and missing == "error":
            raise ValueError(f"{self.cfg.videos}: no clip for {len(absent)} of {len(names)} samples (first: {absent[0]}); "
                             "use missing='drop'")
        present = [n for n in names if n in self.videos]
        if not present:
            example = next(iter(self.videos), None)
            raise ValueError(f"{self.cfg.videos}: none of the {len(names)} requested samples has a clip "
                             f"(clips are matched by file stem, e.g. {example!r}; requested e.g. {names[0]!r})")
        if self.branches:
            features = load_features(self.branches, present, missing=missing, progress=self.cfg.progress)
        else:
            features = FeatureSet(present, {})
        if absent:
            features.missing = {str(self.cfg.videos): absent, **features.missing}
        return features

    def available_names(self) -> set[str]:
        names = set(self.videos)
        for folders in self.branches.values():
            for folder in folders:
                names &= set(list_feature_names(folder))
        return names

    def fingerprint(self) -> list:
        """The pretrained weights and the clip files (size, mtime): a changed input retrains finished folds."""
        weights = digest(*(v.numpy() for v in self.pretrained.state_dict().values()), list(self.pretrained.state_dict()))
        clips = []
        for name, path in sorted(self.videos.items()):
            st = path.stat()
            clips.append([name, st.st_size, st.st_mtime_ns])
        return [weights, digest(clips), self.sample_stride]

    def describe(self, train: FeatureSet) -> dict:
        enc = self.pretrained.cfg
        return {
            "branches": {VIDEO_BRANCH: [str(self.cfg.videos)], **{b: [str(f) for f in fs] for b, fs in self.branches.items()}},
            "feature_dims": {VIDEO_BRANCH: enc.embed_dim, **train.dims},
            "end_to_end": {
                "encoder": str(self.cfg.encoder), "model_name": self.encoder_info.get("model_name"),
                "encoder_config": {k: getattr(enc, k) for k in ("embed_dim", "depth", "num_heads", "patch_size",
                                                                 "tubelet_size", "img_size", "num_frames")},
                "frozen": self.unfreeze_blocks == 0, "unfreeze_blocks": self.unfreeze_blocks,
                "drop_path_rate": enc.drop_path_rate,
                "sample_stride": self.sample_stride, "test_views": self.cfg.test_views, "num_clips": len(self.videos),
                # records in the (append-only) log, earlier runs into this folder included
                "clip_failures": len(JsonlLog(self.failure_log).read()), "clip_failures_log": str(self.failure_log),
            },
        }

    # ---- one fold
    def build_model(self, in_dims: Mapping[str, int], num_classes: int = 6, num_targets: int = 1) -> VideoFusionModel:
        """A fresh head on a fresh copy of the pretrained encoder, on the device."""
        cfg = self.cfg
        head = heads.create_head(cfg.head, {VIDEO_BRANCH: self.pretrained.cfg.embed_dim, **in_dims},
                           hidden_dim=cfg.hidden_dim, dropout=cfg.dropout, factor_k=cfg.factor_k,
                           num_layers=cfg.head_layers, num_classes=num_classes, num_targets=num_targets)
        model = VideoFusionModel(copy.deepcopy(self.pretrained), head, unfreeze_blocks=self.unfreeze_blocks)
        return model.to(self.device)

    def _train_loader(self, train: FeatureSet, seed: int):
        """(dataset, DataLoader, its generator) of ``train``'s clips; items are (clip, row in ``train``)."""
        cfg, enc = self.cfg, self.pretrained.cfg
        # labels = row numbers: a clip that fails to load is replaced by another clip *with that clip's row*
        augment = {} if cfg.augment else {"scales": (1.0,), "flip": False}
        clips = VideoClipDataset([str(self.videos[n]) for n in train.names], enc.num_frames, self.sample_stride,
                                 enc.img_size, train=True, seed=seed, labels={n: i for i, n in enumerate(train.names)},
                                 failure_log=self.failure_log, **augment)
        # Reseeded every epoch (epoch_seed): the shuffle and the workers' base seed both draw from it.
        generator = torch.Generator()
        loader = torch.utils.data.DataLoader(clips, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
                                             generator=generator, pin_memory=self.device.type == "cuda")
        return clips, loader, generator

    def fit(self, train: FeatureSet, label: np.ndarray, targets: np.ndarray, val=None, *, scorer, seed: int,
            writer=None, tag: str = "", checkpoint: Path | None = None,
            fingerprint: str = "") -> tuple[VideoFusionModel, FitResult]:
        """Finetune encoder + head on ``train`` (class ``label``, regression ``targets`` (N, R)); returns (model
        holding its best epoch's state by ``scorer``'s metric on ``val``, FitResult).

        With ``checkpoint`` (a file path), the state after every epoch is saved there (:class:`FoldCheckpoint`,
        keyed by ``fingerprint``), and a checkpoint of the same fingerprint found there is continued from."""
        cfg = self.cfg
        model = self.build_model(train.dims, len(scorer.classes), len(scorer.target_names))
        # Precomputed branches are standardised with training-split statistics, as in feature mode; the visual
        # branch is normalised by the model's fc_norm instead.
        model.head.set_input_stats({k: (torch.from_numpy(a.mean(0)), torch.from_numpy(a.std(0)))
                                    for k, a in train.arrays.items()})
        optimizer = torch.optim.AdamW(layer_decay_param_groups(model, weight_decay=cfg.weight_decay,
                                                               layer_decay=cfg.layer_decay), lr=cfg.lr)
        fold_checkpoint = FoldCheckpoint(checkpoint, fingerprint, tag=tag) if checkpoint is not None else None
        resumed = fold_checkpoint.load(model, optimizer) if fold_checkpoint is not None else None
        progress = {"step": resumed[1] if resumed is not None else 0}  # optimizer steps: the lr schedule's position
        run_epoch = self._epoch_runner(model, optimizer, train, label, targets, seed, tag, progress)

        def save_checkpoint(loop: dict) -> None:
            fold_checkpoint.save(loop, model, optimizer, step=progress["step"])

        def evaluate() -> dict[str, float]:
            probs, regression = self.predict(model, val[0])
            return scorer(val[1], probs, val[2], regression)

        return model, fit_epochs(model, run_epoch, epochs=cfg.epochs, evaluate=evaluate if val is not None else None,
                                 score=scorer.score, writer=writer, tag=tag,
                                 resume=resumed[0] if resumed is not None else None,
                                 on_epoch_end=save_checkpoint if fold_checkpoint is not None else None)

    def _epoch_runner(self, model, optimizer, train: FeatureSet, label, targets, seed: int, tag: str,
                      progress: dict) -> Callable[[int], dict[str, float]]:
        """``run_epoch(epoch)`` for fit_epochs: one pass over the training clips, warmup + cosine lr per step."""
        cfg = self.cfg
        clips, loader, generator = self._train_loader(train, seed)
        features = {k: torch.from_numpy(a) for k, a in train.arrays.items()}
        y_label = torch.as_tensor(np.asarray(label), dtype=torch.int64)
        y_targets = torch.as_tensor(np.asarray(targets), dtype=torch.float32).reshape(len(train), -1)
        schedule = dict(peak_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=round(cfg.warmup_epochs * len(loader)),
                        total_steps=cfg.epochs * len(loader))

        def run_epoch(epoch: int) -> dict[str, float]:
            model.train()
            clips.set_epoch(epoch)
            generator.manual_seed(epoch_seed(seed, epoch))
            total, seen, lr = 0.0, 0, cfg.lr
            # tqdm.auto's class calls iter() on an iterable it is given and then again when looped over (tqdm
            # issue #1598): two DataLoader iterators, i.e. workers started twice and two draws from the generator.
            # Handing it the one iterator avoids both.
            batches = tqdm(iter(loader), total=len(loader), desc=f"{tag} epoch {epoch}", disable=not cfg.progress,
                           leave=False, unit="batch")
            for batch, rows in batches:
                if len(rows) < 2 and len(clips) > 1:  # as fit_head: a batch of one adds noise only
                    continue
                lr = cosine_lr(progress["step"], **schedule)
                set_lr(optimizer, lr)
                with self._autocast():
                    out = model(self._normalize(batch), {k: v[rows].to(self.device) for k, v in features.items()})
                loss, _ = heads.task_loss(out, y_label[rows].to(self.device), y_targets[rows].to(self.device), cfg.valence_weight)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{tag}: non-finite loss at epoch {epoch}, step {progress['step']} (lr {lr:.3g}); "
                                       "lower lr or use precision fp32")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress["step"] += 1
                total, seen = total + loss.item() * len(rows), seen + len(rows)
            return {"train_loss": total / max(seen, 1), "lr": lr}

        return run_epoch

    @torch.no_grad()
    def predict(self, model: VideoFusionModel, features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (N, C) and regression columns (N, R), in eval mode: each sample's mean over its
        evaluation views (``test_views``; each view counts once, a short clip has fewer). A clip that fails to load
        gets the uniform distribution and regression 0."""
        num_classes = model.head.num_classes
        # Sums over each sample's views so far, divided at the end: views of one sample may span two batches.
        probs = np.zeros((len(features), num_classes), np.float32)
        regression = np.zeros((len(features), model.head.num_targets), np.float32)
        views = np.zeros(len(features), np.int64)
        arrays = {k: torch.from_numpy(a) for k, a in features.arrays.items()}
        model.eval()
        for rows, clips in self._eval_batches(features.names):
            with self._autocast():
                out = model(clips, {k: v[rows].to(self.device) for k, v in arrays.items()})
            np.add.at(probs, rows, out["logits"].float().softmax(1).cpu().numpy())
            np.add.at(regression, rows, out["regression"].float().cpu().numpy())
            np.add.at(views, rows, 1)
        seen = views > 0
        probs[seen] /= views[seen, None]
        regression[seen] /= views[seen, None]
        probs[~seen] = 1.0 / num_classes
        return probs, regression

    def save(self, model: VideoFusionModel, fit: FitResult, run_dir: Path) -> None:
        # fc_norm + head: what turns the encoder's mean-pooled tokens into predictions
        head = {k: v.contiguous().cpu() for k, v in fit.state_dict.items() if not k.startswith("encoder.")}
        with atomic_path(run_dir / "head.safetensors") as tmp:
            save_file(head, str(tmp))
        if self.unfreeze_blocks != 0:
            save_encoder(model.encoder, run_dir / "encoder", overwrite=True, sample_stride=self.sample_stride,
                         model_name=self.encoder_info.get("model_name"),
                         source={"finetuned_from": str(Path(self.cfg.encoder).resolve()), "run": str(run_dir.resolve())})

    # ---- helpers
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def _normalize(self, clips: torch.Tensor) -> torch.Tensor:
        enc = self.pretrained.cfg
        return normalize_clips(clips.to(self.device, non_blocking=True), mean=enc.mean, std=enc.std)

    def _eval_batches(self, names: Sequence[str]):
        """Yield (rows, normalised clips on the device) of the evaluation views of ``names``, in order,
        ``batch_size`` clips at a time (the last batch fewer): clip i is a view of sample ``rows[i]`` (numpy), and
        a sample's views may span two batches. A clip that fails to load has no views; it is recorded once in
        the failure log."""
        enc, size = self.pretrained.cfg, self.cfg.batch_size
        views = EvalViews([str(self.videos[n]) for n in names], enc.num_frames, self.sample_stride, enc.img_size,
                           self.cfg.test_views)
        # One item per sample (all its views: the clip is opened once), regrouped below into batches of clips.
        loader = torch.utils.data.DataLoader(views, batch_size=None, num_workers=self.cfg.workers)
        queued_rows: list[int] = []  # views loaded but not yet run: fewer than batch_size + test_views
        queued: list[torch.Tensor] = []
        samples = tqdm(iter(loader), total=len(views), desc="evaluating", disable=not self.cfg.progress, leave=False,
                       unit="sample")
        for row, clips, reason in samples:
            if reason:
                self._record_eval_failure(names[row], reason)
                continue
            queued_rows += [row] * len(clips)
            queued.append(clips)
            while len(queued_rows) >= size:
                clips = torch.cat(queued)
                yield np.array(queued_rows[:size]), self._normalize(clips[:size])
                queued_rows, queued = queued_rows[size:], [clips[size:]]
        if queued_rows:
            yield np.array(queued_rows), self._normalize(torch.cat(queued))

    def _record_eval_failure(self, name: str, reason: str) -> None:
        if name in self._failed:  # evaluated every epoch: reported once
            return
        self._failed[name] = reason
        log(f"[clips] {name}: {reason} (evaluated as a uniform prediction)")
        JsonlLog(self.failure_log).append({"key": name, "path": str(self.videos[name]), "stage": "evaluation",
                                           "reason": reason})


def _encoder_folder_info(path: str | os.PathLike) -> dict:
    """model_name and pretraining sample_stride recorded in an encoder folder's config.json ({} for a checkpoint)."""
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        return {}
    expmae = read_encoder_config(folder)["expmae"]
    return {"model_name": expmae.get("model_name"), "sample_stride": (expmae.get("clip") or {}).get("sample_stride")}
