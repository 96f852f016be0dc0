"""A launched process ends when the process that launched it is gone.

torch's elastic agent (``accelerate launch``, ``torchrun``) starts every rank in a session of its own, so killing
the launcher (``kill -9`` of its pid or process group, the OOM killer, a closed ssh session or tmux pane, a scheduler
that signals only the job step's leader) does not reach the ranks: they would train on without their agent, into a
folder that a resumed run is about to use. So each rank, and each of its DataLoader workers, asks to be killed when
its parent dies:

- Linux: ``prctl(PR_SET_PDEATHSIG)``. The kernel sends the signal when the *thread* that forked us exits. The
  elastic agent, the ``deepspeed`` launcher and torchrun start their ranks from their main thread, and a rank forks
  its DataLoader workers from its main thread (the training loop runs there), and a main thread ends only with its
  process; so "the parent thread exited" means "the launcher (or the rank) is gone".
- elsewhere (macOS): a daemon thread polls ``os.getppid()`` every ``POLL_S`` seconds; an orphan is adopted by
  another process, so the parent pid changes.

A rank's parent is the elastic agent under ``accelerate launch`` and ``torchrun``; ``deepspeed.launcher.launch``
under the ``deepspeed`` launcher (its runner is one level up: killing the runner's pid alone leaves that process and
its ranks running, killing its process group does not); Slurm's step daemon under ``srun`` without a launcher (Slurm
also ends a step whose srun is gone). ``mpirun`` sets none of the variables :func:`launched` reads: not armed.

If the parent died before the signal was armed the kernel will never send it; we then find ``os.getppid()``
already changed and stop at once. The window before the parent's pid is first read (a rank's interpreter start-up)
stays open when the launcher does not say who it is; a rank of an elastic agent that died that early waits for the
store its agent hosted (TORCHELASTIC_USE_AGENT_STORE) and fails at start-up instead of training.

The signal is SIGKILL: nothing is left to escalate if a handler (ours, a library's) delayed or ignored a SIGTERM,
and nothing needs a clean exit: a checkpoint being written stays an invisible ``step_*.tmp``, a torn last line
of a JSON-lines log is skipped when read, the run folder's lock is released by the kernel.
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


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL, use_prctl: bool = True) -> str:
    """Have this process killed with ``sig`` when its parent (pid ``parent``, default: the current parent) exits.
    Returns how: "prctl" or "watchdog" (``use_prctl=False`` forces the latter, as on systems without prctl)."""
    expected = os.getppid() if parent is None else parent
    how = "prctl" if use_prctl and _set_pdeathsig(sig) else _watch(expected, sig)
    if os.getppid() != expected:  # already orphaned: no signal will come
        os.kill(os.getpid(), sig)
    return how


def worker_init(parent: int, worker_id: int) -> None:
    """A DataLoader ``worker_init_fn`` (bind the rank's pid with functools.partial): the worker dies with its rank,
    even while stuck in a decoder (torch's own check of the parent runs only between batches)."""
    die_with_parent(parent)


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(expected: int, sig: int) -> str:
    def poll() -> None:
        while os.getppid() == expected:
            time.sleep(POLL_S)
        os.kill(os.getpid(), sig)

    threading.Thread(target=poll, name="parent watchdog", daemon=True).start()
    return "watchdog"
