"""Which samples go in which batch of pretraining, on which rank, epoch after epoch (:class:`EpochBatchSampler`),
so that repeated samples of a decoded clip land in different batches of the DataLoader worker holding it."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch.utils.data import DistributedSampler


def decoded_per_worker(batch_size: int, repeated_samples: int, spread: int = 1) -> int:
    """Decoded clips a DataLoader worker keeps under :func:`spread_samples`' layout: the pool it is serving."""
    return spread * batch_size if repeated_samples > 1 else 0


def _pool_batches(pool: Sequence[Sequence[tuple]], k: int, rng: np.random.Generator | None) -> list[list[tuple]]:
    """One worker's pool of groups (clips it decodes once) -> its k * len(pool) batches of sample keys: in round r
    every clip of the pool gives sample r, in an order drawn afresh per round when the pool holds several groups,
    so a clip's k samples sit ~len(pool) of the worker's batches apart and meet different batch-mates each time."""
    keys, size = [key for group in pool for key in group], len(pool[0])
    batches = []
    for r in range(k):
        order = rng.permutation(len(keys)) if rng is not None and len(pool) > 1 else range(len(keys))
        round_keys = [(*keys[j], r) for j in order]
        batches += [round_keys[b:b + size] for b in range(0, len(round_keys), size)]
    return batches


def spread_samples(groups: Sequence[Sequence[tuple]], k: int, workers: int, spread: int = 1,
                   rng: np.random.Generator | None = None) -> list[list[tuple]]:
    """Groups of item keys -> batches of sample keys ``(*key, r)``. Blocks of ``workers * spread`` groups: worker w
    of a block serves a pool of ``spread`` groups (:func:`_pool_batches`: k * spread batches), and the pools'
    batches interleave, the w-th pool's at positions congruent to w mod workers, which a DataLoader hands to one
    worker (its workers take batches in turn). A pass's last, partial block shares its groups out as evenly as it
    can, so only its last few batches (a remainder of fewer groups than workers) may reach a worker that does not
    hold their clip and decode it again: a cost, never a change of data."""
    batches = []
    for start in range(0, len(groups), workers * spread):
        block = groups[start:start + workers * spread]
        sizes = [len(block) // workers + (w < len(block) % workers) for w in range(min(workers, len(block)))]
        ends = np.cumsum(sizes)
        pools = [_pool_batches(block[end - size:end], k, rng) for size, end in zip(sizes, ends)]
        batches += [pool[j] for j in range(max(map(len, pools))) for pool in pools if j < len(pool)]
    return batches


class EpochBatchSampler:
    """This rank's batches of DataLoader keys, epoch after epoch, starting at (epoch, batch).

    An epoch's order is DistributedSampler's shuffle for (seed, epoch), cut to ``batches_per_epoch`` full
    batches. Keys are ``(epoch, index)``: the item of ``index`` as augmented in ``epoch``
    (expmae.pretrain.loader.EpochItems), so one DataLoader, with workers started once, serves the whole run,
    while the dataset still augments by (seed, epoch, index): a resumed epoch is the same epoch.

    With ``repeated_samples = k`` keys are ``(epoch, index, r)``: sample r of clip index's decode. A pass over
    the clips (shuffled for (seed, pass)) spans k epochs and cuts into groups of batch_size clips; each group
    makes k batches, one per sample r, so every batch holds batch_size different clips (k samples of one clip
    in one batch would be nearly k copies, and train like a k times smaller batch). For the decode to be
    shared, a group's k batches must reach the DataLoader worker that holds it: the DataLoader hands batches
    to its ``workers`` in turn, so the batches of ``workers`` groups interleave, group g's batches at positions
    congruent to g mod workers (wherever the loader starts), and each worker keeps batch_size decoded clips
    (``keep_decoded``). With ``spread = s`` a worker serves a pool of s groups instead of one (s * batch_size
    decoded clips): round r of the pool gives every clip's sample r in a fresh order, so a clip's samples come
    ~s of the worker's batches apart, with different batch-mates (:func:`spread_samples`). Everything stays a
    function of (seed, epoch, batch): resume is exact.
    """

    def __init__(self, num_items: int, *, batch_size: int, batches_per_epoch: int, rank: int, world: int,
                 seed: int, start_epoch: int = 0, start_batch: int = 0, repeated_samples: int = 1, workers: int = 0,
                 spread: int = 1):
        clips_per_pass = batches_per_epoch * batch_size  # k epochs of samples = k samples of each
        if clips_per_pass > num_items // world:
            raise ValueError(f"{batches_per_epoch} batches of {batch_size} samples need {clips_per_pass} clips per "
                             f"rank and epoch, but {world} ranks share {num_items} clips")
        self.num_items, self.batch_size, self.batches_per_epoch = num_items, batch_size, batches_per_epoch
        self.rank, self.world, self.seed, self.k = rank, world, seed, repeated_samples
        self.start_epoch, self.start_batch, self.workers = start_epoch, start_batch, max(1, workers)
        if spread < 1:
            raise ValueError(f"spread={spread}: expected an integer >= 1")
        self.spread, self.keep_decoded = spread, decoded_per_worker(batch_size, repeated_samples, spread)

    def _order(self, shuffle: int) -> list[int]:
        sampler = DistributedSampler(range(self.num_items), num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=self.seed, drop_last=True)
        sampler.set_epoch(shuffle)
        return list(sampler)

    def _pass_batches(self, first_epoch: int) -> list[list[tuple[int, int, int]]]:
        """The k * batches_per_epoch batches of the pass that starts at ``first_epoch``."""
        order, b = self._order(first_epoch // self.k), self.batch_size
        groups = [[(first_epoch, i) for i in order[g * b:(g + 1) * b]] for g in range(self.batches_per_epoch)]
        rng = np.random.default_rng((self.seed, self.rank, first_epoch))  # the pools' rounds: a function of the pass
        return spread_samples(groups, self.k, self.workers, self.spread, rng)

    def __iter__(self):
        epoch, skip = self.start_epoch, self.start_batch
        if self.k == 1:
            while True:
                order = self._order(epoch)
                for b in range(skip, self.batches_per_epoch):
                    yield [(epoch, i) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]
                epoch, skip = epoch + 1, 0
        first, skip = epoch - epoch % self.k, (epoch % self.k) * self.batches_per_epoch + skip
        while True:
            yield from self._pass_batches(first)[skip:]
            first, skip = first + self.k, 0
