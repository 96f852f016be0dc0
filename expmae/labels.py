"""Label CSVs: any labelled set (``name``, a class column, optional regression columns), MER2023 as one format.

A :class:`LabelFormat` says which columns mean what and the class order: ``csv`` (any set: a ``label`` column,
classes from ``--classes`` or sorted) or ``mer2023`` (the official release's columns, in the organisers' class
order so indices match their predictions); ``auto`` picks ``csv`` for a file with a ``label`` column (or when
``--label-column`` is given), else ``mer2023``. Both layouts: docs/guides/finetuning.md ("Label files and the
predictions file").
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from expmae.files import atomic_path

MER_CLASSES: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "worried", "surprise")
CLASS_TO_INDEX: dict[str, int] = {c: i for i, c in enumerate(MER_CLASSES)}
VALENCE_RANGE: tuple[float, float] = (-5.0, 5.0)
LABEL_COLUMNS = ("name", "discrete", "valence")
AFFECT_COLUMNS = ("valence", "arousal", "dominance")  # regression columns a generic CSV is searched for
DATASETS = ("auto", "csv", "mer2023")


@dataclass(frozen=True)
class LabelFormat:
    """How a label CSV is read."""

    name: str  # "csv" | "mer2023"
    label_column: str = "label"
    classes: tuple[str, ...] | None = None  # index order; None: the sorted class names of the training file
    targets: tuple[str, ...] | None = None  # regression columns; None: the AFFECT_COLUMNS a file has
    lowercase: bool = False  # class names compared case-insensitively (MER2023 files mix "Neutral" / "neutral")
    target_range: tuple[float, float] | None = None  # allowed regression values

    @property
    def is_mer(self) -> bool:
        return self.name == "mer2023"


MER2023 = LabelFormat("mer2023", "discrete", MER_CLASSES, ("valence",), lowercase=True, target_range=VALENCE_RANGE)


@dataclass
class LabelSet:
    """The rows of a label CSV: class indices, regression targets (NaN where empty) and the other columns."""

    names: list[str]
    label: np.ndarray  # int64 (N,), index into classes
    targets: np.ndarray  # float32 (N, R), NaN where the file has no value
    classes: tuple[str, ...]
    target_names: tuple[str, ...]
    columns: dict[str, list[str]] = field(default_factory=dict)  # every other column, as text

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, names: Sequence[str]) -> np.ndarray:
        index = {n: i for i, n in enumerate(self.names)}
        return np.array([index[n] for n in names], dtype=np.int64)

    def arrays(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(class index int64 (N,), targets float32 (N, R)) of ``names``, in order."""
        rows = self.rows(names)
        return self.label[rows], self.targets[rows]


def label_format(path: str | os.PathLike, dataset: str = "auto", *, label_column: str = "", classes: str = "",
                 targets: str = "auto") -> LabelFormat:
    """The format of the Train&Val file ``path``: ``dataset`` ("auto", "csv", "mer2023") and the overrides
    ``label_column``, ``classes`` (comma-separated, in index order), ``targets`` ("auto", "none" or columns)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r}; expected one of {DATASETS}")
    header = read_header(path)
    if dataset == "auto":
        dataset = "csv" if "label" in header or label_column else "mer2023"
    base = MER2023 if dataset == "mer2023" else LabelFormat("csv")
    overrides = {}
    if label_column:
        overrides["label_column"] = label_column
    if classes:
        names = tuple(c.strip() for c in classes.split(",") if c.strip())
        if len(set(names)) != len(names) or len(names) < 2:
            raise ValueError(f"classes={classes!r}: expected two or more distinct comma-separated class names")
        overrides["classes"] = tuple(c.lower() for c in names) if base.lowercase else names
    if targets != "auto":
        overrides["targets"] = () if targets in ("", "none") else tuple(t.strip() for t in targets.split(",") if t.strip())
    elif base.targets is None:
        overrides["targets"] = tuple(c for c in AFFECT_COLUMNS if c in header)
    return LabelFormat(**{**base.__dict__, **overrides})


def read_header(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label CSV not found")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from spreadsheet exports
        return [h.strip() for h in next(csv.reader(f), [])]


def read_labels(path: str | os.PathLike, fmt: LabelFormat, *, require_targets: bool = True) -> LabelSet:
    """Read a label CSV in format ``fmt``; classes not fixed by ``fmt`` are the file's, sorted.

    Raises ValueError naming the file, row and column on a missing column, an empty or duplicated name, an
    unknown class, a regression value that is not a number (or is outside ``fmt.target_range``). With
    ``require_targets=False`` regression columns may be missing or empty (NaN is stored).
    """
    path = Path(path)
    header = read_header(path)
    targets = fmt.targets or ()
    required = ("name", fmt.label_column) + (targets if require_targets else ())
    for col in required:
        if col not in header:
            layout = f"the MER2023 layout with columns {', '.join(LABEL_COLUMNS)} (any other set: a 'label' " \
                "column, or --label-column)" if fmt.is_mer else \
                f"columns name, {fmt.label_column}" + "".join(f", {t}" for t in targets)
            raise ValueError(f"{path}: missing column {col!r} (found {header}); expected {layout}")
    rows = _read_rows(path, fmt)
    classes = fmt.classes or tuple(sorted({text for _, text, _ in rows}))
    index = {c: i for i, c in enumerate(classes)}
    names, label, values = [], [], []
    for row_no, text, row in rows:
        if text not in index:
            raise ValueError(f"{path}: row {row_no}, column {fmt.label_column!r}: {text!r} for {row['name']!r} "
                             f"is not one of {list(classes)}")
        names.append(row["name"])
        label.append(index[text])
        values.append([_parse_target(path, row_no, row["name"], t, row.get(t), require_targets, fmt.target_range)
                       for t in targets])
    other = [c for c in header if c not in ("name", fmt.label_column, *targets)]
    return LabelSet(names, np.array(label, dtype=np.int64), np.array(values, dtype=np.float32).reshape(len(names), len(targets)),
                    tuple(classes), tuple(targets), {c: [r[c] for _, _, r in rows] for c in other})


def _read_rows(path: Path, fmt: LabelFormat) -> list[tuple[int, str, dict]]:
    """(row number, class text, stripped row) of every row; names checked (non-empty, unique)."""
    rows, seen = [], set()
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [h.strip() for h in (reader.fieldnames or [])]
        for row_no, row in enumerate(reader, start=2):  # row 1 is the header
            row = {k: (v or "").strip() for k, v in row.items() if k is not None}
            name = row.get("name", "")
            if not name:
                raise ValueError(f"{path}: row {row_no}, column 'name': empty sample name")
            if name in seen:
                raise ValueError(f"{path}: row {row_no}, column 'name': duplicate sample {name!r}")
            seen.add(name)
            text = row.get(fmt.label_column, "")
            rows.append((row_no, text.lower() if fmt.lowercase else text, row))
    if not rows:
        raise ValueError(f"{path}: no samples (only a header?)")
    return rows


def _parse_target(path: Path, row_no: int, name: str, column: str, text: str | None, required: bool,
                  value_range: tuple[float, float] | None) -> float:
    text = (text or "").strip()
    if not text:
        if required:
            expected = f"a number in [{value_range[0]:g}, {value_range[1]:g}]" if value_range else "a number"
            raise ValueError(f"{path}: row {row_no}, column {column!r}: empty for {name!r}; expected {expected}")
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}: row {row_no}, column {column!r}: {text!r} for {name!r} is not a number") from None
    if value_range is not None and not value_range[0] <= value <= value_range[1]:
        lo, hi = value_range
        raise ValueError(f"{path}: row {row_no}, column {column!r}: {value} for {name!r} is outside [{lo}, {hi}]")
    return value


def is_label_file(path: str | os.PathLike, fmt: LabelFormat) -> bool:
    """A CSV with ``fmt``'s class column (a labelled test set), as opposed to a name list."""
    p = Path(path)
    return p.suffix.lower() == ".csv" and p.is_file() and fmt.label_column in read_header(p)


# ----------------------------------------------------------------------------------------------------------
# MER2023 in its own terms (used by expmae.data and tests): {name: (emotion, valence)}


class MerLabel(NamedTuple):
    emotion: int  # index into MER_CLASSES
    valence: float  # NaN where the file has no valence (test3, pseudo-labels)


def read_label_csv(path: str | os.PathLike, *, require_valence: bool = True) -> dict[str, MerLabel]:
    """Read a MER2023 label CSV (columns name, discrete[, valence]) into ``{name: MerLabel}`` in file order."""
    labels = read_labels(path, MER2023, require_targets=require_valence)
    return {n: MerLabel(int(e), float(v[0])) for n, e, v in zip(labels.names, labels.label, labels.targets)}


def labels_to_arrays(labels: Mapping[str, MerLabel], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(emotion int64 (N,), valence float32 (N,)) for ``names`` in order."""
    emotion = np.array([labels[n].emotion for n in names], dtype=np.int64)
    valence = np.array([labels[n].valence for n in names], dtype=np.float32)
    return emotion, valence


# ----------------------------------------------------------------------------------------------------------
# Name lists and prediction CSVs


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


def write_predictions(path: str | os.PathLike, names: Sequence[str], label: np.ndarray, fmt: LabelFormat,
                      classes: Sequence[str], targets: np.ndarray | None = None,
                      extra: Mapping[str, Sequence] | None = None) -> Path:
    """Predictions in the label layout (name, class column, regression columns, then ``extra`` columns), so they
    read back with :func:`read_labels`; without ``targets`` just name and class (pseudo-labels)."""
    target_names = list(fmt.targets or ()) if targets is not None else []
    extra = dict(extra or {})
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", fmt.label_column, *target_names, *extra])
        for i, (name, c) in enumerate(zip(names, label)):
            values = [f"{float(v):.4f}" for v in targets[i]] if targets is not None else []
            writer.writerow([name, classes[int(c)], *values, *(col[i] for col in extra.values())])
    return Path(path)


def write_prediction_csv(path: str | os.PathLike, names: Sequence[str], emotion: np.ndarray,
                         valence: np.ndarray | None = None) -> Path:
    """MER2023 predictions (name, discrete, valence), the form submissions took; without ``valence``
    (pseudo-labels) just name and discrete, as test3's labels."""
    targets = None if valence is None else np.asarray(valence, dtype=np.float32).reshape(-1, 1)
    return write_predictions(path, names, emotion, MER2023, MER_CLASSES, targets)
