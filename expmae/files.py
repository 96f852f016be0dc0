"""Files written whole or not at all: atomic replacement, exclusive creation, JSON, and append-only JSON-lines logs.

A killed writer leaves either the old file or the complete new one, never a truncated one; its temporary file
(``.<stem>.partial-<random><suffix>``, next to the output) is removed by :func:`remove_stale_temp_files`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


TEMP_MARK = ".partial-"  # in atomic_path's temporary names: '.<stem>.partial-<random><suffix>'


def remove_stale_temp_files(root: str | os.PathLike, stem: str = "*",
                            outputs: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """Delete the temporary files that atomic_path writers killed mid-write left under ``root`` (recursively;
    only those of outputs named ``stem`` if given, only those of the output paths ``outputs`` if given: a
    process sharing the folder with others cleans its own share). Call it only when no writer of them runs."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.rglob(f".{stem}{TEMP_MARK}*") if p.is_file()]
    if outputs is not None:  # '.<stem>.partial-<random><suffix>' next to <stem><suffix>
        resolve = functools.lru_cache(maxsize=None)(lambda folder: folder.resolve())  # few folders, many outputs
        wanted = {(resolve(Path(o).parent), Path(o).stem) for o in outputs}
        stale = [p for p in stale if (resolve(p.parent), p.name[1 : p.name.index(TEMP_MARK)]) in wanted]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The temporary name keeps the final suffix (or ``suffix``) so writers that infer the format from the
    extension (np.save, video muxers) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}{TEMP_MARK}",
                               suffix=suffix or path.suffix or ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp creates 0600 files; give outputs the permissions a plain open() would (shared machines).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Write a complete file at ``path`` unless one exists (then False): a hard link of a finished temporary file,
    atomic on local and network filesystems, so of several processes exactly one creates it and none sees it half
    written. On a filesystem without hard links the last writer wins."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}{TEMP_MARK}", suffix=path.suffix or ".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would (mkstemp makes 0600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem
            os.replace(tmp, path)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False,
               newline: bool = True) -> None:
    """Write ``obj`` as indented JSON, atomically; numpy scalars and arrays become numbers and lists."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default) + ("\n" if newline else "")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist") and type(o).__module__ == "numpy":  # numpy without importing it here
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_npy_atomic(path: str | os.PathLike, array) -> Path:
    """np.save through :func:`atomic_path` (np.save appends .npy unless the name already ends with it)."""
    import numpy as np  # deferred: console start-up: numpy, +50 ms on expmae-finetune and pretrain --help

    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


class JsonlLog:
    """An append-only JSON-lines file keyed by ``record['key']``; tolerant of a torn last line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a kill mid-write: that input is simply redone
                    continue
        return records

    def keys(self) -> set[str]:
        return {r["key"] for r in self.read() if "key" in r}

    def append(self, record: dict) -> None:
        self.extend([record])

    def extend(self, records: Iterable[dict]) -> None:
        """Append records with one write and one fsync."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: Iterable[dict]) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
