"""One settings mechanism: expmae-finetune's flags and --help are generated from FinetuneConfig's fields, which check
themselves; unknown keys get a "did you mean"."""
from __future__ import annotations

import dataclasses

import pytest

from expmae.finetune.cli import build_parser, config_from_args
from expmae.finetune.config import HEAD_NAMES, FinetuneConfig
from expmae.settings import ConfigError, flag_of, unknown_key

META_FLAGS = {"-h", "--help", "--version", "--list-configs", "--config"}  # about the command, not a setting


def flags_and_help() -> dict[str, str]:
    out = {}
    for action in build_parser()._actions:
        for flag in action.option_strings:
            out[flag] = action.help or ""
    return out


def test_every_field_has_a_flag_and_every_flag_a_field_with_its_help():
    flags = flags_and_help()
    fields = {flag_of(f): f for f in dataclasses.fields(FinetuneConfig)}
    assert set(flags) - META_FLAGS == set(fields)
    for flag, f in fields.items():
        assert f.metadata["help"] and flags[flag].startswith(f.metadata["help"].replace("%", "%%")), flag


def test_old_flag_spellings_still_parse():
    cfg = config_from_args(["--labels", "l.csv", "--out", "o", "--no-tensorboard", "--no-progress", "--no-augment",
                            "--freeze-encoder", "--unfreeze-blocks", "all", "--layer-decay", "0.6", "--features", "a",
                            "b", "--head", "svm", "--label-column", "emo", "--split-files", "x", "y"])
    assert (cfg.out_dir, cfg.tensorboard, cfg.progress, cfg.augment, cfg.freeze_encoder) == ("o", False, False, False, True)
    assert (cfg.unfreeze_blocks, cfg.layer_decay, cfg.features, cfg.head, cfg.label_column) == (-1, 0.6, ["a", "b"],
                                                                                                 "svm", "emo")
    assert cfg.split_files == ["x", "y"] and cfg.epochs == FinetuneConfig().epochs


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "lr of block i = lr * layer_decay^(depth - i)" in out and "(default: 0.75)" in out
    assert "{drop,zero,error}" in out


def test_head_choices_are_the_registry():
    from expmae.finetune.heads import HEADS

    assert HEAD_NAMES == tuple(sorted(HEADS))


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs=0 is out of range; expected a value >= 1"),
    ("dropout", 1.0, "dropout=1.0 is out of range; expected a value >= 0 and < 1"),
    ("missing", "skip", "missing='skip' is not allowed; allowed values: drop, zero, error"),
])
def test_finetune_config_checks_itself(field, value, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace("[", r"\[") + "$"):
        FinetuneConfig(**{field: value})


def test_unknown_key_suggests_the_closest():
    err = unknown_key("learning_rate", "learning_rate", ["lr", "learning_rates", "epochs"], "f.yaml: ", what="setting")
    assert str(err) == ("f.yaml: unknown setting 'learning_rate' (did you mean 'learning_rates'?); allowed: lr, "
                        "learning_rates, epochs")
