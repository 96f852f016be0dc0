"""Pretraining config: plain dataclasses, a YAML file, `section.key=value` overrides, validated up front.

The validation path imports only the standard library and PyYAML, so a typo'd key fails in well under a
second, before torch, accelerate or deepspeed are imported. Every error is one line naming the key, the
value and what is allowed::

    cfg = load_config("expmae/pretrain/configs/tiny_demo.yaml", ["train.batch_size=4", "model.mode=mae"])

Checks live next to each field (``metadata``): ``choices``, ``min``/``max`` (inclusive), ``gt``/``lt``
(exclusive). The model section is derived from ``expmae.model_config.ExpMAEConfig`` (torch-free): ``name``
picks a preset of the model registry and every other field left at ``None`` keeps that preset's value.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from expmae.files import atomic_path
from expmae.model_config import DEFAULT_SAMPLE_STRIDE, MODEL_SIZES, ExpMAEConfig, get_config
from expmae.model_config import RENAMED as MODEL_RENAMED
from expmae.settings import ConfigError, allowed, check, coerce, rename, rename_keys, setting, type_name, unknown_key



def _model_section() -> type:
    """ModelConfig: ``name`` (a registry preset) + every ExpMAEConfig field, optional (None = the preset's value),
    with that field's own help and checks: each model field is defined once, in expmae.model_config."""

    def overrides(self) -> dict[str, Any]:
        """The ExpMAEConfig fields this config sets (everything but ``name`` that is not None)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}

    preset = ("name", str, setting("tiny", "registry preset, see expmae.model.list_models()", choices=tuple(MODEL_SIZES)))
    fields = [(f.name, f.type | None, field(default=None, metadata=f.metadata)) for f in dataclasses.fields(ExpMAEConfig)]
    return dataclasses.make_dataclass("ModelConfig", [preset, *fields], namespace={
        "overrides": overrides, "__doc__": "Which model to pretrain: a registry preset plus overrides of its "
                                           "ExpMAEConfig fields (None = preset).", "__module__": __name__})


ModelConfig = _model_section()


@dataclass
class DataConfig:
    source: str | None = setting(None, "expmae-crop output folder (manifest.jsonl), or a folder of videos")
    sample_stride: int = setting(DEFAULT_SAMPLE_STRIDE, "frame stride within a clip", min=1)
    num_workers: int = setting(4, "DataLoader worker processes per rank", min=0)
    timeout: float = setting(600.0, "seconds a rank waits for a batch from its DataLoader workers before the run stops "
                               "(checkpointed, naming the clip being decoded); 0 waits forever; needs num_workers > 0",
                        min=0)
    repeated_samples: int = setting(1, "training samples per decoded clip (own window, crop, flip, masks), each in "
                                  "its own batch", min=1)
    repeat_spread: int = setting(2, "with repeated_samples > 1: a DataLoader worker decodes this many batches of clips "
                               "at a time and deals their samples out in rounds, each in a fresh order, so a clip's "
                               "samples meet different batch-mates (1: the same clips make k batches in a row, which "
                               "cost training loss); memory: this x batch_size decoded clips per worker", min=1)
    augment_on: str = setting("auto", "where the crop/resize/flip runs: cpu (DataLoader workers), device (batched on "
                                 "the training device, same bytes), auto (device on a GPU)",
                         choices=("auto", "cpu", "device"))


@dataclass
class TrainConfig:
    output_dir: str = setting("runs/expmae", "run folder: checkpoints/, tensorboard/, metrics.jsonl, recon/")
    seed: int = setting(0, "seeds model init, masking, data order and augmentation", min=0)
    batch_size: int = setting(32, "clips per device per micro-step", min=1)
    grad_accum_steps: int = setting(1, "micro-steps per optimizer step", min=1)
    epochs: int = setting(800, "schedule length in epochs (unless max_steps is set)", min=1)
    max_steps: int | None = setting(None, "schedule length in optimizer steps; overrides epochs", min=1)
    base_lr: float = setting(1.5e-4, "lr per 256 clips: lr = base_lr * global_batch / 256", gt=0)
    lr: float | None = setting(None, "absolute peak lr; overrides base_lr scaling", gt=0)
    min_lr: float = setting(0.0, "final lr of the cosine schedule", min=0)
    warmup_epochs: float = setting(40.0, "linear warmup length in epochs (unless warmup_steps is set)", min=0)
    warmup_steps: int | None = setting(None, "linear warmup length in optimizer steps", min=0)
    weight_decay: float = setting(0.05, "AdamW weight decay (none on norms, biases, pos/mask tokens)", min=0)
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas", min=0, lt=1)
    clip_grad: float = setting(0.0, "max global grad norm; 0 disables clipping", min=0)
    max_nonfinite: int = setting(5, "consecutive non-finite losses that stop the run", min=1)
    init_from: str | None = setting(None, "start (not resume) from these weights: an expMAE checkpoint or run folder "
                                     "(whole model) or a MAE / VideoMAE / timm ViT weights file (encoder only)")
    compile: bool = setting(False, "torch.compile the model (inductor); use this, not `accelerate launch "
                              "--dynamo_backend`, which accelerate drops for DeepSpeed launches")


@dataclass
class LogConfig:
    log_every: int = setting(10, "optimizer steps between TensorBoard scalars", min=1)
    recon_every: int = setting(500, "optimizer steps between reconstruction grids (0 = only at the end)", min=0)
    recon_samples: int = setting(2, "clips shown in a reconstruction grid", min=1)


@dataclass
class CheckpointConfig:
    every: int = setting(1000, "optimizer steps between checkpoints (the end always gets one)", min=1)
    keep_last: int = setting(3, "complete checkpoints kept; older ones are pruned", min=1)


@dataclass
class EvalConfig:
    """Online evaluation: frozen-feature probes of the current encoder on a labelled set, during pretraining."""

    source: str | None = setting(None, "labelled clips to evaluate on: an expmae-crop output folder or a folder of "
                                       "face clips (videos or .npy); null = no online evaluation")
    labels: str | None = setting(None, "CSV with a name column, a label column (discrete or label) and a split "
                                       "column (train | val / test) or an identity column (then identities are split)")
    every: int = setting(1000, "optimizer steps between evaluations (also at step 0, the random-init twin, and the "
                               "end)", min=1)
    val_fraction: float = setting(0.3, "without a split column: the share of identities (or clips) held out", gt=0,
                                  lt=1)
    layers: list[int] = setting([-1], "encoder hidden states to probe (0 = embeddings, i = block i, -1 = last); the "
                                      "first is the headline (eval/knn_acc, eval/probe_acc)")
    readouts: list[str] = setting(["mean", "position"], "feature read-outs: mean (over all tokens, as "
                                                        "expmae-features), position (over time, per patch position), "
                                                        "tokens (attentive probe)",
                                  choices=("mean", "position", "tokens"))
    probes: list[str] = setting(["knn", "linear"], "probes to run on each layer and read-out",
                                choices=("knn", "linear", "attentive"))
    knn_k: int = setting(20, "neighbours of the weighted kNN", min=1)
    knn_temperature: float = setting(0.07, "temperature of the kNN's exp(cosine / T) votes", gt=0)
    batch_size: int = setting(32, "clips per forward pass", min=1)
    seed: int = setting(0, "seed of the identity split and of the probes", min=0)


@dataclass
class DebugConfig:
    """Fault injection and probes, so tests can exercise the guards on the real training path."""

    nonfinite_steps: list[int] = setting([], "micro-steps (0-based, global) whose loss is replaced by NaN")
    nonfinite_rank: int = setting(-1, "rank that sees the injected NaN; -1 = all ranks", min=-1)
    zero_loss_steps: list[int] = setting([], "micro-steps (0-based, global) whose loss is multiplied by 0 (all ranks): "
                                        "a finite micro-batch that adds no gradient, what a dropped one should equal")
    hang_clip: int = setting(-1, "dataset index whose decoding hangs in a DataLoader worker (from epoch hang_epoch on): "
                            "a stuck decoder for the data.timeout guard; -1 = never", min=-1)
    hang_epoch: int = setting(0, "first epoch in which debug.hang_clip hangs", min=0)
    count_syncs: bool = setting(False, "count device synchronisations and tensor read-backs per micro-step into "
                                  "debug/syncs_rank<R>.json")
    dump_inputs: bool = setting(False, "save micro-step 0's model inputs and masks to debug/inputs_rank<R>.safetensors")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = typing.get_type_hints(PretrainConfig)
RENAMED: dict[str, dict[str, str]] = {"model": MODEL_RENAMED}  # section -> {old key: new key} (settings.rename)


# ---------------------------------------------------------------------------------------------- parsing


def _set_field(section_obj: Any, section: str, name: str, raw: Any, where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section_obj)}
    renamed = RENAMED.get(section, {})
    if name not in fields and name not in renamed:
        raise unknown_key(f"{section}.{name}", name, list(fields), where, renamed=renamed)
    name = rename(name, renamed, where, prefix=f"{section}.")
    key = f"{section}.{name}"
    tp = typing.get_type_hints(type(section_obj))[name]
    try:
        value = coerce(raw, tp)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}{key}={raw!r} is not {type_name(tp)}") from None
    try:
        check(key, value, dict(fields[name].metadata))
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    setattr(section_obj, name, value)


def apply_dict(cfg: PretrainConfig, data: Any, where: str = "") -> PretrainConfig:
    """Set the values of a nested mapping {section: {key: value}} on ``cfg``, checking every key."""
    if data is None:
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(f"{where}expected a mapping of sections ({allowed(SECTIONS)}), got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise unknown_key(str(section), str(section), list(SECTIONS), where)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}section '{section}' must be a mapping of keys, got {values!r}")
        values = rename_keys({str(k): v for k, v in values.items()}, RENAMED.get(section, {}), where, f"{section}.")
        for name, raw in values.items():
            _set_field(getattr(cfg, section), section, name, raw, where)
    return cfg


def apply_overrides(cfg: PretrainConfig, overrides: Sequence[str]) -> PretrainConfig:
    """Apply CLI overrides ``section.key=value``; the value is parsed by the field's type."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        section, dot, name = dotted.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (sections: {allowed(SECTIONS)})")
        if section not in SECTIONS:
            raise unknown_key(dotted, section, list(SECTIONS), "override: ")
        _set_field(getattr(cfg, section), section, name, raw, "override: ")
    return cfg


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Cross-field checks that no single field can make (the model's own shape checks run in ExpMAEConfig)."""
    try:  # the model's own checks, on the preset with the overrides (torch-free)
        get_config(cfg.model.name, **cfg.model.overrides())
    except ValueError as exc:
        raise ConfigError(str(exc).replace("ExpMAEConfig.", "model.")) from None
    if cfg.data.source is None:
        raise ConfigError("data.source is not set; expected an expmae-crop output folder or a folder of videos")
    if (cfg.eval.source is None) != (cfg.eval.labels is None):
        have, missing = ("source", "labels") if cfg.eval.labels is None else ("labels", "source")
        raise ConfigError(f"eval.{have} is set but eval.{missing} is not; online evaluation needs both (or neither)")
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Defaults <- YAML file <- CLI overrides, then validated. Raises ConfigError (one line)."""
    cfg = PretrainConfig()
    if path is not None:
        import yaml  # deferred: console start-up: PyYAML, +13 ms on python -m expmae.pretrain --help (59 ms)

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            at = f" at line {line + 1}" if line is not None else ""
            raise ConfigError(f"{path}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None
        apply_dict(cfg, data, where=f"{path}: ")
    apply_overrides(cfg, overrides)
    return validate(cfg)


def from_dict(data: dict) -> PretrainConfig:
    """Rebuild a config saved with :func:`save_config` (e.g. from a checkpoint); checks keys, not data.source."""
    return apply_dict(PretrainConfig(), data)


def to_yaml(cfg: PretrainConfig) -> str:
    """The config as plain YAML (tuples as lists, no python tags)."""
    import yaml  # deferred: console start-up: PyYAML, +13 ms on python -m expmae.pretrain --help (59 ms)

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)


def save_config(cfg: PretrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically): the run's record of what it trained."""
    with atomic_path(path) as tmp:
        tmp.write_text(to_yaml(cfg), encoding="utf-8")
    return Path(path)


def describe() -> str:
    """Every key with its default and help, for ``train.py --help-config``."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            extra = f" (allowed: {allowed(f.metadata['choices'])})" if "choices" in f.metadata else ""
            lines.append(f"  {f.name}: {default!r}  # {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)
