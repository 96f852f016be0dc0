"""Start-up checks of a run folder, taken once for all ranks: does this run own ``train.output_dir`` (no other live
run writes there; expmae.runlock), is it one folder that every rank sees (a nonce file), which checkpoint to resume
(rank 0 decides and broadcasts, so nodes whose NFS caches disagree still resume the same one), and does that
checkpoint fit this run."""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import torch.distributed as dist

from expmae.checkpoint import (TRAIN_STATE_NAME, latest_checkpoint, read_model_config, remove_partial,
                               resolve_checkpoint)
from expmae.config import ConfigError
from expmae.runlock import FolderInUse, FolderLock

NONCE_NAME = ".expmae_nonce"


def find_resume_checkpoint(resume: str, ckpt_dir: Path) -> Path | None:
    """``--resume`` (auto | none | PATH) -> the checkpoint to start from, or None for a fresh run."""
    existing = latest_checkpoint(ckpt_dir)
    if resume == "none":
        if existing is not None:
            raise FileExistsError(
                f"{ckpt_dir} already holds checkpoints (newest {existing.name}); pass --resume auto to continue "
                f"that run or set train.output_dir to a new folder"
            )
        return None
    if resume == "auto":
        return existing
    try:
        return resolve_checkpoint(resume)
    except FileNotFoundError as exc:
        raise ConfigError(f"--resume {resume}: {exc}") from None


def _from_rank0(accelerator, compute):
    """``compute()`` on rank 0, its result (or its exception) on every rank."""
    box = [None]
    if accelerator.is_main_process:
        try:
            box[0] = ("ok", compute())
        except (ConfigError, FileExistsError, FolderInUse) as exc:
            box[0] = ("error", exc)
    if accelerator.num_processes > 1:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def claim_output_dir(accelerator, out_dir: Path):
    """Rank 0 creates ``out_dir`` and takes its lock (expmae.runlock) before anything is written there; every rank
    gets the answer, so a folder that a live run owns stops all ranks with the same one-line FolderInUse. Returns
    the lock on rank 0 (release it when the run ends), None on the other ranks."""
    held = []
    _from_rank0(accelerator, lambda: held.append(FolderLock(out_dir, what="train.output_dir").acquire()))
    return held[0] if held else None


def choose_resume(accelerator, resume: str, ckpt_dir: Path) -> Path | None:
    """Rank 0 picks the checkpoint (and removes partial saves); every rank gets its choice."""
    def pick():
        chosen = find_resume_checkpoint(resume, ckpt_dir)
        remove_partial(ckpt_dir)
        return None if chosen is None else str(chosen)

    chosen = _from_rank0(accelerator, pick)
    return None if chosen is None else Path(chosen)


def check_shared_output_dir(accelerator, out_dir: Path, seen_as: Path | None = None, wait_s: float = 10.0) -> None:
    """Rank 0 writes a fresh nonce into ``out_dir``; every rank must read it back there (``seen_as``: where this
    rank looks, for tests). NFS may show a new file late, so a rank retries for up to ``wait_s`` seconds."""
    if accelerator.num_processes == 1:
        return
    path = (seen_as or out_dir) / NONCE_NAME

    def write():
        out_dir.mkdir(parents=True, exist_ok=True)
        nonce = secrets.token_hex(16)
        (out_dir / NONCE_NAME).write_text(nonce, encoding="utf-8")
        return nonce

    nonce = _from_rank0(accelerator, write)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            ok = path.read_text(encoding="utf-8") == nonce
        except OSError:
            ok = False
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    seen = [None] * accelerator.num_processes
    dist.all_gather_object(seen, ok)
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(
            f"train.output_dir={out_dir} is not the same folder on every rank (rank {', '.join(map(str, blind))} "
            f"cannot see rank 0's {NONCE_NAME} there): it must be a folder that all machines share (NFS, Lustre, ...)"
        )


def check_resumable(checkpoint: Path, model_config: dict, run_shape: dict) -> None:
    """Before loading: a different model or run shape would fail deep inside load_state, or resume inexactly."""
    saved_model = read_model_config(checkpoint)
    changed = sorted(k for k in model_config if json.dumps(model_config[k]) != json.dumps(saved_model.get(k)))
    if changed:
        raise ConfigError(f"{checkpoint}: the model config differs from the checkpoint's in {', '.join(changed)}")
    saved_shape = json.loads((checkpoint / TRAIN_STATE_NAME).read_text()).get("run_shape")
    if saved_shape != run_shape:
        raise ConfigError(f"{checkpoint}: written with {saved_shape}, this run is {run_shape}; "
                          f"an exact resume needs the same ranks, batch size and accumulation")
