"""Trivial predictors of masked patches, scored in the model's own loss space: what a pretrained model's held-out
reconstruction loss must beat before it says anything (``make demo`` reports them beside the model).

``patch_mean`` predicts every masked patch as its own mean colour; ``copy_visible`` copies the nearest visible patch
of the same clip. Both use the model's targets and the masks its forward pass drew, so the losses compare number
for number. What each is worth and the distance rule: docs/guides/benchmarks.md.
"""
from __future__ import annotations

import torch

PREDICTORS = ("patch_mean", "copy_visible")


def grid_coordinates(grid: tuple[int, ...], device=None) -> torch.Tensor:
    """(prod(grid), len(grid)) integer coordinates of every token of a grid, in token (row-major) order."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def nearest_visible(mask: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """For masks (B, N) (True = masked, at least one visible per sample) on a token grid of shape ``grid``
    (prod = N): (B, N) index of each token's nearest visible token (itself when visible); squared Euclidean distance
    in grid steps, ties to the lowest token index."""
    B, N = mask.shape
    coords = grid_coordinates(grid, mask.device)
    if coords.shape[0] != N:
        raise ValueError(f"mask: {N} tokens per sample, but grid {grid} has {coords.shape[0]}")
    if bool(mask.all(dim=1).any()):
        raise ValueError("mask: a sample has no visible token to copy from")
    distance = (coords[:, None, :] - coords[None, :, :]).square().sum(dim=-1)  # (N, N) exact integers
    far = torch.iinfo(distance.dtype).max
    # one sample at a time: N x N per sample stays small for ViT-B clips (1568 tubelets), B x N x N need not;
    # argmin returns the first minimal index: the tie-break
    return torch.stack([distance.masked_fill(m[None, :], far).argmin(dim=-1) for m in mask])


def predict(target: torch.Tensor, mask: torch.Tensor, grid: tuple[int, ...], predictor: str) -> torch.Tensor:
    """(B, M, D) predictions of the masked tokens (token order, as the model's pred_*) from all tokens' targets
    (B, N, D) in normalised-pixel space and the mask (B, N)."""
    B, N, D = target.shape
    if predictor == "patch_mean":
        return target.new_zeros(B, int(mask[0].sum()), D)
    if predictor == "copy_visible":
        source = nearest_visible(mask, grid)  # (B, N)
        copied = torch.gather(target, 1, source[..., None].expand(B, N, D))
        return copied[mask].reshape(B, -1, D)
    raise ValueError(f"predictor {predictor!r}: expected one of {', '.join(PREDICTORS)}")


def baseline_losses(model, clips: torch.Tensor, out: dict, predictor: str) -> dict[str, torch.Tensor]:
    """loss_mae / loss_video / loss (weighted as the model weighs them) of ``predictor`` on ImageNet-normalised
    float32 clips (B, C, T, H, W), with the masks and MAE frames the model's forward ``out`` drew on them."""
    cfg = model.cfg
    if not cfg.norm_pix_loss:
        raise ValueError(f"{predictor}: the trivial predictors are defined in normalised-pixel space; the model has "
                         "norm_pix_loss=False")
    g = cfg.grid_size
    losses = {}
    if "mask_mae" in out:
        B = clips.shape[0]
        frames = clips.transpose(1, 2)[torch.arange(B, device=clips.device), out["frame_idx"]]  # (B, C, H, W)
        target = model.mae_target(frames)  # (B, N, p*p*C) all patches
        pred = predict(target, out["mask_mae"], (1, g, g), predictor)
        losses["loss_mae"] = torch.nn.functional.mse_loss(pred, target[out["mask_mae"]].reshape(pred.shape))
    if "mask_video" in out:
        target = model.video_target(clips)  # (B, T' * N, t*p*p*C) all tubelets
        pred = predict(target, out["mask_video"], (clips.shape[2] // cfg.tubelet_size, g, g), predictor)
        losses["loss_video"] = torch.nn.functional.mse_loss(pred, target[out["mask_video"]].reshape(pred.shape))
    losses["loss"] = model.weighted_loss(losses)
    return losses
