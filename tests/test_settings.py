"""One settings mechanism: expmae-finetune's and expmae-crop's flags and --help are generated from the fields of
FinetuneConfig and CropOptions, which check themselves; unknown keys get a "did you mean"."""
from __future__ import annotations

import dataclasses

import pytest

from expmae import facecrop
from expmae.facecrop_video import CropOptions
from expmae.finetune.cli import build_parser, config_from_args
from expmae.finetune.config import HEAD_NAMES, FinetuneConfig
from expmae.settings import ConfigError, flag_of, given, unknown_key

META_FLAGS = {"-h", "--help", "--version", "--list-configs", "--config"}  # about the command, not a setting
# expmae-crop's flags of the job (which folders, how many processes), not of how a video is cropped
CROP_JOB_FLAGS = {"--reencode", "--merge", "--workers", "--write-threads", "--shard", "--limit", "--retry-failed",
                  "--quiet"}
CLIS = {"expmae-finetune": (build_parser, FinetuneConfig, META_FLAGS),
        "expmae-crop": (facecrop.build_parser, CropOptions, META_FLAGS | CROP_JOB_FLAGS)}


def flags_and_help(parser) -> dict[str, str]:
    out = {}
    for action in parser._actions:
        for flag in action.option_strings:
            out[flag] = action.help or ""
    return out


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_field_has_a_flag_and_every_flag_a_field_with_its_help(cli):
    make_parser, cls, other_flags = CLIS[cli]
    flags = flags_and_help(make_parser())
    fields = {flag_of(f): f for f in dataclasses.fields(cls)}
    assert set(flags) - other_flags == set(fields)
    for flag, f in fields.items():
        assert f.metadata["help"] and flags[flag].startswith(f.metadata["help"].replace("%", "%%")), flag


def test_crop_flags_parse_into_options_and_are_checked_before_any_folder(tmp_path, capsys):
    args = facecrop.build_parser().parse_args(["in", "out", "--size", "112", "--no-trim", "--format", "npy",
                                               "--detect-every", "4", "--min-face-size", "40", "--workers", "0"])
    opt = CropOptions(**given(args, CropOptions))
    assert (opt.size, opt.trim, opt.format, opt.detect_every, opt.min_face_size) == (112, False, "npy", 4, 40)
    assert (opt.margin, opt.crf, opt.device) == (CropOptions().margin, CropOptions().crf, "auto")  # not given
    assert args.workers == 0 and args.input_dir == "in"
    for flags, message in ((["--size", "101"], "size=101: expected an even size"),
                           (["--min-prob", "1.5"], "min_prob=1.5 is out of range; expected a value >= 0 and <= 1"),
                           (["--detect-size", "32"], "detect_size=32: expected 0 (native) or >= 64")):
        with pytest.raises(SystemExit):
            facecrop.main([str(tmp_path / "missing"), str(tmp_path / "out"), *flags])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


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
