"""Small helpers every part of finetuning shares: a content digest, JSON writing, log lines."""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np


def digest(*parts: Any) -> str:
    """SHA-1 of arrays (dtype, shape, bytes) and JSON-able values: the key of a fold's inputs and settings."""
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(f"{p.dtype}{p.shape}".encode() + p.tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (numpy scalars and arrays become numbers and lists)."""
    from expmae.jobs import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def clean(metrics: dict[str, float]) -> dict[str, float | None]:
    """Metrics as JSON: NaN / inf (a metric without truth) become None."""
    return {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"
