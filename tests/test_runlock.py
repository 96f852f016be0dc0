"""One writer per folder (expmae.runlock) and processes that die with their parent (expmae.parentdeath): real
processes, real flocks and signals; the launched 2-rank runs are in test_pretrain_dist.py."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from expmae.runlock import LEASE_NAME, FolderInUse, FolderLock, Lease
from launching import gone, wait_gone

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def write_lease(folder: Path, *, host: str, pid: int, age: float) -> Lease:
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    lease = Lease(host=host, pid=pid, since=now - 3600, heartbeat=now - age, token="theirs")
    lease.write(folder / LEASE_NAME)
    return lease


HOLDER = """
import os, sys, time
from expmae.runlock import FolderLock
lock = FolderLock(sys.argv[1], what="output_dir").acquire()
ready, tell = os.pipe()
child = os.fork()  # a DataLoader worker, say: it must not keep the folder once the owner is dead
if child == 0:
    os.write(tell, b"x")  # past the at-fork handlers: the child has closed its copy of the lock
    time.sleep(60)
    os._exit(0)
os.read(ready, 1)  # on a loaded machine the child may run its at-fork handler long after fork returns
print(os.getpid(), child, flush=True)
time.sleep(60)
"""


# ----------------------------------------------------------------------------------------------- run lock


def test_a_live_owner_keeps_the_folder_and_its_death_frees_it_though_its_forked_child_lives(tmp_path):
    folder = tmp_path / "run"
    holder = python(HOLDER, str(folder))
    owner, child = map(int, holder.stdout.readline().split())
    try:
        before = snapshot(folder)
        with pytest.raises(FolderInUse) as refused:
            FolderLock(folder, what="output_dir").acquire()
        message = str(refused.value)
        assert "\n" not in message and isinstance(refused.value, OSError)
        assert message.startswith(f"output_dir={folder} is in use by a live run: pid {owner} on host {HOST} since ")
        assert f"kill {owner} on {HOST}" in message and "or use another output_dir" in message
        assert snapshot(folder) == before  # the refused run wrote nothing
        os.kill(owner, signal.SIGKILL)  # no clean-up: the kernel drops the flock
        holder.wait()
        assert not gone(child)
        with FolderLock(folder, what="output_dir") as lock:  # the lease of a dead owner on this host is stale
            assert Lease.read(folder / LEASE_NAME).pid == os.getpid() == lock.lease.pid
        assert not (folder / LEASE_NAME).exists()  # released: the lease goes, the lock file stays
        assert (folder / ".expmae_lock").exists()
    finally:
        for pid in (owner, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        holder.wait()


def test_a_stale_lease_from_another_host_is_taken_over_and_a_live_one_is_not(tmp_path):
    folder = tmp_path / "run"
    write_lease(folder, host="node-b", pid=4242, age=5)
    with pytest.raises(FolderInUse, match=r"pid 4242 on host node-b since .* \(last heartbeat 5 s ago\).*"
                                          r"kill 4242 on node-b.*taken over when its heartbeat is 120 s old"):
        FolderLock(folder, what="train.output_dir").acquire()  # our flock is free: node-b's is not ours to see
    assert Lease.read(folder / LEASE_NAME).token == "theirs"  # untouched

    write_lease(folder, host="node-b", pid=4242, age=30)
    with pytest.raises(FolderInUse):
        FolderLock(folder).acquire()
    with FolderLock(folder, stale_after_s=20) as lock:  # 30 s without a heartbeat: node-b is gone
        lease = Lease.read(folder / LEASE_NAME)
        assert (lease.host, lease.pid, lease.token) == (HOST, os.getpid(), lock.lease.token)


def test_without_a_working_flock_the_lease_decides_on_this_host_too(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    monkeypatch.setattr(FolderLock, "_flock", lambda self: None)  # Lustre without -o flock, say
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lease(folder, host=HOST, pid=sleeper.pid, age=1)
        with pytest.raises(FolderInUse, match=f"pid {sleeper.pid} on host {HOST}"):
            FolderLock(folder).acquire()
        sleeper.kill()
        sleeper.wait()
        with FolderLock(folder):  # the same lease, its pid dead: stale at once
            assert Lease.read(folder / LEASE_NAME).pid == os.getpid()
    finally:
        sleeper.kill()
        sleeper.wait()
    write_lease(folder, host=HOST, pid=os.getppid(), age=200)  # a live pid (reused?) that stopped beating
    with FolderLock(folder):
        pass


def test_the_heartbeat_renews_the_lease_and_a_lease_taken_over_stops_the_owner(tmp_path):
    folder = tmp_path / "run"
    lost = []
    with FolderLock(folder, heartbeat_s=0.05, on_lost=lost.append) as lock:
        first = Lease.read(folder / LEASE_NAME).heartbeat
        time.sleep(0.3)
        assert Lease.read(folder / LEASE_NAME).heartbeat > first
        assert not lost
        successor = write_lease(folder, host="node-c", pid=7, age=0)  # it saw us stale and took over
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            if Lease.read(folder / LEASE_NAME).token != successor.token:  # a beat in flight wrote over it:
                successor = write_lease(folder, host="node-c", pid=7, age=0)  # the successor writes again
            time.sleep(0.02)
        assert lost == [successor]
        assert lock._thread is not None
        lock._thread.join(1)
        assert not lock._thread.is_alive()
    assert Lease.read(folder / LEASE_NAME) == successor  # release leaves the successor's lease alone


def test_a_lost_lease_kills_the_owner_by_default(tmp_path):
    folder = tmp_path / "run"
    owner = python("import sys, time; from expmae.runlock import FolderLock\n"
                   "FolderLock(sys.argv[1], heartbeat_s=0.05).acquire(); print('ready', flush=True); time.sleep(60)",
                   str(folder))
    assert owner.stdout.readline().strip() == "ready"
    write_lease(folder, host="node-c", pid=7, age=0)
    assert owner.wait(timeout=10) == -signal.SIGKILL


def test_jobs_refuse_a_folder_that_a_live_run_owns_in_one_line(tmp_path, capsys):
    from expmae.facecrop import main as crop_main
    from expmae.features.common import run_extraction
    from expmae.finetune.cli import main as finetune_main

    (tmp_path / "videos").mkdir()
    crops, features, finetune = tmp_path / "crops", tmp_path / "features", tmp_path / "finetune"
    for folder in (crops, features, finetune):
        folder.mkdir()
    with FolderLock(crops), FolderLock(features), FolderLock(finetune):  # a separate open file: a separate owner
        with pytest.raises(SystemExit) as exited:
            crop_main([str(tmp_path / "videos"), str(crops), "--quiet"])
        assert exited.value.code == 2
        assert f"output_dir={crops} is in use by a live run: pid {os.getpid()}" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            crop_main(["--reencode", str(crops)])
        assert f"--reencode={crops} is in use" in capsys.readouterr().err
        with pytest.raises(FolderInUse, match=f"feature folder={features} is in use"):
            run_extraction(["a"], features, load=str, encode=str, pooling="mean", settings={})
        assert finetune_main(["--labels", str(tmp_path / "labels.csv"), "--features", str(features),
                              "--out", str(finetune)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"out_dir={finetune} is in use by a live run" in err
    assert {p.name for f in (crops, features, finetune) for p in f.iterdir()} == {".expmae_lock"}  # nothing written
    assert crop_main([str(tmp_path / "videos"), str(crops), "--quiet"]) == 1  # free again: "no video files"


# -------------------------------------------------------------------------------------------- parent death


MIDDLE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
time.sleep(60)
"""
CHILD = """
import os, sys, time
from expmae.parentdeath import die_with_parent
print(os.getpid(), die_with_parent(use_prctl=sys.argv[1] == "prctl"), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("way", ["prctl", "watchdog"])
def test_a_process_dies_with_its_parent(way):
    if way == "prctl" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    middle = python(MIDDLE, CHILD, way)
    pid, how = middle.stdout.readline().split()
    assert how == way and not gone(int(pid))
    middle.kill()  # SIGKILL: the middle process cannot pass anything on
    middle.wait()
    took = wait_gone([int(pid)], timeout=5)
    assert took < (1 if way == "prctl" else 3)


def test_a_process_whose_parent_is_already_gone_stops_at_once():
    # the parent recorded before the fork (a DataLoader worker's rank) is not this process's parent any more
    proc = python("from expmae.parentdeath import die_with_parent; die_with_parent(parent=1 << 22); "
                  "print('survived', flush=True)")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and "survived" not in out


STUCK_LOADER = """
import functools, os, time
import torch
from expmae.parentdeath import worker_init

class Stuck(torch.utils.data.Dataset):  # a decoder stuck on a bad file
    def __len__(self):
        return 4
    def __getitem__(self, i):
        print(os.getpid(), flush=True)
        time.sleep(60)

loader = torch.utils.data.DataLoader(Stuck(), num_workers=1, worker_init_fn=functools.partial(worker_init, os.getpid()))
next(iter(loader))
"""


def test_a_dataloader_worker_stuck_in_a_decoder_dies_with_its_rank():
    """torch's own check of the parent runs only between batches: without the death signal this worker would
    decode on for a minute."""
    rank = python(STUCK_LOADER)
    worker = int(rank.stdout.readline())
    rank.kill()
    rank.wait()
    assert wait_gone([worker], timeout=5) < 1
