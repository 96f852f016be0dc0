"""Shares of a job across processes and machines, and the logs each share writes.

Under ``accelerate launch``, torchrun, a Slurm array or ``--shard I/N``, each process takes the inputs whose key
hashes to its :class:`Shard` and appends its records to its own files, ``manifest.d/<shard>.jsonl`` and
``failures.d/<shard>.jsonl`` (a lone process keeps the two plain files). Readers merge them (:func:`read_manifest`);
an input is finished iff its key is in *any* of them, so a rerun with another number of processes skips exactly the
finished work; :func:`merge_job_logs` writes the single files. docs/cluster.md shows the launches.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from expmae.files import JsonlLog


# ----------------------------------------------------------------------------------------- shares of a job
def key_hash(key: str) -> int:
    """A stable 64-bit hash of an input key (Python's hash() differs between processes)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count``: the inputs whose key hashes to ``index`` modulo ``count``.

    By hash, not by position in the sorted list: a key's share does not depend on which other inputs exist, so
    processes that list the folder at different times (Slurm array tasks start minutes apart, videos keep
    arriving) still split it disjointly and completely. The price is balance: shares differ by about
    sqrt(inputs / count) inputs (3% at 73,000 videos over 64 processes).
    """

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not (isinstance(self.index, int) and isinstance(self.count, int) and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index}/{self.count}: expected I/N with 0 <= I < N")

    @property
    def name(self) -> str:
        """This share's log file stem: every (I, N) its own, so runs with different N never append to one file."""
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def owns(self, key: str) -> bool:
        return self.count == 1 or key_hash(key) % self.count == self.index

    def split(self, inner: "Shard") -> "Shard":
        """Share ``inner`` of this share: e.g. a Slurm array task (outer) that runs 8 launched processes (inner)."""
        return Shard(self.index * inner.count + inner.index, self.count * inner.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"3/8"`` -> Shard(3, 8), or a one-line ValueError."""
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r}: expected I/N, e.g. 3/8 (share 3 of 8, counted from 0)") from None
    return Shard(index, count)


def _env_int(environ, name: str) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def slurm_array_shard(environ=None) -> Shard | None:
    """This Slurm array task's share (``sbatch --array=0-63`` -> 64 shares), or None outside an array."""
    environ = os.environ if environ is None else environ
    task = _env_int(environ, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    low, high = _env_int(environ, "SLURM_ARRAY_TASK_MIN"), _env_int(environ, "SLURM_ARRAY_TASK_MAX")
    step = _env_int(environ, "SLURM_ARRAY_TASK_STEP") or 1
    count = _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
    if low is None or (count is None and high is None):
        raise ValueError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT (or _MAX) are "
                         "not: pass --shard I/N")
    count = count if count is not None else (high - low) // step + 1
    index, rest = divmod(task - low, step)
    if rest or not 0 <= index < count:
        raise ValueError(f"Slurm array task {task} is not one of {count} evenly spaced tasks from {low} (step {step}): "
                         "use --array=A-B[:S] or pass --shard I/N")
    return Shard(index, count)


def launcher_shard(environ=None) -> Shard:
    """This process's global rank over all machines, from accelerate launch / torchrun (RANK, WORLD_SIZE)."""
    environ = os.environ if environ is None else environ
    rank, world = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
    if rank is None or world is None:
        return Shard()
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return Shard(rank, world)


def resolve_shard(explicit: str | Shard | None = None, environ=None) -> Shard:
    """This process's share: ``explicit`` (``--shard I/N``) or else the Slurm array task, then split among the
    processes of a launcher (``accelerate launch`` inside each array task works too). SLURM_PROCID is ignored on
    purpose: a batch script of ``--ntasks=8`` sees it even where it runs the tool once, not through srun."""
    outer = explicit if isinstance(explicit, Shard) else parse_shard(explicit) if explicit else None
    outer = outer or slurm_array_shard(environ) or Shard()
    return outer.split(launcher_shard(environ))


# -------------------------------------------------------------------------------- logs written per process
class JsonlShards:
    """A JSON-lines log kept as one file per writing process (``folder/<shard>.jsonl``) and read merged: processes
    on several machines never append to one file (appends from two NFS clients can interleave or overwrite)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def append(self, record: dict, shard: str) -> None:
        JsonlLog(self.folder / f"{shard}.jsonl").append(record)

    def read(self) -> list[dict]:
        """Every shard's records, shard after shard (in name order)."""
        files = sorted(self.folder.glob("*.jsonl")) if self.folder.is_dir() else []
        return [r for f in files for r in JsonlLog(f).read()]


def process_shard() -> str:
    """This process's shard name: its launcher rank and DataLoader worker, e.g. ``rank3-worker1``."""
    # deferred: console start-up: torch, +1.5 s on expmae-crop and expmae-features --help (both load this module)
    from torch.utils.data import get_worker_info

    worker = get_worker_info()
    return f"rank{os.environ.get('RANK', '0')}-" + (f"worker{worker.id}" if worker is not None else "main")


# ------------------------------------------------------------------------------- manifests of a job folder
def manifest_files(out_dir: str | os.PathLike, log: str = "manifest") -> list[Path]:
    """The files of one log of a job folder: ``<log>.jsonl`` first, then ``<log>.d/*.jsonl`` in name order."""
    out_dir = Path(out_dir)
    single = [out_dir / f"{log}.jsonl"] if (out_dir / f"{log}.jsonl").is_file() else []
    return single + (sorted((out_dir / f"{log}.d").glob("*.jsonl")) if (out_dir / f"{log}.d").is_dir() else [])


def read_manifest(out_dir: str | os.PathLike, log: str = "manifest") -> list[dict]:
    """Every process's records of a job folder, one per key (the first in :func:`manifest_files` order wins, so the
    merged ``manifest.jsonl`` shadows the shards it was made from)."""
    records: dict[str, dict] = {}
    for path in manifest_files(out_dir, log):
        for r in JsonlLog(path).read():
            records.setdefault(r.get("key"), r)
    records.pop(None, None)
    return list(records.values())


def job_logs(out_dir: str | os.PathLike, shard: Shard = Shard()) -> tuple[JsonlLog, JsonlLog]:
    """(manifest, failures) this process appends to: the plain files alone, its own shard files otherwise."""
    out_dir = Path(out_dir)
    if shard.count == 1:
        return JsonlLog(out_dir / "manifest.jsonl"), JsonlLog(out_dir / "failures.jsonl")
    return (JsonlLog(out_dir / "manifest.d" / f"{shard.name}.jsonl"),
            JsonlLog(out_dir / "failures.d" / f"{shard.name}.jsonl"))


def merge_job_logs(out_dir: str | os.PathLike) -> dict:
    """Write the single ``manifest.jsonl`` (every finished key once, sorted by key) and ``failures.jsonl`` (every
    still-failing key once) that downstream tools read. Idempotent; the shard files stay (readers let the merged
    file shadow them), so a merge while processes still run loses nothing: merge again when they end."""
    out_dir = Path(out_dir)
    if not manifest_files(out_dir) and not manifest_files(out_dir, "failures"):
        raise FileNotFoundError(f"{out_dir}: no manifest.jsonl or manifest.d/ (not a job output folder)")
    done = sorted(read_manifest(out_dir), key=lambda r: r["key"])
    finished = {r["key"] for r in done}
    failed = sorted((r for r in read_manifest(out_dir, "failures") if r["key"] not in finished), key=lambda r: r["key"])
    manifest, failures = job_logs(out_dir)
    manifest.rewrite(done)
    if failed or failures.path.exists():
        failures.rewrite(failed)
    return {"done": len(done), "failed": len(failed),
            "shards": len(manifest_files(out_dir)) - manifest.path.is_file()}
