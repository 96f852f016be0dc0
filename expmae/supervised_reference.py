"""The learning benchmark's ceiling: the same encoder trained end to end on labelled clips of one task.

A self-supervised curve says little until it is placed between two levels: what an untrained encoder gives (the
random-init band) and what a trained one reaches (this). The encoder is the pretraining config's, built from the
same init seed; its tokens, mean-pooled (as ``expmae-features`` pools) or kept per patch position (averaged over
time, the probes' position read-out), feed a linear head, trained with AdamW, a warmup + cosine schedule and
VideoMAE's crop/flip augmentation. Every ``eval_every`` steps the head is scored on
the held-out people (``curve.jsonl``), so a run shows how far from its ceiling it still is.

A run resumes exactly: ``state.pt`` (weights, optimizer, step, RNG) is written every ``save_every`` steps, the
sample order and augmentation are functions of (seed, epoch, index), and a rerun continues from the state.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from expmae.data import VideoClipDataset, normalize_clips
from expmae.files import JsonlLog, atomic_path, write_json
from expmae.model import create_model
from expmae.optim import cosine_lr, set_lr
from expmae.probe import accuracy_interval
from expmae.weights import load_encoder


@dataclasses.dataclass(frozen=True)
class SupervisedRecipe:
    """How the reference trains. A saved state is resumed only by the same recipe (:meth:`identity`)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 200
    model: str = "encoder"  # the pretraining config's encoder + a linear head, or "frame_cnn" (see FrameCNN)
    readout: str = "mean"  # the head's input: "mean" over all tokens, or "position" (time-averaged, per patch)
    init: str = ""  # "": the init seed's random weights; a checkpoint / encoder folder: finetune that encoder instead
    eval_every: int = 250
    save_every: int = 250
    seed: int = 0

    def identity(self) -> dict:
        """The fields that change the trained weights (how often it scores and saves does not)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("eval_every", "save_every")}


class EncoderClassifier(torch.nn.Module):
    """The encoder and a linear head on its mean-pooled or per-position (time-averaged, per patch) tokens."""

    def __init__(self, encoder: torch.nn.Module, readout: str, num_classes: int):
        super().__init__()
        if readout not in ("mean", "position"):
            raise ValueError(f"readout={readout!r}; expected 'mean' or 'position'")
        self.encoder, self.readout, cfg = encoder, readout, encoder.cfg
        self.positions = (cfg.img_size // cfg.patch_size) ** 2
        self.head = torch.nn.Linear(cfg.embed_dim * (self.positions if readout == "position" else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_clips(x)[:, self.encoder.num_prefix_tokens:]  # (B, L, D), L = T' * N
        if self.readout == "mean":
            return self.head(tokens.mean(1))
        B, L, D = tokens.shape
        per_position = tokens.view(B, L // self.positions, self.positions, D).mean(1)  # (B, N, D): mean over time
        return self.head(per_position.flatten(1))  # (B, N * D)


class FrameCNN(torch.nn.Module):
    """Four conv blocks (32-64-128-128, BatchNorm, ReLU) on frames: trained on one random frame per clip, scored
    on the mean of every frame's logits.

    Not the encoder: a model with convolution's locality prior and no pretraining, which shows whether a task's
    labels can be learned from its pixels at all. Frame-level, so it cannot read frame order (the dynamic task)."""

    def __init__(self, num_classes: int, in_chans: int = 3):
        super().__init__()
        layers, width = [], in_chans
        for i, out in enumerate((32, 64, 128, 128)):
            layers += [torch.nn.Conv2d(width, out, 3, padding=1), torch.nn.BatchNorm2d(out), torch.nn.ReLU()]
            layers.append(torch.nn.MaxPool2d(2) if i < 3 else torch.nn.AdaptiveAvgPool2d(1))
            width = out
        self.net = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        if self.training:  # one random frame per clip: T times cheaper, and a frame classifier needs no more
            t = torch.randint(T, (B,), device=x.device)
            return self.net(x[torch.arange(B, device=x.device), :, t])  # (B, C, H, W) -> (B, classes)
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)  # (B * T, C, H, W)
        return self.net(frames).view(B, T, -1).mean(1)  # (B, classes): scored on every frame


class SupervisedReference:
    """Train (or resume) one task's reference in ``folder``; :meth:`run` returns the trained encoder, in eval mode.

    ``cfg``: the pretraining config (its model and frame sampling). ``train`` / ``test``: ``(clip source,
    {name: label})`` as :class:`expmae.data.VideoClipDataset` takes them.
    """

    def __init__(self, cfg, train: tuple, test: tuple, folder, recipe: SupervisedRecipe = SupervisedRecipe(),
                 device="cpu", num_workers: int = 0):
        self.cfg, self.recipe, self.device, self.folder = cfg, recipe, torch.device(device), Path(folder)
        self.num_workers = num_workers
        self.classes = sorted(set(train[1].values()))
        self.classifier, self.mcfg = self.build(cfg, recipe, len(self.classes))
        self.classifier.to(self.device)
        clip_args = dict(num_frames=self.mcfg.num_frames, sample_stride=cfg.data.sample_stride,
                         input_size=self.mcfg.img_size)
        self.train_set = VideoClipDataset(train[0], train=True, seed=recipe.seed, labels=train[1], **clip_args)
        self.test_set = VideoClipDataset(test[0], train=False, labels=test[1], **clip_args)
        self.optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.step, self.seconds = 0, 0.0
        self.curve = JsonlLog(self.folder / "curve.jsonl")

    @staticmethod
    def build(cfg, recipe: SupervisedRecipe, num_classes: int):
        """(classifier, the model config whose frames and normalisation it reads)."""
        torch.manual_seed(recipe.seed)  # the init of the pretraining run with this seed (train.seed)
        model = create_model(cfg.model.name, **cfg.model.overrides())
        if recipe.model == "frame_cnn":
            return FrameCNN(num_classes, model.cfg.in_chans), model.cfg
        if recipe.model != "encoder":
            raise ValueError(f"model={recipe.model!r}; expected 'encoder' or 'frame_cnn'")
        if recipe.init:  # the same recipe from pretrained weights: MAE's finetune-vs-from-scratch comparison
            model.encoder.load_state_dict(load_encoder(recipe.init).state_dict())
        return EncoderClassifier(model.encoder, recipe.readout, num_classes), model.cfg

    @property
    def encoder(self) -> torch.nn.Module | None:
        return getattr(self.classifier, "encoder", None)

    # ------------------------------------------------------------------------------------------ state
    def state_path(self) -> Path:
        return self.folder / "state.pt"

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"classifier": self.classifier.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "seconds": self.seconds, "torch_rng": torch.get_rng_state(),
                 "recipe": self.recipe.identity()}
        with atomic_path(self.state_path()) as tmp:
            torch.save(state, tmp)

    def load(self) -> bool:
        """Continue from ``state.pt`` if there is one of this recipe; False if there is none."""
        if not self.state_path().is_file():
            return False
        state = torch.load(self.state_path(), map_location=self.device, weights_only=True)
        if state["recipe"] != self.recipe.identity():
            raise ValueError(f"{self.state_path()}: written by another recipe ({state['recipe']}), not "
                             f"{self.recipe.identity()}; use another folder or remove it")
        self.classifier.load_state_dict(state["classifier"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        torch.set_rng_state(state["torch_rng"])
        return True

    # ------------------------------------------------------------------------------------------ training
    def batches(self, step: int):
        """The batches from optimizer step ``step`` to the end of its epoch: a fixed order per (seed, epoch)."""
        per_epoch = len(self.train_set) // self.recipe.batch_size
        if per_epoch < 1:
            raise ValueError(f"{len(self.train_set)} labelled clips: fewer than batch_size={self.recipe.batch_size}")
        epoch, offset = divmod(step, per_epoch)
        self.train_set.set_epoch(epoch)
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(
            self.recipe.seed * 1_000_003 + epoch)).tolist()
        b = self.recipe.batch_size
        sampler = [order[i * b : (i + 1) * b] for i in range(offset, per_epoch)]
        return self.loader(self.train_set, batch_sampler=sampler)

    def loader(self, dataset, **kwargs) -> torch.utils.data.DataLoader:
        # its own generator: a loader seeds its workers from the global RNG otherwise, and a resumed run, which
        # opens a loader where the straight run did not, would then draw other dropout / drop-path masks
        return torch.utils.data.DataLoader(dataset, num_workers=self.num_workers,
                                           generator=torch.Generator().manual_seed(self.recipe.seed), **kwargs)

    def train_step(self, clips: torch.Tensor, labels) -> float:
        r = self.recipe
        lr = cosine_lr(self.step, peak_lr=r.lr, min_lr=r.min_lr, warmup_steps=r.warmup_steps, total_steps=r.steps)
        set_lr(self.optimizer, lr)
        target = torch.tensor([self.classes.index(y) for y in labels], device=self.device)
        loss = F.cross_entropy(self.logits(clips), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def logits(self, clips: torch.Tensor) -> torch.Tensor:
        return self.classifier(normalize_clips(clips.to(self.device), mean=self.mcfg.mean, std=self.mcfg.std))

    @torch.no_grad()
    def head_accuracy(self) -> float:
        """The trained head's accuracy on the held-out people (centre crop, no flip)."""
        self.classifier.eval()
        loader = self.loader(self.test_set, batch_size=64)
        correct = sum(sum(self.classes[i] == y for i, y in zip(self.logits(x).argmax(1).tolist(), labels))
                      for x, labels in loader)
        self.classifier.train()
        return correct / len(self.test_set)

    def run(self, progress: bool = True) -> torch.nn.Module | None:
        """Train to ``recipe.steps`` (from the saved state, if any); the encoder comes back in eval mode (None
        for the frame CNN)."""
        self.load()
        self.classifier.train()
        r = self.recipe
        bar = tqdm(total=r.steps, initial=self.step, disable=not progress, desc="supervised reference", unit="step")
        losses, last = [], time.perf_counter()
        while self.step < r.steps:
            for clips, labels in self.batches(self.step):
                losses.append(self.train_step(clips, labels))
                bar.update(1)
                now = time.perf_counter()
                self.seconds, last = self.seconds + now - last, now  # training time: held-out scoring left out
                if self.step % r.eval_every == 0 or self.step == r.steps:
                    self.log(losses)
                    losses = []
                if self.step % r.save_every == 0 or self.step == r.steps:
                    self.save()
                last = time.perf_counter()
                if self.step >= r.steps:
                    break
        bar.close()
        self.classifier.eval()
        return self.encoder

    def log(self, losses: list[float]) -> None:
        acc = self.head_accuracy()
        record = {"step": self.step, "train_loss": sum(losses) / max(1, len(losses)), "head_acc": acc,
                  "seconds": round(self.seconds, 1)}
        done = {r["step"] for r in self.curve.read()}
        if self.step not in done:  # a resumed run does not log a step twice
            self.curve.append(record)
        tqdm.write(f"[supervised reference] step {self.step}: loss {record['train_loss']:.3f}, "
                   f"held-out head accuracy {acc:.3f}")

    def summary(self) -> dict:
        logged = {r["step"]: r["head_acc"] for r in self.curve.read()}
        acc = logged[self.step] if self.step in logged else self.head_accuracy()
        low, high = accuracy_interval(acc, len(self.test_set))
        summary = {"head_acc": acc, "head_acc_ci95": [low, high], "steps": self.step,
                   "train_clips": len(self.train_set), "test_clips": len(self.test_set),
                   "seconds": round(self.seconds, 1), "recipe": dataclasses.asdict(self.recipe)}
        write_json(self.folder / "summary.json", summary)
        return summary
