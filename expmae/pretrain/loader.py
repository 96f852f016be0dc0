"""The training data stream: one DataLoader for the whole run, addressed by (epoch, index), with a stall guard.

A stuck decoder (dmlc/decord#220) would otherwise stall its rank while every other rank waits in an
all-reduce until NCCL's timeout. With ``data.timeout`` the DataLoader gives up after that many seconds;
:class:`Batches` turns that into a :class:`DataStall` naming the clip the stuck worker was decoding.
"""
from __future__ import annotations

import functools
import os
import time

import torch
from torch.utils.data import DataLoader, get_worker_info

from expmae.data import collate_samples
from expmae.data_batches import EpochBatchSampler
from expmae.parentdeath import worker_init


class DataStall(RuntimeError):
    """No batch within data.timeout seconds; the message names the clip being decoded."""


class EpochItems:
    """``items[epoch, index]``: the item of ``index`` as augmented in ``epoch``; ``items[epoch, index, r]``: its
    sample r alone (repeated sampling; see expmae.data_batches.EpochBatchSampler for both keys).

    Each DataLoader worker notes in shared memory which clip it is decoding and since when, so a stall can
    be blamed on a clip. ``hang=(index, epoch)`` (debug.hang_clip) makes decoding that clip hang from that
    epoch on, in a worker: a stand-in for a stuck decoder.
    """

    def __init__(self, dataset, num_workers: int = 0, hang: tuple[int, int] | None = None):
        self.dataset, self.hang = dataset, hang
        self.decoding = torch.full((max(1, num_workers), 2), -1.0, dtype=torch.float64).share_memory_()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index, *sample = key
        worker = get_worker_info()
        slot = self.decoding[worker.id if worker is not None else 0]
        slot[0], slot[1] = index, time.time()
        if self.hang is not None and worker is not None and index == self.hang[0] and epoch >= self.hang[1]:
            time.sleep(10**6)
        self.dataset.set_epoch(epoch)
        item = self.dataset[index, sample[0]] if sample else self.dataset[index]
        slot[0] = -1
        return item

    def stuck_clip(self) -> str:
        """The clip a worker has been decoding the longest, as ``path (N s)``; '' when none is busy."""
        busy = [(float(t), int(i)) for i, t in self.decoding.tolist() if i >= 0]
        if not busy:
            return ""
        since, index = min(busy)
        return f"{self.dataset.paths[index]} ({time.time() - since:.0f} s)"


def make_loader(dataset, *, plan, state, rank: int, seed: int, num_workers: int, timeout: float,
                pin_memory: bool, repeated_samples: int = 1, repeat_spread: int = 1, hang: tuple[int, int] | None = None):
    """One DataLoader for the whole run, starting at the state's data position; ``repeated_samples`` = k: each
    worker decodes a clip once for its k samples, which go to k different batches (expmae.data_batches.EpochBatchSampler).
    Its workers die with this process (expmae.parentdeath)."""
    sampler = EpochBatchSampler(len(dataset), batch_size=plan.batch_size, batches_per_epoch=plan.batches_per_epoch,
                                rank=rank, world=plan.world, seed=seed, start_epoch=state.epoch,
                                start_batch=state.batch_in_epoch, repeated_samples=repeated_samples, workers=num_workers,
                                spread=repeat_spread)
    dataset.keep_decoded = sampler.keep_decoded  # set before the workers fork: each keeps its own
    # Worker seeds come from the loader's own generator: the global RNG (masking) stays untouched.
    return DataLoader(EpochItems(dataset, num_workers, hang), batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_samples, worker_init_fn=functools.partial(worker_init, os.getpid()),
                      pin_memory=pin_memory, timeout=timeout if num_workers else 0,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=False)


class Batches:
    """Iterate a loader made by :func:`make_loader`, advancing the state's data position; a DataLoader timeout
    becomes a :class:`DataStall` naming the clip."""

    def __init__(self, loader, state, batches_per_epoch: int):
        self.loader, self.state, self.batches_per_epoch = loader, state, batches_per_epoch
        self.it = iter(loader)

    def __next__(self):
        try:
            clips = next(self.it)
        except RuntimeError as exc:
            if "timed out" not in str(exc):
                raise
            clip = self.loader.dataset.stuck_clip() or "no clip in progress"
            raise DataStall(f"no batch within data.timeout={self.loader.timeout:g} s; a DataLoader worker was "
                            f"decoding {clip}") from None
        self.state.next_batch(self.batches_per_epoch)
        return clips
