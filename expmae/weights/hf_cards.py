"""The README.md model cards of the transformers folders that hf_export.py writes: text, no logic."""
from __future__ import annotations

import json
from pathlib import Path


def videomae_model_card(cfg, source: dict, out_dir: Path, encoder_folder) -> str:
    size = f"ViT (embed_dim={cfg.embed_dim}, depth={cfg.depth}, heads={cfg.num_heads}, patch {cfg.patch_size})"
    clip = f"{cfg.num_frames} frames x {cfg.img_size} px, tubelets of {cfg.tubelet_size} frames"
    folder = Path(encoder_folder) if encoder_folder else out_dir.parent
    return f"""---
library_name: transformers
tags: [video, videomae, expmae, self-supervised, facial-expression]
---
# expMAE video encoder ({cfg.embed_dim}-d)

A {size} pretrained with expMAE (a shared encoder trained by an MAE frame branch and a VideoMAE clip
branch, mode `{cfg.mode}`), exported as a transformers `VideoMAEModel`: {clip}, VideoMAE's fixed 1-D sin-cos
position table (`position_code: videomae`), no class token. `last_hidden_state` is every tubelet token after the
final norm (`use_mean_pooling: false`); mean-pool it for a clip feature.

- Source checkpoint: `{source.get('checkpoint', 'unknown')}` ({source.get('weights', '')})
- Input: `pixel_values` (batch, frames, channels, height, width), normalised with mean {list(cfg.mean)} and std
  {list(cfg.std)}.
- The key bias of the attention, which transformers' VideoMAE lacks, was dropped: exact (softmax ignores a
  constant per query).
- expMAE config:

```json
{json.dumps(cfg.to_dict(), indent=1)}
```

## Load it

```python
from transformers import VideoMAEModel, VideoMAEForVideoClassification
model = VideoMAEModel.from_pretrained("{out_dir}")
tokens = model(pixel_values).last_hidden_state            # (B, T/t * N, D)
# a fresh classifier head (without mean pooling, transformers classifies from the first token):
clf = VideoMAEForVideoClassification.from_pretrained("{out_dir}", num_labels=6)

import timm   # the frame encoder (a ViT without class token), from the parent folder
frames = timm.create_model("local-dir:{folder}", pretrained=True)

import expmae  # the clip + frame encoder
encoder = expmae.load_encoder("{folder}")
```
"""


def vitmae_model_card(cfg, source: dict, out_dir: Path, encoder_folder) -> str:
    size = f"ViT (embed_dim={cfg.embed_dim}, depth={cfg.depth}, heads={cfg.num_heads}, patch {cfg.patch_size})"
    code = ("MAE's fixed 2-D sin-cos code" if cfg.position_code == "separable" else
            "the first time step's rows of VideoMAE's 1-D sin-cos table")
    folder = Path(encoder_folder) if encoder_folder else out_dir.parent
    return f"""---
library_name: transformers
tags: [image, vit-mae, expmae, self-supervised, facial-expression]
---
# expMAE frame encoder ({cfg.embed_dim}-d)

A {size} with a class token, pretrained with expMAE (a shared encoder trained by an MAE frame branch and a
VideoMAE clip branch, mode `{cfg.mode}`), its frame path exported as a transformers `ViTMAEModel`:
{cfg.img_size} px images, position code {code} (stored in `position_embeddings`, class slot zero). The clip
encoder (tubelets over time) is the parent folder's `encoder.safetensors`.

- Source checkpoint: `{source.get('checkpoint', 'unknown')}` ({source.get('weights', '')})
- Input: `pixel_values` (batch, channels, height, width), normalised with mean {list(cfg.mean)} and std {list(cfg.std)}.
- The config keeps the MAE branch's mask ratio as `mask_ratio` ({cfg.mae_mask_ratio}), as ViTMAE checkpoints do:
  `ViTMAEModel` then encodes a random {1 - cfg.mae_mask_ratio:.0%} of the patches, shuffled. For every patch in order,
  load it with `mask_ratio=0.0` and pass `noise=torch.arange(N)`: `last_hidden_state` is then the class token followed
  by the {cfg.num_patches} patch tokens after the final norm, exactly expMAE's `forward_frames`.
- `ViTMAEForPreTraining.from_pretrained` loads the encoder; its decoder (the MAE branch's shape) starts fresh.
- expMAE config:

```json
{json.dumps(cfg.to_dict(), indent=1)}
```

## Load it

```python
import torch
from transformers import ViTMAEModel
model = ViTMAEModel.from_pretrained("{out_dir}", mask_ratio=0.0)
noise = torch.arange({cfg.num_patches}).float().expand(len(pixel_values), -1)   # keep every patch, in order
tokens = model(pixel_values, noise=noise).last_hidden_state   # (B, 1 + N, D): class token first
feature = tokens[:, 1:].mean(dim=1)                            # expMAE's frame feature (patch tokens pooled)

import timm   # the same frame encoder (class_token=True, global_pool="avg"), from the parent folder
frames = timm.create_model("local-dir:{folder}", pretrained=True)

import expmae  # the clip + frame encoder
encoder = expmae.load_encoder("{folder}")
```
"""
