"""transformers' VideoMAE (VideoMAEModel / ForPreTraining / ForVideoClassification) and ViTMAE (ViTMAEModel /
ForPreTraining): their keys and config.json into expMAE, and an expMAE encoder out as a VideoMAEModel folder.

Keys: ``[videomae.]embeddings.patch_embeddings.projection`` (Conv3d), ``encoder.layer.i.attention.attention.
{query,key,value}`` (no key bias), ``attention.output.dense``, ``intermediate.dense``, ``output.dense``,
``layernorm_before / _after``, ``layernorm`` (absent with use_mean_pooling: then ``fc_norm`` after pooling);
pretraining adds ``encoder_to_decoder``, ``mask_token``, ``decoder.decoder_layers.i``, ``decoder.norm``,
``decoder.head``. ViTMAE (transformers 5: ``layers.i.attention.{q,k,v,o}_proj``, ``mlp.fc1 / fc2``; 4.x names as
VideoMAE) has a class token (kept: class_token=True, its slot's code folded into it) and stores its 2-D sin-cos code.
Out: an encoder as a transformers VideoMAEModel folder (``hf/``, the clip encoder: videomae code, no class token) or
a ViTMAEModel folder (``hf_vitmae/``, the frame encoder: a class token, any frame code, as ViTMAE stores its code).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from expmae.weights.layouts import Collector
from expmae.weights.mae import OTHER_TOKENS, with_slot_code, without_class_slot

HF_MODEL_TYPES = ("videomae", "vit_mae")
# layers as named in memory (transformers 5), in hub / 4.x files, and as transformers 5's save_pretrained writes
# a ViTMAE decoder (decoder.decoder_encoder.layer)
_LAYER = re.compile(r"^(?:encoder\.layer|layers|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)\.(\d+)\."
                    r"(.+)\.(weight|bias)$")
_BLOCK_PARTS = {  # transformers' names inside a layer -> timm's
    "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_SAVED_BIASES = {"attention.attention.q_bias": "attention.attention.query.bias",
                 "attention.attention.v_bias": "attention.attention.value.bias"}
_VIDEOMAE = {"embeddings.patch_embeddings.projection.": "encoder.patch_embed.proj.", "layernorm.": "encoder.norm.",
             "encoder_to_decoder.": "video_decoder.embed.", "mask_token": "video_decoder.mask_token",
             "decoder.norm.": "video_decoder.norm.", "decoder.head.": "video_decoder.head."}
_VITMAE = {"embeddings.patch_embeddings.projection.": "encoder.patch_embed.proj.", "layernorm.": "encoder.norm.",
           "decoder.decoder_embed.": "decoder.embed.", "decoder.mask_token": "decoder.mask_token",
           "decoder.decoder_norm.": "decoder.norm.", "decoder.decoder_pred.": "decoder.head."}


def _layer(key: str, value: torch.Tensor, c: Collector, part: str, src: str) -> bool:
    """One tensor of a transformers layer -> the expMAE block; False if ``key`` is not a layer's."""
    for old, new in _SAVED_BIASES.items():  # the names save_pretrained / hub files use for VideoMAE's q / v biases
        key = key[:-len(old)] + new if key.endswith(old) else key
    m = _LAYER.match(key)
    if m is None or m.group(2) not in _BLOCK_PARTS:
        return False
    part = part if key.startswith("decoder.") else "encoder"
    c.block(f"{part}.blocks.{m.group(1)}", f"{_BLOCK_PARTS[m.group(2)]}.{m.group(3)}", value, src)
    return True


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def convert_hf_videomae(keys: dict, c: Collector) -> str:
    has_norm = any(_strip(k, "videomae.") == "layernorm.weight" for k in keys)
    for raw, value in keys.items():
        key = _strip(raw, "videomae.")
        target = next((new + key[len(old):] for old, new in _VIDEOMAE.items() if key.startswith(old)), None)
        if target is not None:
            c.put(target, value, raw)
        elif _layer(key, value, c, "video_decoder", raw):
            continue
        elif key.startswith("classifier."):
            c.drop(raw, "classifier head")
        elif key.startswith("fc_norm."):
            if has_norm:
                c.drop(raw, "norm after pooling (the encoder's own norm is loaded)")
            else:
                c.put("encoder.norm." + key.split(".")[-1], value, raw)
                if key.endswith("weight"):
                    c.report.notes.append("fc_norm (use_mean_pooling: applied after pooling in the source) loaded "
                                          "as the final per-token norm")
        elif key.endswith("position_embeddings"):  # VideoMAE's fixed table (not saved by transformers itself)
            c.put("encoder.pos_embed" if not key.startswith("decoder") else "video_decoder.pos_embed", value, raw)
        else:
            c.unknown(raw)
    if not has_norm and not any(_strip(k, "videomae.").startswith("fc_norm.") for k in keys):
        c.report.notes.append("the source has no final norm (use_mean_pooling=True without its fc_norm, e.g. a bare "
                              "VideoMAEModel): norm.* stays unset")
    return "videomae"


def convert_hf_vitmae(keys: dict, c: Collector) -> str:
    pos_embed = next((v for k, v in keys.items() if _strip(k, "vit.") == "embeddings.position_embeddings"), None)
    for raw, value in keys.items():
        key = _strip(raw, "vit.")
        target = next((new + key[len(old):] for old, new in _VITMAE.items() if key.startswith(old)), None)
        if target is not None:
            c.put(target, value, raw)
        elif _layer(key, value, c, "decoder", raw):
            continue
        elif key == "embeddings.cls_token":
            c.put("encoder.cls_token", with_slot_code(value, pos_embed, c), raw)
        elif key.split(".")[-1] in OTHER_TOKENS:
            c.drop(raw, "distillation / register token (the expMAE encoder has only a class token)")
        elif key in ("embeddings.position_embeddings", "decoder.decoder_pos_embed"):
            target = "encoder.pos_embed" if key.startswith("embeddings") else "decoder.pos_embed"
            c.put(target, without_class_slot(value, True, raw, c), raw)
        elif key.startswith("classifier."):
            c.drop(raw, "classifier head")
        else:
            c.unknown(raw)
    return "separable"


# ----------------------------------------------------------------------------------------------- config.json
def read_hf_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed config.json of a transformers VideoMAE / ViTMAE folder, or None for any other folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    return data if isinstance(data, dict) and data.get("model_type") in HF_MODEL_TYPES else None


def config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """ExpMAEConfig fields of a transformers VideoMAE / ViTMAE config.json (the source's own size)."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r}; the expMAE encoder uses gelu")
    hidden, dec = hf["hidden_size"], hf["decoder_hidden_size"]
    fields = dict(img_size=hf["image_size"], patch_size=hf["patch_size"], in_chans=hf.get("num_channels", 3),
                  embed_dim=hidden, depth=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                  mlp_ratio=hf["intermediate_size"] / hidden, norm_pix_loss=hf.get("norm_pix_loss", True))
    if hf["model_type"] == "videomae":
        fields.update(num_frames=hf["num_frames"], tubelet_size=hf["tubelet_size"], qkv_bias=hf.get("qv_bias", True),
                      video_decoder_embed_dim=dec, video_decoder_depth=hf["decoder_num_hidden_layers"],
                      video_decoder_num_heads=hf["decoder_num_attention_heads"], mode="videomae",
                      position_code="videomae")
    else:
        fields.update(qkv_bias=hf.get("qkv_bias", True), decoder_embed_dim=dec,
                      decoder_depth=hf["decoder_num_hidden_layers"], decoder_num_heads=hf["decoder_num_attention_heads"],
                      mask_ratio=hf.get("mask_ratio", 0.75), mode="mae", position_code="separable", class_token=True)
    return fields


def hf_weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: a transformers folder without model.safetensors or pytorch_model.bin "
                            "(sharded checkpoints: load and re-save them in one file)")


# ----------------------------------------------------------------------------------------------- export
HF_FOLDER = "hf"  # the clip encoder as a transformers VideoMAEModel
HF_VITMAE_FOLDER = "hf_vitmae"  # the frame encoder as a transformers ViTMAEModel


def hf_videomae_config(cfg) -> dict[str, Any]:
    """VideoMAEConfig arguments reproducing an expMAE clip encoder (use_mean_pooling=False keeps the final norm
    as ``layernorm`` on every token, eps 1e-6 as expMAE's, the decoder sizes those of the clip decoder)."""
    return dict(image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
                num_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size, hidden_size=cfg.embed_dim,
                num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-6,
                qv_bias=cfg.qkv_bias, use_mean_pooling=False, norm_pix_loss=cfg.norm_pix_loss,
                decoder_hidden_size=cfg.video_decoder_embed_dim,
                decoder_num_hidden_layers=cfg.video_decoder_depth,
                decoder_num_attention_heads=cfg.video_decoder_num_heads,
                decoder_intermediate_size=int(cfg.video_decoder_embed_dim * cfg.mlp_ratio))


def hf_videomae_state(encoder) -> dict[str, torch.Tensor]:
    """VideoMAEModel keys for an ExpMAEEncoder. The key bias is dropped: transformers' VideoMAE has none, and it
    adds the same constant to every attention score of a query, which softmax ignores (exact)."""
    cfg, D = encoder.cfg, encoder.cfg.embed_dim
    check_hf_exportable(encoder)
    src = {k: v.detach().to("cpu", torch.float32) for k, v in encoder.state_dict().items()}
    out = {"embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
           "layernorm.weight": src["norm.weight"], "layernorm.bias": src["norm.bias"]}
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(cfg.depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for ours, theirs in names.items():
            out[f"{h}{theirs}.weight"], out[f"{h}{theirs}.bias"] = src[f"{b}{ours}.weight"], src[f"{b}{ours}.bias"]
        w = src[f"{b}attn.qkv.weight"]  # (3D, D): rows q, k, v
        for j, n in enumerate(("query", "key", "value")):
            out[f"{h}attention.attention.{n}.weight"] = w[j * D:(j + 1) * D]
        if cfg.qkv_bias:
            bias = src[f"{b}attn.qkv.bias"]
            out[f"{h}attention.attention.query.bias"] = bias[:D]
            out[f"{h}attention.attention.value.bias"] = bias[2 * D:]
    return {k: v.contiguous() for k, v in out.items()}


def check_hf_exportable(encoder) -> None:
    """One-line error for an encoder transformers' VideoMAE cannot express."""
    from expmae.pos_embed import get_videomae_sincos_table

    cfg = encoder.cfg
    if cfg.position_code != "videomae":
        raise ValueError(f"--hf: this encoder uses position_code={cfg.position_code!r} (the 2-D + temporal code), "
                         "which transformers' VideoMAE cannot express (it adds VideoMAE's fixed 1-D table); "
                         "pretrain or import with position_code=videomae to export it to transformers")
    if cfg.class_token:
        raise ValueError("--hf: this encoder has a class token (class_token=True), which transformers' VideoMAE "
                         "cannot express (it has none); --hf-vitmae exports its frame encoder as a ViTMAEModel")
    fixed = get_videomae_sincos_table(cfg.num_time * cfg.num_patches, cfg.embed_dim)
    if cfg.learn_pos_embed and not torch.allclose(encoder.pos_embed.detach().cpu().float(), fixed, atol=1e-6):
        raise ValueError("--hf: this encoder learned its position table (learn_pos_embed=True); transformers' "
                         "VideoMAE only has the fixed sin-cos table")


def save_hf_videomae(encoder, out_dir: str | os.PathLike, *, source: dict | None = None,
                     encoder_folder: str | os.PathLike | None = None) -> Path:
    """Write ``out_dir`` as a transformers VideoMAEModel folder (config.json + model.safetensors, written by
    transformers itself after a strict load) and a model card README.md."""
    from transformers import VideoMAEConfig, VideoMAEModel

    from expmae.weights.folder import commit_folder

    out_dir = Path(out_dir)
    state = hf_videomae_state(encoder)
    model = VideoMAEModel(VideoMAEConfig(**hf_videomae_config(encoder.cfg)))
    model.load_state_dict(state, strict=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    model.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(encoder.cfg, source or {}, out_dir, encoder_folder), encoding="utf-8")
    commit_folder(tmp, out_dir, overwrite=True)
    return out_dir


@torch.no_grad()
def verify_hf_folder(folder: str | os.PathLike, encoder, atol: float = 1e-4) -> float:
    """Max |VideoMAEModel.from_pretrained(folder) - encoder| over a random clip; raises above atol."""
    from transformers import VideoMAEModel

    cfg = encoder.cfg
    clips = torch.randn(1, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size,
                        generator=torch.Generator().manual_seed(0))
    hf = VideoMAEModel.from_pretrained(str(folder)).eval()
    diff = (hf(clips.transpose(1, 2)).last_hidden_state - encoder.float().eval().forward_clips(clips)).abs().max().item()
    if not diff <= atol:
        raise RuntimeError(f"{folder}: the transformers export differs from the encoder by {diff:.3g} (> {atol})")
    return diff


# ---- the frame encoder as a ViTMAEModel
def hf_vitmae_config(cfg) -> dict[str, Any]:
    """ViTMAEConfig arguments reproducing an expMAE frame encoder (eps 1e-6 as expMAE's); mask ratio, norm_pix_loss
    and decoder sizes are the MAE frame branch's, so ViTMAEForPreTraining gets a (fresh) decoder of that shape."""
    return dict(image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
                hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-6,
                qkv_bias=cfg.qkv_bias, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
                decoder_hidden_size=cfg.decoder_embed_dim, decoder_num_hidden_layers=cfg.decoder_depth,
                decoder_num_attention_heads=cfg.decoder_num_heads,
                decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio))


_VITMAE_LAYERS = {  # ViTMAEModel's layer names in memory: transformers 5, then 4.x (prefix, timm part -> theirs)
    "layers.": {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj"},
    "encoder.layer.": {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                       "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "q": "attention.attention.query",
                       "k": "attention.attention.key", "v": "attention.attention.value"}}


def check_vitmae_exportable(encoder) -> None:
    """One-line error for an encoder transformers' ViTMAE cannot express. Any frame position code can be: ViTMAE
    stores its code (position_embeddings), so the frame code goes in as it is, behind a zero class slot."""
    if not encoder.cfg.class_token:
        raise ValueError("--hf-vitmae: this encoder has no class token (class_token=False), and transformers' ViTMAE "
                         "always prepends one, which every patch attends to; pretrain or import with class_token=true "
                         "to export it as a ViTMAEModel (the timm export has no such limit)")


def hf_vitmae_state(encoder, prefix: str = "layers.") -> dict[str, torch.Tensor]:
    """ViTMAEModel keys (layer names after ``prefix``, see _VITMAE_LAYERS) for the frame encoder of an
    ExpMAEEncoder: its timm state dict (Conv2d stem, cls_token, pos_embed with the class slot) renamed."""
    from expmae.model import frame_encoder_timm_state_dict

    check_vitmae_exportable(encoder)
    D, names = encoder.cfg.embed_dim, _VITMAE_LAYERS[prefix]
    src = {k: v.to("cpu", torch.float32) for k, v in frame_encoder_timm_state_dict(encoder).items()}
    out = {"embeddings.cls_token": src["cls_token"], "embeddings.position_embeddings": src["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
           "layernorm.weight": src["norm.weight"], "layernorm.bias": src["norm.bias"]}
    for i in range(encoder.cfg.depth):
        b, h = f"blocks.{i}.", f"{prefix}{i}."
        for ours in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                out[f"{h}{names[ours]}.{kind}"] = src[f"{b}{ours}.{kind}"]
        for kind in ("weight", "bias") if encoder.cfg.qkv_bias else ("weight",):
            for j, part in enumerate("qkv"):  # attn.qkv: rows (or entries) q, k, v
                out[f"{h}{names[part]}.{kind}"] = src[f"{b}attn.qkv.{kind}"][j * D:(j + 1) * D]
    return {k: v.contiguous() for k, v in out.items()}


def save_hf_vitmae(encoder, out_dir: str | os.PathLike, *, source: dict | None = None,
                   encoder_folder: str | os.PathLike | None = None) -> Path:
    """Write ``out_dir`` as a transformers ViTMAEModel folder of the frame encoder (config.json + model.safetensors,
    written by transformers itself after a strict load) and a model card README.md."""
    from transformers import ViTMAEConfig, ViTMAEModel

    from expmae.weights.folder import commit_folder

    out_dir = Path(out_dir)
    model = ViTMAEModel(ViTMAEConfig(**hf_vitmae_config(encoder.cfg)))
    prefix = "layers." if any(k.startswith("layers.") for k in model.state_dict()) else "encoder.layer."
    model.load_state_dict(hf_vitmae_state(encoder, prefix), strict=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    model.save_pretrained(tmp)
    (tmp / "README.md").write_text(vitmae_model_card(encoder.cfg, source or {}, out_dir, encoder_folder),
                                   encoding="utf-8")
    commit_folder(tmp, out_dir, overwrite=True)
    return out_dir


@torch.no_grad()
def verify_hf_vitmae_folder(folder: str | os.PathLike, encoder, atol: float = 1e-4) -> float:
    """Max |ViTMAEModel.from_pretrained(folder) - encoder.forward_frames| over random images, all patches kept in
    token order (mask_ratio=0, noise = the token index); raises above atol."""
    from transformers import ViTMAEModel

    cfg = encoder.cfg
    images = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    hf = ViTMAEModel.from_pretrained(str(folder), mask_ratio=0.0).eval()
    noise = torch.arange(cfg.num_patches, dtype=torch.float32).expand(len(images), -1)
    ours = encoder.float().eval().forward_frames(images)
    diff = (hf(images, noise=noise).last_hidden_state - ours).abs().max().item()
    if not diff <= atol:
        raise RuntimeError(f"{folder}: the ViTMAE export differs from the encoder by {diff:.3g} (> {atol})")
    return diff


def model_card(cfg, source: dict, out_dir: Path, encoder_folder) -> str:
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
- The config keeps the MAE branch's `mask_ratio` ({cfg.mask_ratio}), as ViTMAE checkpoints do: `ViTMAEModel`
  then encodes a random {1 - cfg.mask_ratio:.0%} of the patches, shuffled. For every patch in order, load it with
  `mask_ratio=0.0` and pass `noise=torch.arange(N)`: `last_hidden_state` is then the class token followed by the
  {cfg.num_patches} patch tokens after the final norm, exactly expMAE's `forward_frames`.
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
