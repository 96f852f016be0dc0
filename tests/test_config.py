"""Training config: YAML + `section.key=value` overrides, typed parsing, one-line errors, import-light validation."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from expmae.config import (ConfigError, ModelConfig, PretrainConfig, describe, from_dict, load_config, save_config)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "expmae" / "pretrain" / "configs").glob("*.yaml"))


def error_of(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.source=clips", *overrides])
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load_and_give_valid_model_configs(path):
    from expmae.model import get_config

    cfg = load_config(path, ["data.source=clips"])
    model_cfg = get_config(cfg.model.name, **cfg.model.overrides())  # ExpMAEConfig's own checks pass too
    assert model_cfg.img_size % model_cfg.patch_size == 0
    for mode in ("mae", "videomae"):  # the ablation is one override away
        assert get_config(cfg.model.name, **load_config(path, ["data.source=x", f"model.mode={mode}"]).model.overrides()).mode == mode


def test_paper_like_config_keeps_mae_videomae_practice():
    names = [p.name for p in SHIPPED]
    assert "tiny_demo.yaml" in names and "vit_base_16x224.yaml" in names
    cfg = load_config(REPO / "expmae" / "pretrain" / "configs" / "vit_base_16x224.yaml", ["data.source=clips"])
    assert (cfg.model.name, cfg.model.img_size, cfg.model.num_frames, cfg.model.patch_size) == ("base", 224, 16, 16)
    t = cfg.train
    assert (t.betas, t.weight_decay, t.base_lr, t.lr) == ((0.9, 0.95), 0.05, 1.5e-4, None)


def test_overrides_are_parsed_by_the_field_type():
    cfg = load_config(None, [
        "data.source=/data/a=b.d",  # only the first '=' splits
        "train.lr=1e-3",            # YAML 1.1 would read this as a string
        "train.max_steps=none", "train.warmup_steps=10", "train.betas=[0.8, 0.99]",
        "model.norm_pix_loss=false", "model.mean=[0.5, 0.5, 0.5]", "model.mae_mask_ratio=0.6",
        "debug.nonfinite_steps=[3, 4]",
    ])
    assert cfg.data.source == "/data/a=b.d"
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps is None and cfg.train.warmup_steps == 10
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.model.norm_pix_loss is False and cfg.model.mean == (0.5, 0.5, 0.5)
    assert cfg.debug.nonfinite_steps == [3, 4]
    assert cfg.model.overrides() == {"norm_pix_loss": False, "mean": (0.5, 0.5, 0.5), "mae_mask_ratio": 0.6}


@pytest.mark.parametrize("override, expected", [
    ("train.bach_size=4", "unknown key 'train.bach_size' (did you mean 'batch_size'?); allowed: output_dir, seed, batch_size"),
    ("trian.batch_size=4", "unknown key 'trian.batch_size'"),
    ("model.mode=mea", "model.mode='mea' is not allowed; allowed values: expmae, mae, videomae"),
    ("train.batch_size=0", "train.batch_size=0 is out of range; expected a value >= 1"),
    ("train.batch_size=2.5", "train.batch_size='2.5' is not an integer"),
    ("model.mae_mask_ratio=1.0", "model.mae_mask_ratio=1.0 is out of range; expected a value > 0 and < 1"),
    ("train.betas=[0.9]", "train.betas='[0.9]' is not a list of 2 numbers"),
    ("train.betas=[0.9, 1.5]", "train.betas=1.5 is out of range; expected a value >= 0 and < 1"),
    ("train.clip_grad=abc", "train.clip_grad='abc' is not a number"),
    ("model.qkv_bias=maybe", "model.qkv_bias='maybe' is not true/false"),
    ("log.recon_every=-1", "log.recon_every=-1 is out of range; expected a value >= 0"),
    ("train", "override 'train' is not of the form section.key=value"),
    ("model.img_size=100", "model.img_size=100: expected a multiple of patch_size=16"),
    ("model.position_code=mae", "model.position_code='mae' is not allowed; allowed values: separable, videomae"),
    ("data.augment_on=gpu", "data.augment_on='gpu' is not allowed; allowed values: auto, cpu, device"),
    ("data.repeated_samples=0", "data.repeated_samples=0 is out of range; expected a value >= 1"),
])
def test_bad_overrides_fail_with_one_line_naming_key_value_and_allowed(override, expected):
    extra = ["model.patch_size=16"] if override.startswith("model.img_size") else []
    assert expected in error_of([override, *extra])


def test_yaml_errors_name_the_file_and_the_key(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  name: tiny\ntrain:\n  batch_size: 4\n  warmup_epoch: 5\n")
    message = error_of([], typo)
    assert message.startswith(f"{typo}: unknown key 'train.warmup_epoch' (did you mean 'warmup_epochs'?)")

    cases = {
        "modle:\n  name: tiny\n": "unknown key 'modle' (did you mean 'model'?); allowed: model, data, train",
        "train: 5\n": "section 'train' must be a mapping of keys",
        "- a\n- b\n": "expected a mapping of sections",
        "train:\n  lr: [1\n": "invalid YAML at line",
        "train:\n  weight_decay: high\n": "train.weight_decay='high' is not a number",
    }
    for text, expected in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        message = error_of([], bad)
        assert message.startswith(f"{bad}: ") and expected in message, message
    assert "does not exist" in error_of([], tmp_path / "missing.yaml")


def test_data_source_is_required():
    with pytest.raises(ConfigError, match="data.source is not set"):
        load_config(None, [])


def test_model_section_mirrors_expmae_config():
    """Every ExpMAEConfig field can be set from the training config (and nothing else), with a matching type."""
    from expmae.model import ExpMAEConfig

    ours = typing.get_type_hints(ModelConfig)
    theirs = typing.get_type_hints(ExpMAEConfig)
    assert set(ours) - {"name"} == set(theirs)
    for name, tp in theirs.items():
        assert typing.get_origin(tp) or tp in typing.get_args(ours[name]), name
        if typing.get_origin(tp) is tuple:
            assert typing.get_origin(typing.get_args(ours[name])[0]) is tuple, name


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(REPO / "expmae" / "pretrain" / "configs" / "tiny_demo.yaml", ["data.source=clips", "train.betas=[0.8, 0.9]",
                                                                         "debug.nonfinite_steps=[1]"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg and from_dict(cfg.to_dict()) == cfg
    assert "!!python" not in path.read_text()  # plain YAML, readable without our classes


def test_help_lists_every_key_with_its_default():
    text = describe()
    for section in dataclasses.fields(PretrainConfig):
        assert f"{section.name}:" in text
        for f in dataclasses.fields(getattr(PretrainConfig(), section.name)):
            assert f"  {f.name}: " in text, f"{section.name}.{f.name}"


def test_validation_path_imports_neither_torch_nor_deepspeed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: 0\n")
    code = ("import sys\nfrom expmae.config import ConfigError, load_config\n"
            "try:\n    load_config(sys.argv[1])\nexcept ConfigError as e:\n    print(e)\n"
            "print(sorted(m for m in ('torch', 'deepspeed', 'accelerate', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"{bad}: train.batch_size=0 is out of range; expected a value >= 1", "[]"]


OLD_MODEL_KEYS = {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4, "mask_ratio": 0.8}


def test_old_spellings_of_the_mae_branch_load_the_same_config_with_a_pointer(tmp_path):
    """The MAE branch's settings were unprefixed; scripts and YAML files that still say so keep working, each old key
    with a one-line FutureWarning naming its new name."""
    new = load_config(None, ["data.source=clips", *(f"model.mae_{k}={v}" for k, v in OLD_MODEL_KEYS.items())])
    assert new.model.overrides() == {f"mae_{k}": v for k, v in OLD_MODEL_KEYS.items()}
    with pytest.warns(FutureWarning) as caught:
        old = load_config(None, ["data.source=clips", *(f"model.{k}={v}" for k, v in OLD_MODEL_KEYS.items())])
    assert old == new
    messages = [str(w.message) for w in caught]
    assert "override: model.mask_ratio is renamed model.mae_mask_ratio; the old name still works but is deprecated" \
        in messages and len(messages) == len(OLD_MODEL_KEYS) and all("\n" not in m for m in messages)

    path = tmp_path / "old.yaml"
    path.write_text("model:\n" + "".join(f"  {k}: {v}\n" for k, v in OLD_MODEL_KEYS.items()))
    with pytest.warns(FutureWarning) as caught:
        assert load_config(path, ["data.source=clips"]) == new
    assert f"{path}: model.decoder_depth is renamed model.mae_decoder_depth; the old name still works but is " \
        "deprecated" in [str(w.message) for w in caught]
    path.write_text("model:\n  mask_ratio: 0.8\n  mae_mask_ratio: 0.6\n")  # which one? neither, say so
    with pytest.warns(FutureWarning):
        assert "model.mask_ratio (the old name of model.mae_mask_ratio) and model.mae_mask_ratio are both set" in \
            error_of([], path)


def test_old_spellings_reach_the_model_registry_too():
    from expmae.model import get_config

    with pytest.warns(FutureWarning) as caught:
        old = get_config("tiny", decoder_depth=2, mask_ratio=0.8)
    assert [str(w.message).split(";")[0] for w in caught] == ["ExpMAEConfig.decoder_depth is renamed mae_decoder_depth",
                                                             "ExpMAEConfig.mask_ratio is renamed mae_mask_ratio"]
    assert old == get_config("tiny", mae_decoder_depth=2, mae_mask_ratio=0.8) and old.mae_decoder_depth == 2
    with pytest.warns(FutureWarning, match="ExpMAEConfig.mask_ratio is renamed mae_mask_ratio"):
        assert old.mask_ratio == 0.8  # a script reading the old attribute
    with pytest.raises(AttributeError, match="has no attribute 'mask_ratios'"):
        old.mask_ratios


@pytest.mark.parametrize("override, suggested", [
    ("model.decoder_dept=2", "mae_decoder_depth"),  # a typo of the old name points to the new one
    ("model.mae_decoder_dept=2", "mae_decoder_depth"),
    ("model.mask_rato=0.8", "mae_mask_ratio"),
])
def test_unknown_model_key_suggests_the_new_name(override, suggested):
    assert f"unknown key '{override.split('=')[0]}' (did you mean '{suggested}'?)" in error_of([override])
