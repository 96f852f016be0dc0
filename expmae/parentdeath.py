"""A launched process ends when the process that launched it is gone.

torch's elastic agent starts every rank in a session of its own, so killing the launcher (``kill -9``, the OOM
killer, a closed ssh session) does not reach the ranks: they would train on into a folder that a resumed run is
about to use. So each rank, and each of its DataLoader workers, asks to be killed (SIGKILL) when its parent dies:
``prctl(PR_SET_PDEATHSIG)`` on Linux, a watchdog thread elsewhere. Why this design, and which parent each launcher
leaves: docs/architecture.md ("Run folders and launched processes").
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 0.5


def launched() -> bool:
    """Started by a launcher that waits on this process: accelerate launch, torchrun and the deepspeed launcher set
    LOCAL_RANK; Slurm's srun sets SLURM_STEP_ID (its step daemon is the parent)."""
    return "LOCAL_RANK" in os.environ or "SLURM_STEP_ID" in os.environ


# SIGKILL by default: a handler cannot delay or ignore it, and nothing needs a clean exit (an unfinished checkpoint
# stays an unread step_*.tmp, a torn JSON-lines tail is skipped on read, the kernel frees the folder lock).
def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL, use_prctl: bool = True) -> str:
    """Have this process killed with ``sig`` when its parent (pid ``parent``, default: the current parent) exits.
    Returns how: "prctl" or "watchdog" (``use_prctl=False`` forces the latter, as on systems without prctl)."""
    expected = os.getppid() if parent is None else parent
    how = "prctl" if use_prctl and _set_pdeathsig(sig) else _watch(expected, sig)
    if os.getppid() != expected:  # the parent died before the signal was armed: the kernel will never send it
        os.kill(os.getpid(), sig)
    return how


def worker_init(parent: int, worker_id: int) -> None:
    """A DataLoader ``worker_init_fn`` (bind the rank's pid with functools.partial): the worker dies with its rank,
    even while stuck in a decoder (torch's own check of the parent runs only between batches)."""
    die_with_parent(parent)


def _set_pdeathsig(sig: int) -> bool:
    # The kernel signals when the *thread* that forked us exits; launchers start ranks, and ranks fork workers, from
    # their main thread, which ends only with its process: so this fires when the parent process is gone.
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(expected: int, sig: int) -> str:
    # Without prctl (macOS): an orphan is adopted by another process, so its parent pid changes.
    def poll() -> None:
        while os.getppid() == expected:
            time.sleep(POLL_S)
        os.kill(os.getpid(), sig)

    threading.Thread(target=poll, name="parent watchdog", daemon=True).start()
    return "watchdog"
