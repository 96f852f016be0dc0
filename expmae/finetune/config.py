"""FinetuneConfig: every setting of expmae-finetune (one definition each), and reading it from YAML."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from expmae.model_config import DEFAULT_SAMPLE_STRIDE
from expmae.settings import check, setting, unknown_key


HEAD_NAMES = ("attention", "attentive", "concat", "mfb", "svm", "transformer")  # expmae.finetune.heads.HEADS
DATA, HEADS, E2E = "the label set and its folds", "heads", "end-to-end mode (expmae.finetune.backends.video)"


def parse_unfreeze_blocks(value: str) -> int:
    """``--unfreeze-blocks``: a block count, or "all" (-1)."""
    if value.strip().lower() == "all":
        return -1
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a number of blocks, or 'all'") from None


@dataclass
class FinetuneConfig:
    """Every setting of expmae-finetune; its flags and --help are generated from these fields (settings.py)."""

    labels: str = setting("", "Train&Val label CSV (name, a class column, optional regression / split columns)")
    features: list[str] = setting([], "feature folders, BRANCH=FOLDER or FOLDER; repeated BRANCH = concatenated")
    out_dir: str = setting("runs/finetune", "output folder", flag="--out")
    test: list[str] = setting([], "label CSVs or name lists to predict (fold-averaged; MER2023: test1/2/3)")
    # the label set (expmae.labels)
    dataset: str = setting("auto", "label layout (auto: csv for a file with a 'label' column or --label-column, "
                                   "else mer2023)", choices=("auto", "csv", "mer2023"), group=DATA)
    label_column: str = setting("", "the class column (default: label; MER2023: discrete)", group=DATA)
    classes: str = setting("", "class names in index order, comma-separated (default: sorted; MER2023: its six)",
                           group=DATA)
    targets: str = setting("auto", "regression columns, comma-separated, or 'none' (auto: valence/arousal/dominance "
                                   "columns present; MER2023: valence)", group=DATA)
    # folds (expmae.finetune.splits): stratified k-fold unless the set's own split is given
    folds: int = setting(5, "stratified k-fold (without a split column or files)", group=DATA)
    split_column: str = setting("", "label-CSV column naming each sample's fold (e.g. DFEW 1..5); value 'train' is "
                                    "never held out, so train/test is an official split", group=DATA)
    split_files: list[str] = setting([], "one per fold: HELD_OUT or TRAIN:HELD_OUT name lists", group=DATA)
    metric: str = setting("auto", "picks the best epoch, printed first (auto: MER2023 metric, else uar; also war, "
                                  "weighted_f1, macro_f1, metric_e, ccc/<column>, mse/<column>, ...)", group=DATA)
    # heads (expmae.finetune.heads)
    head: str = setting("attention", "fusion head", choices=HEAD_NAMES, group=HEADS)
    compare: str = setting("", "run these heads on the same folds into one table, e.g. "
                               "svm,transformer:3,transformer:6,attention,mfb", group=HEADS)
    hidden_dim: int = setting(128, "head width (MFB: its output size o)", min=1, group=HEADS)
    dropout: float = setting(0.3, "head dropout", min=0, lt=1, group=HEADS)
    factor_k: int = setting(5, "MFB factor k", min=1, group=HEADS)
    head_layers: int = setting(3, "transformer head layers (the paper: 3 and 6)", min=1, group=HEADS)
    svm_c: float = setting(1.0, "SVM regularisation C", gt=0, group=HEADS)
    epochs: int = setting(100, "training epochs", min=1)
    batch_size: int = setting(32, "samples per step", min=1)
    lr: float = setting(1e-3, "AdamW learning rate (end to end: of the head and the last block)", min=0)
    weight_decay: float = setting(1e-5, "AdamW weight decay", min=0)
    valence_weight: float = setting(1.0, "lambda in CE + lambda * MSE of the regression columns (MER2023: valence)",
                                    min=0)
    seed: int = setting(0, "random seed of folds, inits and batches")
    missing: str = setting("drop", "samples lacking a feature file", choices=("drop", "zero", "error"))
    device: str = setting("auto", "torch device (auto: cuda when available)")
    threads: int = setting(0, "torch CPU threads (0: torch default; small heads are often fastest with 1)", min=0)
    pseudo_label: str = setting("none", "MER-SEMI pseudo-labelling", choices=("none", "reliable", "weak"))
    unlabeled: str = setting("auto", "name list of unlabeled samples, or 'auto' (every sample in all folders that is "
                                     "neither labelled nor test)")
    threshold: float = setting(0.8, "pseudo-label confidence threshold", min=0, max=1)
    rounds: int = setting(1, "pseudo-labelling rounds", min=0)
    minority: str = setting("frequency", "frequency | confidence | class names, e.g. worried,surprise")
    num_minority: int = setting(2, "minority classes picked by frequency or confidence", min=0)
    tensorboard: bool = setting(True, "write TensorBoard logs")
    progress: bool = setting(True, "show progress bars")
    # end to end (expmae.finetune.backends.video): lr / weight_decay / epochs / batch_size above then drive AdamW over
    # encoder + head, with layer-wise lr decay and a warmup + cosine schedule
    videos: str = setting("", "face clips named like the labels: an expmae-crop output folder or a folder of videos",
                          group=E2E)
    encoder: str = setting("", "expmae-export encoder folder (or a pretraining run / checkpoint folder)", group=E2E)
    freeze_encoder: bool = setting(False, "train the head only, the encoder stays as loaded (eval mode)", group=E2E)
    unfreeze_blocks: int = setting(-1, "train the encoder's last N blocks (+ its final norm) with the head, the rest "
                                       "frozen (eval mode); 0: frozen encoder (probing end to end), -1 (all): full "
                                       "finetuning", parse=parse_unfreeze_blocks, metavar="N", group=E2E)
    layer_decay: float = setting(0.75, "lr of block i = lr * layer_decay^(depth - i), the stem at depth + 1; final "
                                       "norm and head at lr", gt=0, max=1, group=E2E)
    warmup_epochs: float = setting(5.0, "linear warmup epochs", min=0, group=E2E)
    min_lr: float = setting(1e-6, "lr at the end of the cosine schedule", min=0, group=E2E)
    drop_path: float = setting(-1.0, "encoder stochastic depth (< 0: the encoder config's drop_path_rate)", lt=1,
                               group=E2E)
    sample_stride: int = setting(0, "frames between a clip's frames (0: the stride recorded in the encoder folder, "
                                    f"else {DEFAULT_SAMPLE_STRIDE})", min=0, group=E2E)
    augment: bool = setting(True, "VideoMAE multi-scale crop + flip of training clips (off: whole frames; the clip "
                                  "window stays random)", group=E2E)
    precision: str = setting("fp32", "fp32, or bf16 autocast", choices=("fp32", "bf16"), group=E2E)
    workers: int = setting(0, "DataLoader processes decoding clips", min=0, group=E2E)
    test_views: int = setting(1, "temporal views per evaluated sample (held-out fold after every epoch, tests, "
                                 "unlabeled pool): N windows spread evenly over the clip, each centre-cropped, class "
                                 "probabilities and regression averaged; evaluation costs N times as much (1: the "
                                 "centre window)", min=1, group=E2E)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check(f.name, getattr(self, f.name), dict(f.metadata))  # the name is also the YAML key


# Settings that change what a fold computes; a finished fold is reused only if these match (the fold's own
# training / held-out rows and the label set's values are part of its key too).
RUN_KEYS = ("head", "hidden_dim", "dropout", "factor_k", "head_layers", "svm_c", "epochs", "batch_size", "lr",
            "weight_decay", "valence_weight", "folds", "seed", "missing", "metric")
LIST_KEYS = ("features", "test", "split_files")  # settings a YAML file may give as one string or a list
NAME_LIST_KEYS = ("classes", "targets", "compare")  # comma-separated settings a YAML file may give as a list


def load_config(path: str | Path) -> dict:
    """Read a YAML config of FinetuneConfig fields; unknown keys are an error naming the file and key."""
    import yaml  # deferred: console start-up: PyYAML, +8 ms on expmae-finetune --help

    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    for key in data:
        if key not in known:
            raise unknown_key(str(key), str(key), sorted(known), f"{path}: ", what="setting")
    for key in LIST_KEYS:
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
    for key in NAME_LIST_KEYS:
        if isinstance(data.get(key), list) and all(isinstance(v, str) for v in data[key]):
            data[key] = ",".join(data[key])
    defaults = FinetuneConfig()
    for key, value in data.items():
        expected = type(getattr(defaults, key))
        if expected is float and not isinstance(value, bool) and isinstance(value, (int, str)):
            try:  # PyYAML reads 1e-3 (no dot) as a string
                data[key] = value = float(value)
            except ValueError:
                pass
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{path}: setting {key!r} is {value!r}; expected {expected.__name__}")
    return data
