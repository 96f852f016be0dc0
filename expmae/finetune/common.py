"""Small helpers every part of finetuning shares: a content digest, metrics as JSON, log lines."""
from __future__ import annotations

import hashlib
import json
import math
import sys
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


def clean(metrics: dict[str, float]) -> dict[str, float | None]:
    """Metrics as JSON: NaN / inf (a metric without truth) become None."""
    return {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"
