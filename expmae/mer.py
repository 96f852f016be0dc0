"""MER2023 data layout: label CSVs, the class list, and per-sample feature folders.

Official label layout (MER2023 release, as read by the organisers' own preprocessing,
zeroQiaoba/MERTools MERBench/toolkit/preprocess/mer2023.py, `normalize_dataset_format`):
``train-label.csv`` (Train&Val), ``test1-label.csv``, ``test2-label.csv``, ``test3-label.csv``, each with the
columns ``name`` (sample name = video stem), ``discrete`` (one of the six classes below) and ``valence``
(float in [-5, 5]); the organisers' code gives test3 no valence, so valence may be absent or empty there.
The class order is theirs too (MERTools MER2024/toolkit/globals.py, ``emos_mer``), so indices match their
released predictions.

Features: one folder per extractor, one ``<name>.npy`` per sample, shaped (D,) for utterance level or
(N, D) for frame level (mean-pooled here, as the MER2023 baseline's ``utt`` setting does).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

MER_CLASSES: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "worried", "surprise")
CLASS_TO_INDEX: dict[str, int] = {c: i for i, c in enumerate(MER_CLASSES)}
VALENCE_RANGE: tuple[float, float] = (-5.0, 5.0)
LABEL_COLUMNS = ("name", "discrete", "valence")


class MerLabel(NamedTuple):
    emotion: int  # index into MER_CLASSES
    valence: float  # NaN where the file has no valence (test3, pseudo-labels)


def read_label_csv(path: str | os.PathLike, *, require_valence: bool = True) -> dict[str, MerLabel]:
    """Read a MER2023 label CSV (columns name, discrete[, valence]) into ``{name: MerLabel}`` in file order.

    Raises ValueError naming the file, row and column on anything outside the official layout: a missing
    column, an empty or duplicated name, an unknown class, a valence that is not a number in [-5, 5].
    With ``require_valence=False`` the valence column may be missing or empty (NaN is stored).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label CSV not found")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from spreadsheet exports
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        required = ("name", "discrete", "valence") if require_valence else ("name", "discrete")
        for col in required:
            if col not in header:
                raise ValueError(
                    f"{path}: missing column {col!r} (found {header}); expected the MER2023 layout "
                    f"with columns {', '.join(LABEL_COLUMNS)}"
                )
        labels: dict[str, MerLabel] = {}
        for row_no, row in enumerate(reader, start=2):  # row 1 is the header
            name = (row.get("name") or "").strip()
            if not name:
                raise ValueError(f"{path}: row {row_no}, column 'name': empty sample name")
            if name in labels:
                raise ValueError(f"{path}: row {row_no}, column 'name': duplicate sample {name!r}")
            emotion = (row.get("discrete") or "").strip().lower()
            if emotion not in CLASS_TO_INDEX:
                raise ValueError(
                    f"{path}: row {row_no}, column 'discrete': {emotion!r} for {name!r} is not one of {list(MER_CLASSES)}"
                )
            labels[name] = MerLabel(CLASS_TO_INDEX[emotion], _parse_valence(path, row_no, name, row.get("valence"), require_valence))
    if not labels:
        raise ValueError(f"{path}: no samples (only a header?)")
    return labels


def _parse_valence(path: Path, row_no: int, name: str, text: str | None, required: bool) -> float:
    text = (text or "").strip()
    if not text:
        if required:
            raise ValueError(f"{path}: row {row_no}, column 'valence': empty for {name!r}; expected a number in [-5, 5]")
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}: row {row_no}, column 'valence': {text!r} for {name!r} is not a number") from None
    lo, hi = VALENCE_RANGE
    if not lo <= value <= hi:
        raise ValueError(f"{path}: row {row_no}, column 'valence': {value} for {name!r} is outside [{lo}, {hi}]")
    return value


def read_name_list(path: str | os.PathLike) -> list[str]:
    """Sample names from a CSV with a ``name`` column (e.g. a test label file) or a plain one-per-line list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: name list not found")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    if lines and path.suffix.lower() == ".csv":
        header = [h.strip() for h in next(csv.reader([lines[0]]))]
        if "name" not in header:
            raise ValueError(f"{path}: missing column 'name' (found {header})")
        col = header.index("name")
        lines = [row[col].strip() for row in csv.reader(lines[1:]) if len(row) > col and row[col].strip()]
    if len(set(lines)) != len(lines):
        raise ValueError(f"{path}: duplicate sample names")
    return lines


def labels_to_arrays(labels: Mapping[str, MerLabel], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(emotion int64 (N,), valence float32 (N,)) for ``names`` in order."""
    emotion = np.array([labels[n].emotion for n in names], dtype=np.int64)
    valence = np.array([labels[n].valence for n in names], dtype=np.float32)
    return emotion, valence


def write_prediction_csv(
    path: str | os.PathLike, names: Sequence[str], emotion: np.ndarray, valence: np.ndarray | None = None
) -> Path:
    """Predictions in the label layout (name, discrete, valence), the form MER2023 submissions took; without
    ``valence`` (pseudo-labels) the file has just name and discrete, as test3's labels do."""
    from expmae.jobs import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(LABEL_COLUMNS if valence is not None else LABEL_COLUMNS[:2])
        for i, (name, e) in enumerate(zip(names, emotion)):
            writer.writerow([name, MER_CLASSES[int(e)]] + ([f"{float(valence[i]):.4f}"] if valence is not None else []))
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Feature folders


@dataclass
class FeatureSet:
    """Utterance-level features of ``names`` from several inputs (one fusion branch each)."""

    names: list[str]
    arrays: dict[str, np.ndarray]  # branch name -> float32 (N, D)
    missing: dict[str, list[str]] = field(default_factory=dict)  # folder -> names with no usable .npy

    @property
    def dims(self) -> dict[str, int]:
        return {k: a.shape[1] for k, a in self.arrays.items()}

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: np.ndarray | Sequence[int]) -> "FeatureSet":
        index = np.asarray(index, dtype=np.int64)
        return FeatureSet([self.names[i] for i in index], {k: a[index] for k, a in self.arrays.items()})

    def concat(self, other: "FeatureSet") -> "FeatureSet":
        if list(self.arrays) != list(other.arrays):
            raise ValueError(f"cannot concatenate feature sets with branches {list(self.arrays)} and {list(other.arrays)}")
        return FeatureSet(self.names + other.names, {k: np.concatenate([a, other.arrays[k]]) for k, a in self.arrays.items()})


def parse_feature_specs(specs: Iterable[str]) -> dict[str, list[Path]]:
    """``["audio=/f/hubert", "/f/expmae"]`` -> ``{"audio": [hubert], "expmae": [expmae]}``.

    A spec is ``BRANCH=FOLDER`` or just ``FOLDER`` (the branch is the folder's name). Folders given the same
    branch name (several extractors of one modality) are concatenated along the feature axis.
    """
    branches: dict[str, list[Path]] = {}
    for spec in specs:
        branch, sep, folder = spec.partition("=")
        if not sep:
            folder, branch = spec, Path(spec.rstrip("/")).name
        folder_path = Path(folder)
        if not folder_path.is_dir():
            raise FileNotFoundError(f"feature folder {folder_path} (from {spec!r}) is not a directory")
        branches.setdefault(branch.strip(), []).append(folder_path)
    if not branches:
        raise ValueError("no feature folders given")
    return branches


def list_feature_names(folder: str | os.PathLike) -> list[str]:
    """Sample names with a ``.npy`` in ``folder``, sorted."""
    # Hidden files are temporaries of an interrupted atomic write (expmae.jobs.atomic_path), not samples.
    return sorted(p.stem for p in Path(folder).glob("*.npy") if not p.name.startswith("."))


def read_feature(path: Path) -> np.ndarray:
    """One sample's feature as float32 (D,): (D,) as is, (N, D) mean-pooled over N. Raises ValueError otherwise."""
    array = np.load(path, allow_pickle=False)  # no pickle: a .npy is data, never code
    if array.ndim == 2:
        if array.shape[0] == 0:
            raise ValueError(f"{path}: frame-level feature with 0 frames")
        array = array.mean(axis=0)
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(f"{path}: shape {array.shape}; expected (D,) or (N, D)")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: contains NaN or inf")
    return array


def load_folder(folder: Path, names: Sequence[str], *, progress: bool = True) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Read ``names`` from one folder: (features (N, D) with zero rows where unusable, missing names, bad {name: reason}).

    D is the most common feature size; a file of another size counts as bad (one extractor, one size).
    """
    from tqdm.auto import tqdm

    from expmae.jobs import one_line

    rows: dict[str, np.ndarray] = {}
    missing: list[str] = []
    bad: dict[str, str] = {}
    for name in tqdm(names, desc=f"features {folder.name}", disable=not progress, unit="file", leave=False):
        path = folder / f"{name}.npy"
        if not path.is_file():
            missing.append(name)
            continue
        try:
            rows[name] = read_feature(path)
        except Exception as exc:  # noqa: BLE001 - one unreadable file is reported, never fatal
            bad[name] = one_line(exc)
    if not rows:
        raise ValueError(f"{folder}: none of the {len(names)} requested samples has a usable .npy file")
    sizes, counts = np.unique([r.shape[0] for r in rows.values()], return_counts=True)
    dim = int(sizes[np.argmax(counts)])
    for name in [n for n, r in rows.items() if r.shape[0] != dim]:
        bad[name] = f"feature size {rows.pop(name).shape[0]} differs from the folder's {dim}"
    out = np.zeros((len(names), dim), dtype=np.float32)
    for i, name in enumerate(names):
        if name in rows:
            out[i] = rows[name]
    return out, missing, bad


def load_features(
    branches: Mapping[str, Sequence[Path]],
    names: Sequence[str],
    *,
    missing: str = "drop",
    progress: bool = True,
) -> FeatureSet:
    """Load every branch for ``names`` and apply the missing-sample policy.

    ``missing``: "drop" removes samples lacking any folder's feature, "zero" keeps them with zero features,
    "error" raises. Either way every folder's missing/bad names are kept in ``FeatureSet.missing`` (and the
    caller reports them): nothing disappears silently.
    """
    if missing not in ("drop", "zero", "error"):
        raise ValueError(f"missing={missing!r}; expected 'drop', 'zero' or 'error'")
    names = list(names)
    arrays: dict[str, np.ndarray] = {}
    unusable: dict[str, list[str]] = {}
    reasons: dict[str, dict[str, str]] = {}
    for branch, folders in branches.items():
        parts = []
        for folder in folders:
            array, absent, bad = load_folder(Path(folder), names, progress=progress)
            parts.append(array)
            if absent or bad:
                unusable[str(folder)] = absent + sorted(bad)
                reasons[str(folder)] = bad
        arrays[branch] = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if unusable and missing == "error":
        folder, lost = next(iter(unusable.items()))
        detail = reasons[folder].get(lost[0], "no .npy file")
        raise ValueError(f"{folder}: {len(lost)} of {len(names)} samples unusable (first: {lost[0]}: {detail}); "
                         "use missing='drop' or 'zero'")
    features = FeatureSet(names, arrays, missing=unusable)
    if unusable and missing == "drop":
        lost = set().union(*map(set, unusable.values()))
        keep = [i for i, n in enumerate(names) if n not in lost]
        features = FeatureSet([names[i] for i in keep], {k: a[keep] for k, a in arrays.items()}, missing=unusable)
    return features


def describe_missing(features: FeatureSet, policy: str) -> list[str]:
    """One report line per folder with unusable samples (count and the first few names)."""
    action = {"drop": "dropped", "zero": "zero-filled", "error": "fatal"}[policy]
    lines = []
    for folder, lost in features.missing.items():
        head = ", ".join(lost[:5]) + (", ..." if len(lost) > 5 else "")
        lines.append(f"{folder}: {len(lost)} samples without a usable feature ({action}): {head}")
    return lines
