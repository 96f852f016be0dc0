"""Training a head: the epoch loop both backends share, the feature-mode head trainer, and prediction."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from expmae.finetune.featureset import FeatureSet, input_stats
from expmae.finetune.heads import task_loss


@dataclass
class FitResult:
    best_epoch: int
    best: dict[str, float]  # validation metrics at the best epoch (empty without validation)
    history: list[dict[str, float]]
    state_dict: dict


# fit_epochs' state after a finished epoch: what a resumed loop needs besides the model and optimizer.
LOOP_KEYS = ("epoch", "best_epoch", "best", "best_score", "best_state", "history")


def predict(head, features: FeatureSet, *, batch_size: int = 1024, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) and regression columns (N, R) in eval mode."""
    device = device or next(head.parameters()).device
    head.eval()
    probs, regression = [], []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = {k: torch.from_numpy(a[start:start + batch_size]).to(device) for k, a in features.arrays.items()}
            out = head(batch)
            probs.append(out["logits"].float().softmax(1).cpu().numpy())
            regression.append(out["regression"].float().cpu().numpy())
    if not probs:
        return np.zeros((0, head.num_classes), np.float32), np.zeros((0, head.num_targets), np.float32)
    return np.concatenate(probs), np.concatenate(regression)


def fit_epochs(model, run_epoch, *, epochs: int, evaluate=None, score=None, writer=None, tag: str = "",
               resume: dict | None = None, on_epoch_end=None) -> FitResult:
    """The epoch loop of both backends: ``run_epoch(epoch)`` trains one epoch and returns its scalars (train_loss,
    ...); ``evaluate()`` returns the held-out split's metrics after every epoch and ``score(metrics)`` ranks them
    (larger is better). The state of the best epoch is kept (the last epoch's without evaluation); ``model`` is
    left holding it.

    Resuming (end-to-end backend): ``on_epoch_end(loop)`` gets the loop's state after every epoch (keys
    :data:`LOOP_KEYS`: the finished ``epoch``, best so far, ``history``), and ``resume``, such a state saved
    earlier, continues after its epoch; restoring the model, optimizer and RNG is the caller's part."""
    best_epoch, best, best_score, best_state, history = -1, {}, -math.inf, None, []
    start = 0
    if resume is not None:
        best_epoch, best, best_score, best_state, history = (resume[k] for k in LOOP_KEYS[1:])
        start = resume["epoch"] + 1
    for epoch in range(start, epochs):
        scalars = run_epoch(epoch)
        record = {"epoch": epoch, **scalars}
        if evaluate is not None:
            metrics = evaluate()
            record.update(metrics)
            value = score(metrics)
            if value > best_score:
                best_epoch, best, best_score = epoch, dict(metrics), value
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if writer is not None:
            for key, value in record.items():
                if key != "epoch" and math.isfinite(value):
                    writer.add_scalar(f"{tag}/{key}", value, epoch)
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(dict(zip(LOOP_KEYS, (epoch, best_epoch, best, best_score, best_state, history))))
    if best_state is None:
        best_epoch, best_state = epochs - 1, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return FitResult(best_epoch, best, history, best_state)


def fit_head(head, train: FeatureSet, label: np.ndarray, targets: np.ndarray, val=None, *, scorer=None,
             epochs: int = 100, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 1e-5,
             valence_weight: float = 1.0, seed: int = 0, writer=None, tag: str = "") -> FitResult:
    """Train a torch ``head`` with Adam on CE + lambda * MSE (regression columns ``targets`` (N,) or (N, R), NaN =
    unknown); with ``val = (features, label, targets)`` and a ``scorer`` (expmae.finetune.metrics.Scorer) keep the
    epoch with the best held-out metric (else the last).

    Input standardisation statistics come from ``train`` only. ``head`` is left holding the returned state.
    """
    device = next(head.parameters()).device
    head.set_input_stats({k: tuple(map(torch.from_numpy, input_stats(a))) for k, a in train.arrays.items()})
    x = {k: torch.from_numpy(a).to(device) for k, a in train.arrays.items()}
    y_label = torch.from_numpy(np.asarray(label, dtype=np.int64)).to(device)
    y_targets = torch.from_numpy(np.asarray(targets, dtype=np.float32).reshape(len(train), -1)).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)

    def run_epoch(epoch: int) -> dict[str, float]:
        head.train()
        order = torch.randperm(len(train), generator=generator).to(device)
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2 and len(order) > 1:  # a batch of one adds noise only; its samples are in other epochs
                continue
            loss, _ = task_loss(head({k: v[idx] for k, v in x.items()}), y_label[idx], y_targets[idx], valence_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        return {"train_loss": total / max(seen, 1)}

    evaluate = None
    if val is not None and scorer is not None:
        def evaluate():
            probs, regression = predict(head, val[0], device=device)
            return scorer(val[1], probs, np.asarray(val[2], np.float32).reshape(len(val[0]), -1), regression)
    return fit_epochs(head, run_epoch, epochs=epochs, evaluate=evaluate, score=scorer.score if scorer else None,
                      writer=writer, tag=tag)
