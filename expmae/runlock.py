"""One live writer per output folder: a run owns its folder (pretraining, crop, feature or finetune output) from
before its first write until it ends, and a second run on that folder stops at once with one line naming the owner.

Two mechanisms, both in the folder: an exclusive ``flock`` on ``.expmae_lock`` (exact on one machine: the kernel
releases it however the owner dies) and a heartbeat lease in ``.expmae_owner.json`` (the owner known across
machines on a shared filesystem, where locks may be per machine). The rules for stale leases, forked children and
a lost lease: docs/architecture.md ("Run folders and launched processes").
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from expmae.files import atomic_path

LOCK_NAME = ".expmae_lock"
LEASE_NAME = ".expmae_owner.json"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0  # 8 missed heartbeats
SETTLE_S = 1.0  # without a working flock: how long a new lease must survive before it counts as ours

_HELD: set = set()  # the FolderLocks this process holds (closed in forked children)


class FolderInUse(BlockingIOError):
    """A live run owns the folder. An OSError (would block): callers that report OSErrors in one line do so."""


@dataclass
class Lease:
    host: str
    pid: int
    since: float  # time.time() when the lease was taken
    heartbeat: float
    token: str  # tells our lease from a successor's
    command: str = ""

    @classmethod
    def read(cls, path: Path) -> "Lease | None":
        """The lease in ``path``; None when there is none or it cannot be read (then it is taken over)."""
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self)), encoding="utf-8")

    def describe(self, now: float | None = None) -> str:
        age = (time.time() if now is None else now) - self.heartbeat
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"pid {self.pid} on host {self.host} since {since} (last heartbeat {age:.0f} s ago)"

    def stale(self, stale_after_s: float, flock_free_here: bool | None) -> bool:
        """Whether a new run may take this lease over. ``flock_free_here``: we got the flock (True), it is held
        (False), or flock does not work on this filesystem (None)."""
        if self.host == socket.gethostname():
            if flock_free_here is not None:  # one kernel: the flock is the truth
                return flock_free_here
            if not _pid_alive(self.pid):
                return True
        return time.time() - self.heartbeat > stale_after_s


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _close_in_child() -> None:
    # A forked child (a DataLoader worker) drops its copy of the lock, so the owner's death alone frees the folder.
    for lock in list(_HELD):
        lock.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class FolderLock:
    """``with FolderLock(folder, what="output_dir"):`` or ``lock = FolderLock(...).acquire(); ...; lock.release()``.

    ``what`` names the folder in the refusal (a config key or option). ``create``: make the folder if missing
    (else a missing folder is FileNotFoundError). ``on_lost(lease)`` runs in the heartbeat thread when another
    run has taken the lease over; by default it prints one line and kills this process.
    """

    def __init__(self, folder: str | os.PathLike, *, what: str = "folder", create: bool = True,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
                 on_lost: Callable[[Lease | None], None] | None = None):
        self.folder, self.what, self.create = Path(folder), what, create
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.on_lost = on_lost or _stop_this_process
        self.fd: int | None = None
        self.lease: Lease | None = None
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lease_path(self) -> Path:
        return self.folder / LEASE_NAME

    def acquire(self) -> "FolderLock":
        """Own the folder, or raise FolderInUse naming the live owner (nothing written then)."""
        if self.create:
            self.folder.mkdir(parents=True, exist_ok=True)
        elif not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: no such folder")
        got_flock = self._flock()
        current = Lease.read(self.lease_path)
        for _ in range(20):  # the owner may hold the flock and not have written its lease yet
            if current is not None or got_flock is not False:
                break
            time.sleep(0.1)
            current = Lease.read(self.lease_path)
        if got_flock is False or (current is not None and not current.stale(self.stale_after_s, got_flock)):
            self._close()
            raise self._refusal(current)
        now = time.time()
        self.lease = Lease(host=socket.gethostname(), pid=os.getpid(), since=now, heartbeat=now,
                           token=secrets.token_hex(8), command=" ".join(sys.argv)[:300])
        try:
            self.lease.write(self.lease_path)
            if got_flock is None:  # no lock to order two starters: the last lease written wins, the other backs off
                time.sleep(SETTLE_S)
            theirs = Lease.read(self.lease_path)
        except BaseException:
            self._close()
            raise
        if theirs is None or theirs.token != self.lease.token:
            self._close()
            raise self._refusal(theirs)
        _HELD.add(self)
        atexit.register(self.release)
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.folder.name}", daemon=True)
        self._thread.start()
        return self

    def _flock(self) -> bool | None:
        """True: we hold the flock; False: another process does; None: this filesystem has no working flock."""
        self.fd = os.open(self.folder / LOCK_NAME, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            return None  # ENOLCK, EOPNOTSUPP, ENOSYS: the lease alone decides

    def _refusal(self, owner: Lease | None) -> FolderInUse:
        who = owner.describe() if owner is not None else "a process that holds its lock but wrote no lease"
        kill = f"kill {owner.pid} on {owner.host}" if owner is not None else f"fuser {self.folder / LOCK_NAME} names it"
        return FolderInUse(f"{self.what}={self.folder} is in use by a live run: {who}; wait for it to end, stop it "
                           f"({kill}), or use another {self.what} (a lease on a shared filesystem is taken over "
                           f"when its heartbeat is {self.stale_after_s:.0f} s old)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = Lease.read(self.lease_path)
            if current is not None and current.token != self.lease.token:
                self.on_lost(current)
                return
            self.lease.heartbeat = time.time()
            try:
                self.lease.write(self.lease_path)
            except OSError as exc:  # a filesystem hiccup: the next beat tries again, the lease has 8 of them
                print(f"warning: could not renew {self.lease_path}: {exc}", file=sys.stderr)

    def release(self) -> None:
        """Give the folder up (idempotent; only in the process that took it)."""
        if os.getpid() != self.pid or self.lease is None:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        current = Lease.read(self.lease_path)
        if current is not None and current.token == self.lease.token:
            self.lease_path.unlink(missing_ok=True)
        self.lease = None
        _HELD.discard(self)
        atexit.unregister(self.release)
        self._close()

    def forget(self) -> None:
        """In a forked child: close the inherited descriptor without unlocking (the parent still owns it)."""
        self.lease = None
        _HELD.discard(self)
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _stop_this_process(lease: Lease | None) -> None:
    # Our lease was taken over (we were frozen past STALE_AFTER_S, say): two writers are worse than a lost run.
    print(f"error: this run lost its folder to {lease.describe() if lease else 'another run'}; stopping so that "
          f"only one run writes there", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
