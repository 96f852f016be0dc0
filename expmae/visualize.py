"""Reconstruction grids: what a pretrained expMAE makes of masked face clips, as a picture.

Per clip, one row for the MAE branch (frame | masked | prediction) and rows for the VideoMAE branch's target,
masked and predicted clip; predictions are pasted into the masked patches only, as in the MAE demo. Training
writes one every ``log.recon_every`` steps; ``expmae-visualize RUN CLIPS --out recon.png`` draws one for any
checkpoint (``--seed`` fixes the masks; ``--loss-draws N`` / ``--baselines`` print losses as one JSON line).
Usage: docs/guides/pretraining.md ("What a healthy run looks like") and docs/guides/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from expmae import add_version_argument
from expmae.checkpoint import read_model_checkpoint
from expmae.config import DataConfig
from expmae.data import VideoClipDataset, normalize_clips
from expmae.features.common import list_inputs, resolve_device
from expmae.files import atomic_path
from expmae.jobs import one_line
from expmae.model import ExpMAE, patchify_clips, patchify_frames, unnormalize, unpatchify_clips, unpatchify_frames
from expmae.model_config import DEFAULT_SAMPLE_STRIDE
from expmae.recon_baselines import PREDICTORS, baseline_losses


@torch.no_grad()
def reconstruct(model, clips: torch.Tensor, *, frame_idx=None, mask_mae=None, mask_video=None,
                generator=None) -> dict[str, torch.Tensor]:
    """Images in [0, 1] (float32) of an ExpMAE's enabled branches, in eval mode (no drop-path):
    mae_target / mae_masked / mae_pred (B, C, H, W) for the chosen frame, video_target / video_masked /
    video_pred (B, C, T, H, W). *_masked shows masked patches in the mean colour; *_pred pastes the
    prediction into the masked patches and keeps the visible ones from the input (as the MAE demo)."""
    was_training = model.training
    model.eval()
    try:
        out = model(clips, frame_idx=frame_idx, mask_mae=mask_mae, mask_video=mask_video, generator=generator)
    finally:
        model.train(was_training)
    images = {}
    if "pred_mae" in out:
        images.update(_mae_images(model.cfg, clips, out))
    if "pred_video" in out:
        images.update(_video_images(model.cfg, clips, out))
    return images


def _on_grid(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, M, D) predictions of the masked tokens -> (B, N, D), zero where visible."""
    full = pred.new_zeros(mask.shape + pred.shape[-1:])
    full[mask] = pred.reshape(-1, pred.shape[-1])  # masked ids ascend, as the boolean index walks them
    return full


def _mae_images(cfg, clips: torch.Tensor, out: dict) -> dict[str, torch.Tensor]:
    B = clips.shape[0]
    frames = clips.float().transpose(1, 2)[torch.arange(B, device=clips.device), out["frame_idx"]]
    patches = patchify_frames(frames, cfg.patch_size)
    pred = _on_grid(out["pred_mae"].float(), out["mask_mae"])
    if cfg.norm_pix_loss:  # back from per-patch normalised to the patch's own mean / variance
        pred = pred * (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + patches.mean(dim=-1, keepdim=True)
    mask = out["mask_mae"][..., None].float()
    visible = patches * (1 - mask)
    return {"mae_target": unnormalize(frames, cfg.mean, cfg.std).clamp(0, 1),
            "mae_masked": unnormalize(unpatchify_frames(visible, cfg.patch_size, cfg.img_size), cfg.mean,
                                      cfg.std).clamp(0, 1),
            "mae_pred": unnormalize(unpatchify_frames(visible + pred * mask, cfg.patch_size, cfg.img_size), cfg.mean,
                                    cfg.std).clamp(0, 1)}


def _video_images(cfg, clips: torch.Tensor, out: dict) -> dict[str, torch.Tensor]:
    t, p, C = cfg.tubelet_size, cfg.patch_size, cfg.in_chans
    video = clips.float()
    pix = patchify_clips(unnormalize(video, cfg.mean, cfg.std), t, p)  # [0, 1], VideoMAE's target space
    pred = _on_grid(out["pred_video"].float(), out["mask_video"])
    if cfg.norm_pix_loss:  # back from normalised to each tubelet channel's own mean / std
        B, L, _ = pix.shape
        stats = pix.reshape(B, L, -1, C)
        pred = pred.reshape(B, L, -1, C) * (stats.std(dim=-2, keepdim=True) + 1e-6)
        pred = (pred + stats.mean(dim=-2, keepdim=True)).reshape(B, L, -1)
    mask = out["mask_video"][..., None].float()
    masked = unpatchify_clips(patchify_clips(video, t, p) * (1 - mask), t, p, cfg.img_size)
    return {"video_target": unnormalize(video, cfg.mean, cfg.std).clamp(0, 1),
            "video_masked": unnormalize(masked, cfg.mean, cfg.std).clamp(0, 1),
            "video_pred": unpatchify_clips(pix * (1 - mask) + pred * mask, t, p, cfg.img_size).clamp(0, 1)}


def reconstruction_rows(images: dict):
    """Rows for a grid from reconstruct()'s images, per sample: MAE target | masked | prediction side by side,
    then one row each for the VideoMAE target, masked and predicted clip, frames side by side. (R, 3, H, W) in
    [0, 1]; clips smaller than 96 px are upscaled (nearest) to be visible."""
    def row(*frames):
        return torch.cat([f.detach().float().cpu().clamp(0, 1) for f in frames], dim=-1)

    kinds = ("target", "masked", "pred")
    if not any(f"{b}_{k}" in images for b in ("mae", "video") for k in kinds):
        raise KeyError(f"reconstruct() returned no known images; keys: {sorted(images)}")
    batch = next(iter(images.values())).shape[0]
    rows = []
    for i in range(batch):
        if all(f"mae_{k}" in images for k in kinds):
            rows.append(row(*(images[f"mae_{k}"][i] for k in kinds)))
        for k in kinds:
            if f"video_{k}" in images:
                rows.append(row(*images[f"video_{k}"][i].unbind(1)))
    width = max(r.shape[-1] for r in rows)
    out = torch.stack([F.pad(r, (0, width - r.shape[-1]), value=1.0) for r in rows])  # white right padding
    scale = math.ceil(96 / out.shape[-2])
    return F.interpolate(out, scale_factor=scale, mode="nearest") if scale > 1 else out


def reconstruction_grid(model, clips_uint8, *, seed: int, device):
    """Reconstruct uint8 clips (B, C, T, H, W) with masks drawn from their own generator (``seed``: grids stay
    comparable across checkpoints, and a training run's RNG is untouched); returns the grid (3, H, W) in [0, 1].
    Under ZeRO-3 every rank must call it (parameters are gathered collectively)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    # float32 clips: the model casts its encoder input to its own dtype, and the targets stay exact.
    clips = normalize_clips(clips_uint8.to(device), dtype=torch.float32, mean=model.cfg.mean, std=model.cfg.std)
    images = reconstruct(model, clips, generator=generator)
    return make_grid(reconstruction_rows(images), nrow=1, padding=2, pad_value=1.0)


def reconstruction_loss(model, clips_uint8, *, seed: int, draws: int, device) -> dict[str, float]:
    """The model's losses (loss, loss_mae, loss_video) on uint8 clips (B, C, T, H, W), one batch, averaged over
    ``draws`` mask draws from generators seeded seed, seed + 1, ..."""
    return reconstruction_losses(model, clips_uint8, seed=seed, draws=draws, device=device)["model"]


def reconstruction_losses(model, clips_uint8, *, seed: int, draws: int, device,
                          baselines: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """{"model": losses, baseline: losses, ...}: reconstruction_loss's numbers and, on the very same mask draws
    (and MAE frames), those of the trivial predictors named in ``baselines`` (expmae.recon_baselines)."""
    clips = normalize_clips(clips_uint8.to(device), dtype=torch.float32, mean=model.cfg.mean, std=model.cfg.std)
    totals: dict[str, dict[str, float]] = {name: {} for name in ("model", *baselines)}
    with torch.no_grad():
        for draw in range(draws):
            out = model(clips, generator=torch.Generator(device=device).manual_seed(seed + draw))
            scored = {"model": out, **{name: baseline_losses(model, clips, out, name) for name in baselines}}
            for name, losses in scored.items():
                for key in ("loss", "loss_mae", "loss_video"):
                    if key in losses:
                        totals[name][key] = totals[name].get(key, 0.0) + float(losses[key]) / draws
    return totals


def save_png(grid, path: str | Path) -> Path:
    """Write a (3, H, W) grid in [0, 1] as a PNG, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_image(grid, str(tmp), format="png")
    return path


# ----------------------------------------------------------------------------------------------- command line
def load_pretrained(checkpoint: str | Path, weights: str = "auto", device="cpu"):
    """The whole ExpMAE (encoder and decoders) of a pretraining checkpoint or run folder, in eval mode, and the
    checkpoint's info (expmae.checkpoint.read_model_checkpoint)."""
    cfg, state, info = read_model_checkpoint(checkpoint, weights)
    model = ExpMAE(cfg)
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{info['checkpoint']}: weights do not match its model config (mode={cfg.mode}): "
                         f"missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")
    return model.to(device).eval(), info


def video_paths(inputs: list[str]) -> list[Path]:
    """Each input as expmae-features reads it (expmae.features.common.list_inputs): an expmae-crop output folder,
    a folder of videos, a .txt list or a single video; a single .npy face clip too."""
    paths = []
    for item in inputs:
        if not Path(item).exists():
            raise FileNotFoundError(f"{item}: no such file or folder")
        paths += [Path(item)] if Path(item).suffix.lower() == ".npy" else list_inputs(item)
    return paths


def evaluation_clips(paths: Sequence[Path], cfg, stride: int, limit: int | None = None) -> list:
    """The deterministic evaluation view (centre window, centre crop) of each readable clip as the model ``cfg``
    sees it, uint8 (C, T, H, W), the first ``limit``; an unreadable one is said on stderr and skipped."""
    dataset = VideoClipDataset([str(p) for p in paths], cfg.num_frames, stride, cfg.img_size, train=False)
    clips = []
    for i, path in enumerate(paths):
        if len(clips) == limit:
            break
        try:
            clips.append(dataset.transform(dataset.load_frames(i, None), None))
        except Exception as exc:  # noqa: BLE001 - one unreadable clip is reported and skipped
            print(f"expmae-visualize: skipping {path}: {one_line(exc)}", file=sys.stderr)
    return clips


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expmae-visualize", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser)
    parser.add_argument("checkpoint", help="a pretraining run folder, its checkpoints/ or one step_* folder")
    parser.add_argument("videos", nargs="+", help="face clips (videos or .npy) or folders of them")
    parser.add_argument("--out", required=True, type=Path, help="the PNG to write")
    parser.add_argument("--num-clips", type=int, default=4, help="clips in the grid (the first readable ones)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the masks and the MAE frame choice")
    parser.add_argument("--loss-draws", type=int, default=0,
                        help="also print the losses on the clips, averaged over this many mask draws (JSON)")
    parser.add_argument("--baselines", action="store_true",
                        help="with --loss-draws: also the trivial predictors' losses on the same mask draws "
                             "(patch_mean, copy_visible: expmae.recon_baselines)")
    parser.add_argument("--sample-stride", type=int,
                        help="frames between sampled frames (default: the run's data.sample_stride, else "
                             f"{DEFAULT_SAMPLE_STRIDE})")
    parser.add_argument("--weights", default="auto", choices=("auto", "weights", "zero", "accelerate"),
                        help="which weights of the checkpoint (see expmae-export)")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_clips < 1:
        raise SystemExit(f"--num-clips {args.num_clips}: expected >= 1")
    if args.loss_draws < 0:
        raise SystemExit(f"--loss-draws {args.loss_draws}: expected >= 0")
    if args.sample_stride is not None and args.sample_stride < 1:
        raise SystemExit(f"--sample-stride {args.sample_stride}: expected >= 1")
    if args.baselines and not args.loss_draws:
        raise SystemExit("--baselines: expected with --loss-draws N (the baselines are scored on its mask draws)")

    device = torch.device(resolve_device(args.device))
    try:
        paths = video_paths(args.videos)
        model, info = load_pretrained(args.checkpoint, args.weights, device)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"expmae-visualize: {one_line(exc)}") from None
    cfg = model.cfg
    stride = args.sample_stride or info.get("sample_stride") or DataConfig().sample_stride
    clips = evaluation_clips(paths, cfg, stride, args.num_clips)
    if not clips:
        raise SystemExit(f"expmae-visualize: none of the {len(paths)} inputs could be read as a clip")
    grid = reconstruction_grid(model, torch.stack(clips), seed=args.seed, device=device)
    out = save_png(grid, args.out)
    step = f" at step {info['step']}" if info.get("step") is not None else ""
    print(f"{out}: {len(clips)} clips reconstructed by {info['checkpoint']}{step} (mode {cfg.mode}, seed {args.seed})")
    if args.loss_draws:
        scored = reconstruction_losses(model, torch.stack(clips), seed=args.seed, draws=args.loss_draws,
                                       device=device, baselines=PREDICTORS if args.baselines else ())
        rounded = {name: {k: round(v, 6) for k, v in losses.items()} for name, losses in scored.items()}
        print(json.dumps({"checkpoint": str(info["checkpoint"]), "step": info.get("step"), "clips": len(clips),
                          "draws": args.loss_draws, **rounded.pop("model"), **rounded}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
