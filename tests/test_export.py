"""Encoder export and weight import: a real 2-rank DeepSpeed run (ZeRO-2 and ZeRO-3, CPU) -> expmae-export ->
timm strict load + expmae.load_encoder, against the training's own encoder; official MAE / VideoMAE / VideoMAE V2
checkpoint layouts (built here, no download) against timm and HF transformers as oracles; one-line errors.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, moving_pattern, write_checkpoint, write_video
from launching import CPU_DEEPSPEED, LAUNCH_TIMEOUT, REPO, finish, free_port, write_tiny_config

from expmae.export import (ENCODER_WEIGHTS, TIMM_WEIGHTS, convert_state_dict, create_timm_model, export_encoder,
                           load_encoder, load_pretrained_weights, read_checkpoint, save_encoder)
from expmae.model import create_model, get_config
from expmae.pos_embed import get_2d_sincos_pos_embed, spatiotemporal_pos_embed
from expmae.weights.timm_frame import frame_encoder_timm_state_dict



def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (norms start at 1 / 0) so a comparison exercises each one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def inputs(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, cfg.img_size, cfg.img_size, generator=g)
    clips = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)
    return images, clips


def assert_encoder_folder_matches(folder, model) -> None:
    """The folder's clip encoder (expmae) and frame encoder (timm, strict) reproduce ``model``'s encoder."""
    images, clips = inputs(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(folder).forward_clips(clips),
                                   model.encoder.forward_clips(clips), atol=1e-6, rtol=0)
        torch.testing.assert_close(create_timm_model(folder).forward_features(images),
                                   model.encoder.forward_frames(images), atol=1e-5, rtol=0)


class NotATensor:  # a pickled object that torch.load(weights_only=True) must refuse
    pass


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------- 2-rank DeepSpeed round trip
@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """One tiny 2-rank DeepSpeed pretraining run per ZeRO stage, on the CPU (gloo), via `accelerate launch`."""
    root = tmp_path_factory.mktemp("export_runs")
    videos = root / "videos"
    for i in range(4):  # 4 clips = one step of 2 ranks x batch 2
        write_video(videos / f"clip_{i}.mp4", moving_pattern(num_frames=16, size=64, seed=i))
    runs = {}
    for stage in (2, 3):
        launcher = root / f"zero{stage}.yaml"
        text = CPU_DEEPSPEED.read_text()
        if stage == 3:  # zero3_save_16bit_model: the save gathers the sharded weights into weights.safetensors
            text = text.replace("zero_stage: 2", "zero_stage: 3\n  zero3_save_16bit_model: true")
        launcher.write_text(text)
        config = write_tiny_config(root / f"tiny{stage}.yaml", videos, root / f"run{stage}",
                                   train={"max_steps": 2, "warmup_steps": 1}, log={"recon_every": 0},
                                   checkpoint={"every": 2})
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher),
               "--main_process_port", str(free_port()), "-m", "expmae.pretrain", "--config", str(config)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        log = root / f"log{stage}.txt"
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        rc = finish(proc, log)
        assert rc == 0, f"ZeRO-{stage} pretraining failed (rc={rc}); log tail:\n{log.read_text()[-3000:]}"
        runs[stage] = root / f"run{stage}"
    return runs


def trained_model(run: Path):
    """The training's own model, rebuilt from the checkpoint's gathered weights.safetensors (not via export)."""
    from expmae.checkpoint import load_model_weights

    config, weights = load_model_weights(run)
    model = create_model("tiny", **config)
    model.load_state_dict(weights, strict=True)
    return model.eval()


@pytest.mark.timeout(3 * LAUNCH_TIMEOUT)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_exports_to_timm_and_load_encoder(deepspeed_runs, stage, tmp_path):
    import timm
    from safetensors.torch import load_file

    run = deepspeed_runs[stage]
    out = tmp_path / "encoder"
    # weights="zero": the fp32 master weights merged from both ranks' ZeRO shards, on one CPU process
    summary = export_encoder(run, out, weights="zero")
    assert summary["source"]["weights"] == "deepspeed-zero:pytorch_model" and summary["source"]["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.json", ENCODER_WEIGHTS, TIMM_WEIGHTS]

    reference = trained_model(run).encoder
    images, clips = inputs(reference.cfg)
    config = json.loads((out / "config.json").read_text())
    meta = config["expmae"]
    assert meta["model_name"] == "tiny" and meta["clip"]["sample_stride"] == 2
    for key in ("embed_dim", "depth", "patch_size", "num_frames", "img_size"):
        assert meta["config"][key] == meta["clip"].get(key, TINY[key]) == TINY[key], key
    assert meta["config"]["tubelet_size"] == meta["clip"]["tubelet_size"] == 2
    assert config["pretrained_cfg"]["mean"] == list(reference.cfg.mean)
    assert config["pretrained_cfg"]["std"] == list(reference.cfg.std)

    with torch.no_grad():
        # (a) the frame encoder in timm: the exact call recorded in config.json, and timm's own local-dir loader
        explicit = eval(meta["timm"]["create_model"], {"timm": timm}).eval()
        explicit.load_state_dict(load_file(str(out / TIMM_WEIGHTS)), strict=True)
        local_dir = create_timm_model(out)
        tokens = reference.forward_frames(images)
        for timm_model in (explicit, local_dir):
            torch.testing.assert_close(timm_model.forward_features(images), tokens, atol=1e-5, rtol=0)
            torch.testing.assert_close(timm_model(images), tokens.mean(dim=1), atol=1e-5, rtol=0)
        assert tuple(timm.data.resolve_data_config({}, model=local_dir)["mean"]) == reference.cfg.mean
        # (b) the clip encoder in expmae, in one call
        encoder = load_encoder(out)
        assert not encoder.training
        torch.testing.assert_close(encoder.forward_clips(clips), reference.forward_clips(clips), atol=1e-5, rtol=0)


@pytest.mark.timeout(3 * LAUNCH_TIMEOUT)
def test_auto_weights_prefer_fp32_and_fall_back_to_the_zero_shards(deepspeed_runs, tmp_path):
    from safetensors.torch import load_file, save_file

    from expmae.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(deepspeed_runs[2] / "checkpoints")
    auto = read_checkpoint(ckpt)
    assert auto.info["weights"] == "weights.safetensors" and auto.info["dtype"] == "float32"
    zero = read_checkpoint(ckpt, weights="zero")
    assert auto.encoder_state.keys() == zero.encoder_state.keys()
    assert all(torch.equal(auto.encoder_state[k], zero.encoder_state[k]) for k in auto.encoder_state)

    # bf16 training gathers 16-bit weights into weights.safetensors: then the fp32 shards win.
    copy = tmp_path / ckpt.name
    shutil.copytree(ckpt, copy)
    weights = load_file(str(copy / "weights.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(copy / "weights.safetensors"))
    chosen = read_checkpoint(copy)
    assert chosen.info["weights"] == "deepspeed-zero:pytorch_model"
    assert all(torch.equal(chosen.encoder_state[k], zero.encoder_state[k]) for k in zero.encoder_state)
    forced = read_checkpoint(copy, weights="weights")
    assert forced.info["dtype"] == "bfloat16" and forced.encoder_state["norm.weight"].dtype == torch.float32


# ---------------------------------------------------------------------------------- plain / DDP checkpoints
def fake_checkpoint(root: Path, model, *, prefix: str = "", fmt: str = "safetensors") -> Path:
    """A step folder as accelerate.save_state writes it outside DeepSpeed, without the gathered
    weights.safetensors: accelerate's model.safetensors (DDP keeps 'module.') or pytorch_model.bin."""
    return write_checkpoint(root, model, prefix=prefix,
                            file="model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")


@pytest.mark.parametrize("prefix, fmt", [("module.", "safetensors"), ("", "bin")])
def test_plain_and_ddp_checkpoints_export(tmp_path, prefix, fmt):
    torch.manual_seed(0)
    model = randomize_(create_model("tiny", **TINY)).eval()
    fake_checkpoint(tmp_path / "run", model, prefix=prefix, fmt=fmt)
    summary = export_encoder(tmp_path / "run", tmp_path / "enc")  # a run folder: its newest checkpoint
    assert summary["source"]["weights"] == ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    assert summary["verify"]["timm_frame_max_abs_diff"] < 1e-5
    assert_encoder_folder_matches(tmp_path / "enc", model)
    # load_encoder also takes the checkpoint itself
    _, clips = inputs(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(tmp_path / "run").forward_clips(clips),
                                   model.encoder.forward_clips(clips), atol=1e-6, rtol=0)


def test_learned_position_codes_travel_with_the_encoder(tmp_path):
    torch.manual_seed(0)
    model = randomize_(create_model("tiny", **TINY, learn_pos_embed=True)).eval()
    save_encoder(model, tmp_path / "enc")
    assert_encoder_folder_matches(tmp_path / "enc", model)


def test_class_token_encoder_exports_to_timm_and_back_exactly(tmp_path):
    """class_token=True: timm's ViT with class_token=True (its pos_embed's class slot zero) strict-loads the frame
    encoder, forward_features gives its tokens (class token first), forward() pools the patch tokens only; the timm
    state dict imports back (layout timm) into the same encoder."""
    torch.manual_seed(0)
    model = randomize_(create_model("tiny", **TINY, class_token=True)).eval()
    save_encoder(model, tmp_path / "enc")
    assert_encoder_folder_matches(tmp_path / "enc", model)
    timm_model = create_timm_model(tmp_path / "enc")
    assert timm_model.num_prefix_tokens == 1 and timm_model.global_pool == "avg"
    images, _ = inputs(model.cfg)
    with torch.no_grad():
        tokens = model.encoder.forward_frames(images)
        assert tokens.shape == (3, 1 + model.cfg.num_patches, model.cfg.embed_dim)
        torch.testing.assert_close(timm_model(images), tokens[:, 1:].mean(dim=1), atol=1e-5, rtol=0)
    state = frame_encoder_timm_state_dict(model)
    assert state["pos_embed"].shape == (1, 1 + model.cfg.num_patches, model.cfg.embed_dim)
    assert not state["pos_embed"][:, 0].any()
    back = create_model("tiny", **TINY, class_token=True, mode="mae")
    report = load_pretrained_weights(back, state)
    assert report.layout == "timm" and report.class_token and report.missing == [] and report.unexpected == []
    for key, value in model.encoder.state_dict().items():
        if key != "patch_embed.proj.weight":  # the timm stem is the Conv3d summed over time: only the frame path stays
            assert torch.equal(back.encoder.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(back.encoder.eval().forward_frames(images), tokens, atol=1e-5, rtol=0)


def test_export_errors_are_one_line(tmp_path, capsys):
    from expmae.export import main

    with pytest.raises(FileNotFoundError) as err:
        export_encoder(tmp_path / "nowhere", tmp_path / "out")
    assert "nowhere: no such file or folder" in one_line_error(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        read_checkpoint(tmp_path / "empty")
    assert "not a pretraining checkpoint" in one_line_error(err)

    model = create_model("tiny", **TINY)
    step = fake_checkpoint(tmp_path / "run", model)
    (step / "model_config.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        read_checkpoint(step)
    assert "model_config.json" in one_line_error(err)
    # a checkpoint whose config says depth 3 but holds 2 blocks
    (step / "model_config.json").write_text(json.dumps({**model.cfg.to_dict(), "depth": 3}))
    with pytest.raises(ValueError) as err:
        read_checkpoint(step)
    assert "missing ['blocks.2." in one_line_error(err) and "depth=3" in str(err.value)

    save_encoder(model, tmp_path / "enc")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_encoder(model, tmp_path / "enc")
    assert (tmp_path / "enc" / ENCODER_WEIGHTS).is_file()
    with pytest.raises(FileNotFoundError) as err:
        load_encoder(tmp_path / "empty")
    assert "not an expmae encoder folder" in one_line_error(err)

    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("expmae-export: error: FileNotFoundError")


def test_import_of_expmae_export_stays_light():
    code = ("import sys, expmae, expmae.export, expmae.features; from expmae.features import extract; "
            "print([m for m in ('timm', 'deepspeed', 'accelerate', 'transformers', 'facenet_pytorch') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------- official layouts
def mae_checkpoint(cfg, seed: int = 0) -> dict:
    """facebookresearch/mae models_mae.MaskedAutoencoderViT keys: a timm ViT with a class token and a fixed
    sin-cos pos_embed with a (zero) cls slot, plus decoder_embed / mask_token / decoder_pos_embed /
    decoder_blocks / decoder_norm / decoder_pred."""
    import timm

    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=cfg.img_size, patch_size=cfg.patch_size,
                            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, num_classes=0,
                            global_pool="token", class_token=True)
    state = {k: v.clone() for k, v in randomize_(vit, seed).state_dict().items()}
    sincos = get_2d_sincos_pos_embed(cfg.embed_dim, cfg.grid_size)
    state["pos_embed"] = torch.cat([torch.zeros(1, cfg.embed_dim), sincos])[None]
    D, d = cfg.embed_dim, 32
    dec = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=cfg.img_size,
                            patch_size=cfg.patch_size, embed_dim=d, depth=1, num_heads=4)
    state.update({"decoder_embed.weight": torch.randn(d, D), "decoder_embed.bias": torch.zeros(d),
                  "mask_token": torch.zeros(1, 1, d),
                  "decoder_pos_embed": torch.cat([torch.zeros(1, d), get_2d_sincos_pos_embed(d, cfg.grid_size)])[None],
                  "decoder_norm.weight": torch.ones(d), "decoder_norm.bias": torch.zeros(d),
                  "decoder_pred.weight": torch.randn(cfg.patch_size**2 * 3, d),
                  "decoder_pred.bias": torch.zeros(cfg.patch_size**2 * 3)})
    state.update({f"decoder_{k}": v for k, v in dec.state_dict().items() if k.startswith("blocks.0.")})
    return state


def videomae_encoder_state(cfg, seed: int = 0, qkv_bias: bool = True, empty: bool = False) -> dict:
    """MCG-NJU/VideoMAE (and OpenGVLab/VideoMAEv2) encoder keys: Conv3d patch_embed.proj, blocks.i with
    attn.qkv.weight (no bias) + attn.q_bias / attn.v_bias, norm1/norm2, mlp.fc1/fc2, final norm."""
    g = torch.Generator().manual_seed(seed)
    D, t, p, H = cfg.embed_dim, cfg.tubelet_size, cfg.patch_size, int(cfg.embed_dim * cfg.mlp_ratio)
    r = (lambda *shape: torch.empty(shape)) if empty else (lambda *shape: torch.randn(*shape, generator=g) * 0.1)  # noqa: E731
    state = {"patch_embed.proj.weight": r(D, 3, t, p, p), "patch_embed.proj.bias": r(D),
             "norm.weight": 1 + r(D), "norm.bias": r(D)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                      b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D), b + "norm2.weight": 1 + r(D),
                      b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(H, D), b + "mlp.fc1.bias": r(H),
                      b + "mlp.fc2.weight": r(D, H), b + "mlp.fc2.bias": r(D)})
        if qkv_bias:
            state.update({b + "attn.q_bias": r(D), b + "attn.v_bias": r(D)})
    return state


def videomae_pretrain_checkpoint(cfg, seed: int = 0, empty: bool = False) -> dict:
    """modeling_pretrain.PretrainVisionTransformer: encoder.*, encoder_to_decoder (no bias), mask_token,
    decoder.blocks.*, decoder.norm, decoder.head; sin-cos tables are not in the state dict."""
    state = {f"encoder.{k}": v for k, v in videomae_encoder_state(cfg, seed, empty=empty).items()}
    d = 16
    state.update({"encoder_to_decoder.weight": torch.randn(d, cfg.embed_dim), "mask_token": torch.zeros(1, 1, d),
                  "decoder.blocks.0.attn.qkv.weight": torch.randn(3 * d, d), "decoder.blocks.0.attn.q_bias": torch.zeros(d),
                  "decoder.blocks.0.attn.v_bias": torch.zeros(d), "decoder.norm.weight": torch.ones(d),
                  "decoder.norm.bias": torch.zeros(d), "decoder.head.weight": torch.randn(2 * 3 * 64, d),
                  "decoder.head.bias": torch.zeros(2 * 3 * 64)})
    return state


def hf_videomae_from(state: dict, cfg):
    """HF transformers' VideoMAEModel (an independent implementation) with the same VideoMAE weights and our
    position code (VideoMAE's own is a 1-D table over all tubelets, which expMAE does not use)."""
    from transformers import VideoMAEConfig, VideoMAEModel

    D = cfg.embed_dim
    hf = VideoMAEModel(VideoMAEConfig(
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=3, num_frames=cfg.num_frames,
        tubelet_size=cfg.tubelet_size, hidden_size=D, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(D * cfg.mlp_ratio), use_mean_pooling=False, layer_norm_eps=1e-6, qv_bias=True,
        attn_implementation="eager")).eval()
    mapped = {"embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
              "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
              "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(cfg.depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        qkv = state[b + "attn.qkv.weight"]
        mapped.update({
            h + "layernorm_before.weight": state[b + "norm1.weight"], h + "layernorm_before.bias": state[b + "norm1.bias"],
            h + "attention.attention.query.weight": qkv[:D], h + "attention.attention.query.bias": state[b + "attn.q_bias"],
            h + "attention.attention.key.weight": qkv[D:2 * D],
            h + "attention.attention.value.weight": qkv[2 * D:], h + "attention.attention.value.bias": state[b + "attn.v_bias"],
            h + "attention.output.dense.weight": state[b + "attn.proj.weight"],
            h + "attention.output.dense.bias": state[b + "attn.proj.bias"],
            h + "layernorm_after.weight": state[b + "norm2.weight"], h + "layernorm_after.bias": state[b + "norm2.bias"],
            h + "intermediate.dense.weight": state[b + "mlp.fc1.weight"], h + "intermediate.dense.bias": state[b + "mlp.fc1.bias"],
            h + "output.dense.weight": state[b + "mlp.fc2.weight"], h + "output.dense.bias": state[b + "mlp.fc2.bias"]})
    hf.load_state_dict(mapped, strict=True)
    return hf


def test_official_mae_checkpoint_initialises_the_encoder(tmp_path):
    import timm

    cfg = get_config("tiny", **TINY)
    state = mae_checkpoint(cfg)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    # as MAE's misc.save_model writes it: the model under 'model', argparse args beside it
    torch.save({"model": state, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75)}, path)
    with pytest.raises(ValueError) as err:  # MAE's class token is kept: a model without one is told to have one
        load_pretrained_weights(create_model("tiny", **TINY), path)
    assert "set model.class_token=true" in one_line_error(err)
    model = create_model("tiny", **TINY, class_token=True)
    report = load_pretrained_weights(model, path)
    assert report.layout == "mae" and report.missing == [] and report.unexpected == []
    assert report.position_code == "separable" and report.decoders == {"mae_decoder": "loaded"} and report.class_token
    assert set(report.dropped) == {"pos_embed", "decoder_pos_embed"}  # MAE's sin-cos codes are ours
    assert torch.equal(model.encoder.cls_token.detach(), state["cls_token"])  # its slot's code is zero
    # the MAE decoder is the frame decoder (its class token's slot aside)
    assert torch.equal(model.mae_decoder.embed.weight.detach(), state["decoder_embed.weight"])
    assert torch.equal(model.mae_decoder.blocks[0].attn.qkv.weight.detach(), state["decoder_blocks.0.attn.qkv.weight"])
    assert torch.equal(model.mae_decoder.head.weight.detach(), state["decoder_pred.weight"])

    # Oracle: timm's ViT with its class token (MAE's encoder), on the same weights as they are.
    oracle = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=cfg.img_size,
                               patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                               num_heads=cfg.num_heads, num_classes=0, class_token=True, global_pool="avg",
                               fc_norm=False).eval()
    oracle.load_state_dict({k: v for k, v in state.items() if k in oracle.state_dict()}, strict=True)
    images, _ = inputs(cfg)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.forward_frames(images), oracle.forward_features(images),
                                   atol=1e-5, rtol=0)
        # the clip stem is the Conv2d spread over the tubelet: a static clip sees exactly the image stem
        static = images[:, :, None].expand(-1, -1, cfg.tubelet_size, -1, -1)
        torch.testing.assert_close(model.encoder.patch_embed(static), oracle.patch_embed(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("wrapper", ["model", "module"])  # MCG-NJU VideoMAE / OpenGVLab VideoMAE V2 (DeepSpeed)
def test_official_videomae_checkpoint_initialises_the_encoder(tmp_path, wrapper):
    cfg = get_config("tiny", **TINY)
    state = videomae_pretrain_checkpoint(cfg)
    path = tmp_path / "checkpoint.pth"
    torch.save({wrapper: state}, path)
    with pytest.raises(ValueError) as err:  # the default separable code is not what VideoMAE was trained with
        load_pretrained_weights(create_model("tiny", **TINY), path)
    assert "position_code='videomae'" in one_line_error(err) and "set model.position_code=videomae" in str(err.value)
    model = create_model("tiny", **TINY, position_code="videomae").eval()
    report = load_pretrained_weights(model, path)
    assert report.layout == "videomae" and report.missing == [] and report.unexpected == []
    assert set(report.dropped) == {k for k in state if not k.startswith("encoder.")}  # a decoder 16 wide, ours 32
    assert report.decoders["video_decoder"].startswith("freshly initialised (encoder_to_decoder.weight has shape")

    hf = hf_videomae_from(videomae_encoder_state(cfg), cfg)  # with transformers' own position table
    enc = model.encoder
    _, clips = inputs(cfg)
    with torch.no_grad():
        ours = enc.forward_clips(clips)
        ref = hf(clips.transpose(1, 2)).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gamma_name", ["gamma_{}", "ls{}.gamma"])  # VideoMAE / timm names of layer scale
def test_layer_scale_folds_exactly(gamma_name):
    import timm

    cfg = get_config("tiny", **TINY)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=cfg.img_size, patch_size=cfg.patch_size,
                            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, num_classes=0,
                            class_token=False, global_pool="avg", fc_norm=False, init_values=0.3)
    randomize_(vit)
    with torch.no_grad():
        vit.pos_embed.copy_(get_2d_sincos_pos_embed(cfg.embed_dim, cfg.grid_size)[None])
    state = {}
    for k, v in vit.state_dict().items():
        for i in (1, 2):
            k = k.replace(f"ls{i}.gamma", gamma_name.format(i))
        state[k] = v
    model = create_model("tiny", **TINY).eval()
    report = load_pretrained_weights(model, state)
    assert any("layer scale" in n for n in report.notes) and report.unexpected == []
    images, _ = inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.forward_frames(images), vit.eval().forward_features(images),
                                   atol=1e-5, rtol=0)


def test_finetuned_videomae_maps_fc_norm_and_drops_the_head():
    cfg = get_config("tiny", **TINY)
    state = videomae_encoder_state(cfg)  # modeling_finetune.VisionTransformer(use_mean_pooling=True)
    state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
    state["head.weight"], state["head.bias"] = torch.randn(6, cfg.embed_dim), torch.zeros(6)
    encoder = create_model("tiny", **TINY, position_code="videomae").encoder
    report = load_pretrained_weights(encoder, {"module": state})
    assert report.dropped == {"head.weight": "classifier head", "head.bias": "classifier head"}
    assert torch.equal(encoder.norm.weight.detach(), state["fc_norm.weight"]) and any("fc_norm" in n for n in report.notes)


def test_own_expmae_checkpoint_round_trips_through_import():
    torch.manual_seed(0)
    source = randomize_(create_model("tiny", **TINY))
    target = create_model("tiny", **TINY, mode="mae")
    report = load_pretrained_weights(target, {"model": source.state_dict()})
    assert report.layout == "expmae" and report.missing == [] and report.unexpected == []
    assert {k.split(".")[0] for k in report.dropped} == {"video_decoder"} and report.decoders == {"mae_decoder": "loaded"}
    assert torch.equal(target.mae_decoder.head.weight, source.mae_decoder.head.weight)
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(target.encoder.state_dict()[k], v), k


@pytest.mark.parametrize("change, fragment", [
    (dict(embed_dim=96, num_heads=3), "'patch_embed.proj.weight' has shape (96, 3, 8, 8) but the expMAE encoder "
                                      "(embed_dim=48"),
    (dict(patch_size=16), "has shape (48, 3, 16, 16) but the expMAE encoder (embed_dim=48, depth=2, num_heads=3, "
                          "patch_size=8"),
    (dict(depth=3), "the checkpoint has 3 encoder blocks (blocks.0-2), the expMAE config has depth=2"),
])
def test_checkpoint_of_another_shape_is_a_one_line_error(change, fragment):
    other = get_config("tiny", **{**TINY, **change})
    with pytest.raises(ValueError) as err:
        load_pretrained_weights(create_model("tiny", **TINY), {"model": mae_checkpoint(other)})
    assert fragment in one_line_error(err)


def test_vit_b_weights_into_vit_s_name_the_key_and_both_shapes():
    state = videomae_pretrain_checkpoint(get_config("base"), empty=True)  # real sizes, uninitialised memory
    with pytest.raises(ValueError) as err:
        convert_state_dict({"model": state}, get_config("small", position_code="videomae"), "vit_b.pth")
    message = one_line_error(err)
    assert "vit_b.pth: checkpoint key 'encoder.patch_embed.proj.weight' has shape (768, 3, 2, 16, 16)" in message
    assert "expects (384, 3, 2, 16, 16)" in message


def test_strictness_unknown_and_unsupported_keys(tmp_path):
    cfg = get_config("tiny", **TINY)
    TINY_V = {**TINY, "position_code": "videomae"}
    state = videomae_encoder_state(cfg)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.rel_pos"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_pretrained_weights(create_model("tiny", **TINY_V), state)
    assert "['blocks.1.mlp.fc2.bias']" in one_line_error(err) and "blocks.0.attn.rel_pos" in str(err.value)
    report = load_pretrained_weights(create_model("tiny", **TINY_V), state, strict=False)
    assert report.missing == ["blocks.1.mlp.fc2.bias"] and report.unexpected == ["blocks.0.attn.rel_pos"]

    cos = videomae_encoder_state(cfg)
    cos["blocks.0.attn.scale"] = torch.zeros(3, 1, 1)  # VideoMAE V2 cos_attn
    with pytest.raises(ValueError, match="cosine attention"):
        load_pretrained_weights(create_model("tiny", **TINY_V), cos)

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": videomae_encoder_state(cfg), "extra": NotATensor()}, unsafe)
    with pytest.raises(ValueError) as err:
        load_pretrained_weights(create_model("tiny", **TINY_V), unsafe)
    assert "weights_only=True" in one_line_error(err)
    with pytest.raises(ValueError, match="no state dict found"):
        load_pretrained_weights(create_model("tiny", **TINY_V), {"epoch": 3})


def test_cli_imports_a_public_checkpoint_into_an_encoder_folder(tmp_path, capsys):
    from expmae.export import main

    cfg = get_config("tiny", **TINY)
    torch.save({"model": videomae_pretrain_checkpoint(cfg)}, tmp_path / "videomae.pth")
    overrides = [f"{k}={v}" for k, v in TINY.items()]
    assert main([str(tmp_path / "videomae.pth"), str(tmp_path / "enc"), "--model", "tiny", "--set", *overrides]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["import"]["layout"] == "videomae" and summary["verify"]["clip_max_abs_diff"] == 0.0
    encoder = load_encoder(tmp_path / "enc")
    expected = videomae_encoder_state(cfg)
    q, v = expected["blocks.1.attn.q_bias"], expected["blocks.1.attn.v_bias"]
    assert torch.equal(encoder.blocks[1].attn.qkv.bias.detach(), torch.cat([q, torch.zeros_like(q), v]))
    # a weights file needs a model size
    assert main([str(tmp_path / "videomae.pth"), str(tmp_path / "enc2")]) == 2
    assert "needs model=NAME" in capsys.readouterr().err


# ---- init_from: starting a pretraining run from earlier weights ------------------------------------------------
def test_init_from_an_expmae_checkpoint_loads_the_whole_model_and_fills_missing_decoders_fresh(tmp_path):
    from expmae.export import init_from

    source = randomize_(create_model("tiny", **TINY), seed=1)
    step = fake_checkpoint(tmp_path / "run", source, prefix="module.")
    model = create_model("tiny", **TINY)
    note = init_from(model, tmp_path / "run")  # a run folder: its newest checkpoint
    assert note == f"whole model from {step.resolve()} at step 7"
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    # a VideoMAE-only checkpoint into a two-branch model: encoder and clip decoder loaded, MAE decoder as built
    videomae = randomize_(create_model("tiny", **TINY, mode="videomae"), seed=2)
    fake_checkpoint(tmp_path / "videomae", videomae)
    model = create_model("tiny", **TINY)
    fresh = {k: v.clone() for k, v in model.mae_decoder.state_dict().items()}
    assert init_from(model, tmp_path / "videomae").endswith("; mae_decoder freshly initialised (not in the checkpoint)")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in videomae.state_dict().items())
    assert all(torch.equal(model.mae_decoder.state_dict()[k], v) for k, v in fresh.items())


def test_init_from_public_weights_loads_the_encoder_only(tmp_path):
    from expmae.export import init_from

    cfg = get_config("tiny", **TINY)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": mae_checkpoint(cfg)}, path)
    model = create_model("tiny", **TINY, class_token=True)
    reference = create_model("tiny", **TINY, class_token=True)
    load_pretrained_weights(reference, path)  # the import path tested above is the oracle
    decoders = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    note = init_from(model, path)
    assert note.startswith(f"encoder from {path} (mae layout") and note.endswith(
        "; mae_decoder from it too; video_decoder freshly initialised")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items()
               if not k.startswith("video_decoder."))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in decoders.items() if k.startswith("video_decoder."))


def test_init_from_errors_are_one_line(tmp_path):
    from expmae.export import init_from

    with pytest.raises(FileNotFoundError, match="nowhere: no such file or folder"):
        init_from(create_model("tiny", **TINY), tmp_path / "nowhere")
    fake_checkpoint(tmp_path / "wide", create_model("tiny", **{**TINY, "embed_dim": 96}))
    with pytest.raises(ValueError) as err:
        init_from(create_model("tiny", **TINY), tmp_path / "wide")
    assert "its weights do not fit this model (size mismatch for" in str(err.value) and "\n" not in str(err.value)
