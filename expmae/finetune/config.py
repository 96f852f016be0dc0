"""FinetuneConfig: every setting of expmae-finetune (one definition each), and reading it from YAML."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FinetuneConfig:
    labels: str = ""  # Train&Val label CSV (name, class column, optional regression columns, optional split column)
    features: list[str] = field(default_factory=list)  # BRANCH=FOLDER or FOLDER; same branch = concatenated
    out_dir: str = "runs/finetune"
    test: list[str] = field(default_factory=list)  # label CSVs or name lists to predict (MER2023: test1/2/3)
    # The label set (expmae.labels): format, class column, class order, regression columns
    dataset: str = "auto"  # auto | csv | mer2023 (auto: csv for a file with a 'label' column or a label_column, else mer2023)
    label_column: str = ""  # the class column; "": the format's ('label'; MER2023 'discrete')
    classes: str = ""  # comma-separated class names in index order; "": the format's (MER2023's six) or sorted
    targets: str = "auto"  # regression columns, comma-separated; auto: MER2023 valence, else the affect columns present; none
    # Folds (expmae.finetune.splits): stratified k-fold unless the set's own split is given
    folds: int = 5
    split_column: str = ""  # a label-CSV column; each value a held-out fold (value 'train': always trains)
    split_files: list[str] = field(default_factory=list)  # per fold HELD_OUT or TRAIN:HELD_OUT name lists
    metric: str = "auto"  # picks the best epoch, printed first; auto: MER2023 'metric', else 'uar'
    # Heads (expmae.finetune.heads)
    head: str = "attention"  # attention | attentive | mfb | concat | transformer | svm
    compare: str = ""  # comma-separated head specs run on the same folds into one table, e.g. svm,transformer:3,mfb
    hidden_dim: int = 128  # MFB: output size o
    dropout: float = 0.3
    factor_k: int = 5  # MFB factor k
    head_layers: int = 3  # transformer layers (the paper: 3 and 6)
    svm_c: float = 1.0  # SVM regularisation C
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    valence_weight: float = 1.0  # lambda in CE + lambda * MSE (of every regression column; MER2023: valence)
    seed: int = 0
    missing: str = "drop"  # drop | zero | error, for samples lacking a feature file
    device: str = "auto"
    pseudo_label: str = "none"  # none | reliable | weak
    unlabeled: str = "auto"  # name list, or "auto": every sample in all folders that is neither labelled nor test
    threshold: float = 0.8
    rounds: int = 1
    minority: str = "frequency"  # frequency | confidence | comma-separated class names (e.g. worried,surprise)
    num_minority: int = 2
    threads: int = 0  # torch CPU threads; 0 = torch's default (small heads are often fastest with 1)
    tensorboard: bool = True
    progress: bool = True
    # End-to-end backend (expmae.finetune.backends.video): lr / weight_decay / epochs / batch_size above then drive
    # AdamW over encoder + head, with layer-wise lr decay and a warmup + cosine schedule.
    videos: str = ""  # face clips named like the labels: an expmae-crop output folder or a folder of videos
    encoder: str = ""  # expmae-export encoder folder (or a pretraining run / checkpoint folder)
    freeze_encoder: bool = False  # train the head only; the encoder stays as loaded (eval mode)
    # train the encoder's last N blocks (+ its final norm) with the head, the rest frozen (eval mode); 0: frozen
    # encoder (probing end to end), -1 (all): full finetuning
    unfreeze_blocks: int = -1
    layer_decay: float = 0.75  # lr of block i = lr * layer_decay^(depth - i); stem depth + 1; final norm, head 1
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6  # end of the cosine schedule
    drop_path: float = -1.0  # stochastic depth of the encoder; < 0: the encoder config's drop_path_rate
    sample_stride: int = 0  # frames between a clip's frames; 0: the stride recorded in the encoder folder, else 4
    augment: bool = True  # VideoMAE multi-scale crop + flip of training clips; off: whole frames (random window only)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    workers: int = 0  # DataLoader processes decoding clips
    # Evaluation (held-out fold every epoch, tests, unlabeled pool): windows spread evenly over each clip, each
    # centre-cropped, class probabilities and regression averaged; 1: the centre window. Costs N x the evaluation.
    test_views: int = 1


# Settings that change what a fold computes; a finished fold is reused only if these match (the fold's own
# training / held-out rows and the label set's values are part of its key too).
RUN_KEYS = ("head", "hidden_dim", "dropout", "factor_k", "head_layers", "svm_c", "epochs", "batch_size", "lr",
            "weight_decay", "valence_weight", "folds", "seed", "missing", "metric")
LIST_KEYS = ("features", "test", "split_files")  # settings a YAML file may give as one string or a list
NAME_LIST_KEYS = ("classes", "targets", "compare")  # comma-separated settings a YAML file may give as a list


def load_config(path: str | Path) -> dict:
    """Read a YAML config of FinetuneConfig fields; unknown keys are an error naming the file and key."""
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    for key in data:
        if key not in known:
            raise ValueError(f"{path}: unknown setting {key!r}; expected one of {sorted(known)}")
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
