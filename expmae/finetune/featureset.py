"""Per-sample feature folders: one folder per extractor (expmae-features output), one ``<name>.npy`` per sample,
shaped (D,) for utterance level or (N, D) for frame level (mean-pooled here, as the MER2023 baseline's ``utt``
setting does). Folders are fusion branches; folders given one branch name are concatenated.

For a head that reads tokens (``attentive``), ``tokens=True`` keeps frame level: a branch is then (samples, K, D),
K the most frames of any sample, the rows past a sample's own frames NaN (the head masks them out; a (D,) file is
one token).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from expmae.jobs import one_line


@dataclass
class FeatureSet:
    """Utterance-level features of ``names`` from several inputs (one fusion branch each)."""

    names: list[str]
    arrays: dict[str, np.ndarray]  # branch name -> float32 (N, D), or (N, K, D) tokens, NaN rows = padding
    missing: dict[str, list[str]] = field(default_factory=dict)  # folder -> names with no usable .npy

    @property
    def dims(self) -> dict[str, int]:
        return {k: a.shape[-1] for k, a in self.arrays.items()}

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: np.ndarray | Sequence[int]) -> "FeatureSet":
        index = np.asarray(index, dtype=np.int64)
        return FeatureSet([self.names[i] for i in index], {k: a[index] for k, a in self.arrays.items()})

    def concat(self, other: "FeatureSet") -> "FeatureSet":
        if list(self.arrays) != list(other.arrays):
            raise ValueError(f"cannot concatenate feature sets with branches {list(self.arrays)} and {list(other.arrays)}")
        return FeatureSet(self.names + other.names,
                          {k: np.concatenate(pad_tokens([a, other.arrays[k]])) for k, a in self.arrays.items()})


def pad_tokens(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Token arrays (N_i, K_i, D) padded with NaN rows to one K (vectors (N_i, D) are returned as they are)."""
    if arrays[0].ndim != 3:
        return list(arrays)
    k = max(a.shape[1] for a in arrays)
    return [np.pad(a, ((0, 0), (0, k - a.shape[1]), (0, 0)), constant_values=np.nan) for a in arrays]


def input_stats(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of a branch, over samples (and their tokens, padding left out): (D,), (D,)."""
    if array.ndim == 3:
        return np.nanmean(array, axis=(0, 1)), np.nanstd(array, axis=(0, 1))
    return array.mean(0), array.std(0)


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
    # Hidden files are temporaries of an interrupted atomic write (expmae.files.atomic_path), not samples.
    return sorted(p.stem for p in Path(folder).glob("*.npy") if not p.name.startswith("."))


def read_feature(path: Path, tokens: bool = False) -> np.ndarray:
    """One sample's feature as float32 (D,): (D,) as is, (N, D) mean-pooled over N; with ``tokens``, (N, D) as
    is and (D,) as (1, D). Raises ValueError otherwise."""
    array = np.load(path, allow_pickle=False)  # no pickle: a .npy is data, never code
    if array.ndim == 2:
        if array.shape[0] == 0:
            raise ValueError(f"{path}: frame-level feature with 0 frames")
        array = array if tokens else array.mean(axis=0)
    elif tokens and array.ndim == 1:
        array = array[None]
    if array.ndim != 1 + tokens or array.shape[-1] == 0:
        raise ValueError(f"{path}: shape {array.shape}; expected (D,) or (N, D)")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: contains NaN or inf")
    return array


def load_folder(folder: Path, names: Sequence[str], *, progress: bool = True,
                tokens: bool = False) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Read ``names`` from one folder: (features (N, D) with zero rows where unusable, missing names, bad {name: reason}).

    D is the most common feature size; a file of another size counts as bad (one extractor, one size). With
    ``tokens``: (N, K, D), NaN-padded (:func:`pad_tokens`); an unusable sample is one zero token.
    """
    rows: dict[str, np.ndarray] = {}
    missing: list[str] = []
    bad: dict[str, str] = {}
    for name in tqdm(names, desc=f"features {folder.name}", disable=not progress, unit="file", leave=False):
        path = folder / f"{name}.npy"
        if not path.is_file():
            missing.append(name)
            continue
        try:
            rows[name] = read_feature(path, tokens)
        except Exception as exc:  # noqa: BLE001 - one unreadable file is reported, never fatal
            bad[name] = one_line(exc)
    if not rows:
        raise ValueError(f"{folder}: none of the {len(names)} requested samples has a usable .npy file")
    sizes, counts = np.unique([r.shape[-1] for r in rows.values()], return_counts=True)
    dim = int(sizes[np.argmax(counts)])
    for name in [n for n, r in rows.items() if r.shape[-1] != dim]:
        bad[name] = f"feature size {rows.pop(name).shape[-1]} differs from the folder's {dim}"
    if tokens:  # (N, K, D): each sample's frames, then NaN rows; an unusable sample: one zero token
        out = np.full((len(names), max(len(r) for r in rows.values()), dim), np.nan, dtype=np.float32)
        out[:, 0] = 0.0
    else:
        out = np.zeros((len(names), dim), dtype=np.float32)
    for i, name in enumerate(names):
        if name in rows and tokens:
            out[i, : len(rows[name])] = rows[name]
        elif name in rows:
            out[i] = rows[name]
    return out, missing, bad


def load_features(
    branches: Mapping[str, Sequence[Path]],
    names: Sequence[str],
    *,
    missing: str = "drop",
    progress: bool = True,
    tokens: bool = False,
) -> FeatureSet:
    """Load every branch for ``names`` and apply the missing-sample policy.

    ``missing``: "drop" removes samples lacking any folder's feature, "zero" keeps them with zero features,
    "error" raises. Either way every folder's missing/bad names are kept in ``FeatureSet.missing`` (and the
    caller reports them): nothing disappears silently. ``tokens``: frame-level files stay frame level (see
    :func:`load_folder`); a branch then takes one folder.
    """
    if missing not in ("drop", "zero", "error"):
        raise ValueError(f"missing={missing!r}; expected 'drop', 'zero' or 'error'")
    names = list(names)
    arrays: dict[str, np.ndarray] = {}
    unusable: dict[str, list[str]] = {}
    reasons: dict[str, dict[str, str]] = {}
    for branch, folders in branches.items():
        if tokens and len(folders) > 1:
            raise ValueError(f"branch {branch!r}: {len(folders)} folders; a head that reads tokens takes one folder "
                             "per branch (name them BRANCH1=..., BRANCH2=...)")
        parts = []
        for folder in folders:
            array, absent, bad = load_folder(Path(folder), names, progress=progress, tokens=tokens)
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
