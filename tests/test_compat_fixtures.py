"""Files written by an earlier expmae still load and give the same numbers: a pretraining checkpoint (accelerate
state + weights.safetensors) and an exported encoder folder (expmae clip encoder + timm frame encoder), made by
tools/make_fixtures.py and stored in tests/fixtures/compat/."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from expmae.checkpoint import config_from_dict, load_checkpoint, load_model_weights, read_checkpoint
from expmae.model import ExpMAE, get_config
from expmae.weights import create_timm_model, load_encoder

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
