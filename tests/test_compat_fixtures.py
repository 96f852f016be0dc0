"""Files written by an earlier expmae still load and give the same numbers: a pretraining checkpoint (accelerate
state + weights.safetensors) and an exported encoder folder (expmae clip encoder + timm frame encoder), made by
tools/make_fixtures.py and stored in tests/fixtures/compat/."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
from expmae.checkpoint import config_from_dict, load_checkpoint, load_model_weights, read_checkpoint
from expmae.model import ExpMAE, create_model, get_config
from expmae.weights import create_timm_model, init_from, load_encoder, load_pretrained_weights

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "compat"
ATOL = 1e-5


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "expected.safetensors"))


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < ATOL


@torch.no_grad()
def test_encoder_folder_loads_with_the_same_outputs(expected):
    encoder = load_encoder(FIXTURE / "encoder")
    close(encoder.forward_clips(expected["clips"]), expected["clip_tokens"])
    close(encoder.forward_frames(expected["images"]), expected["frame_tokens"])
    timm_model = create_timm_model(FIXTURE / "encoder")
    close(timm_model.forward_features(expected["images"]), expected["timm_features"])


@torch.no_grad()
def test_checkpoint_weights_load_with_the_same_outputs(expected):
    config, state = load_model_weights(FIXTURE / "run")
    assert config_from_dict(config, "fixture") == get_config("tiny", **json.loads((FIXTURE / "config.json").read_text()))
    model = ExpMAE(config_from_dict(config, "fixture")).eval()
    model.load_state_dict(state, strict=True)
    close(model(expected["clips"], generator=torch.Generator().manual_seed(2))["loss"].reshape(1), expected["loss"])
    encoder = load_encoder(FIXTURE / "run")  # a run folder, exported on the fly
    close(encoder.forward_clips(expected["clips"]), expected["clip_tokens"])
    close(read_checkpoint(FIXTURE / "run").encoder_state["blocks.0.attn.qkv.weight"],
          state["encoder.blocks.0.attn.qkv.weight"])


def test_checkpoint_resumes_through_accelerate(tmp_path, expected):
    from accelerate import Accelerator

    run = shutil.copytree(FIXTURE / "run", tmp_path / "run")
    config, state = load_model_weights(run)
    model = ExpMAE(config_from_dict(config, "fixture"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, opt)
    assert load_checkpoint(accelerator, run) == {"step": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert len(opt.state) == sum(1 for p in model.parameters() if p.requires_grad)  # AdamW moments restored


# ---------------------------------------------------------------------- the MAE branch's earlier names (decoder.*)
def test_the_fixtures_predate_the_mae_prefix_and_load_silently():
    """The fixtures were written while the frame decoder was `decoder` and its settings unprefixed, so the tests above
    cover reading that layout; files nobody can re-spell load without a deprecation warning."""
    weights = load_file(str(FIXTURE / "run" / "checkpoints" / "step_0000001" / "weights.safetensors"))
    saved = json.loads((FIXTURE / "run" / "checkpoints" / "step_0000001" / "model_config.json").read_text())
    exported = json.loads((FIXTURE / "encoder" / "config.json").read_text())["expmae"]["config"]
    assert any(k.startswith("decoder.") for k in weights) and not any(k.startswith("mae_decoder.") for k in weights)
    assert {"decoder_depth", "mask_ratio"} <= set(saved) & set(exported)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, state = load_model_weights(FIXTURE / "run")
        encoder = load_encoder(FIXTURE / "encoder")
    assert (config["mae_decoder_embed_dim"], config["mae_mask_ratio"]) == (16, 0.75) and "decoder_depth" not in config
    assert {k.split(".")[0] for k in state} == {"encoder", "mae_decoder", "video_decoder"}
    assert (encoder.cfg.mae_decoder_embed_dim, encoder.cfg.mae_decoder_depth) == (16, 1)


@torch.no_grad()
def test_init_from_an_earlier_run_loads_the_whole_model(expected):
    config, state = load_model_weights(FIXTURE / "run")
    model = ExpMAE(config_from_dict(config, "fixture"))
    note = init_from(model, FIXTURE / "run")
    assert note == f"whole model from {(FIXTURE / 'run' / 'checkpoints' / 'step_0000001').resolve()} at step 1"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    close(model.eval()(expected["clips"], generator=torch.Generator().manual_seed(2))["loss"].reshape(1),
          expected["loss"])


def earlier_names(state: dict) -> dict:
    """A state dict as an expmae before the mae_ prefix wrote it."""
    return {("decoder." + k.removeprefix("mae_decoder.") if k.startswith("mae_decoder.") else k): v
            for k, v in state.items()}


@torch.no_grad()
def test_a_state_dict_with_the_earlier_decoder_names_gives_the_same_outputs():
    torch.manual_seed(0)
    source = create_model("tiny", **TINY).eval()
    for p in source.parameters():  # biases and norms start at 0 / 1: perturb them so every tensor matters
        p.add_(torch.randn_like(p) * 0.05)
    old = earlier_names(source.state_dict())
    assert "decoder.head.weight" in old and not any(k.startswith("mae_decoder.") for k in old)
    clips = torch.randn(2, 3, TINY["num_frames"], TINY["img_size"], TINY["img_size"],
                        generator=torch.Generator().manual_seed(1))
    want = source(clips, generator=torch.Generator().manual_seed(3))
    loaders = {"load_state_dict": lambda m: m.load_state_dict(old, strict=True),
               "wrapped (DDP / DeepSpeed prefix)": lambda m: torch.nn.ModuleDict({"module": m}).load_state_dict(
                   {f"module.{k}": v for k, v in old.items()}, strict=True),
               "load_pretrained_weights": lambda m: load_pretrained_weights(m, {"model": old})}
    for name, load in loaders.items():
        torch.manual_seed(1)
        target = create_model("tiny", **TINY).eval()
        assert not torch.equal(target.mae_decoder.head.weight, source.mae_decoder.head.weight)
        load(target)
        got = target(clips, generator=torch.Generator().manual_seed(3))
        for key in ("loss", "loss_mae", "loss_video", "pred_mae", "pred_video"):
            assert torch.equal(got[key], want[key]), (name, key)
