"""A resumable, worker-count-independent stream of mapped samples for pre-training.

detectron2's ``TrainingSampler`` restarts its stream from the beginning on ``--resume`` and the
mapper's randomness depends on which worker saw which record, so a resumed run sees other data than
the uninterrupted one. Here every sample is a pure function of ``(seed, position)``:

* position ``p`` of the stream is record ``perm_e[p mod N]`` of epoch ``e = p div N``, where
  ``perm_e`` is a permutation drawn from ``(seed, e)``;
* its views are drawn by the mapper from a generator seeded with ``(seed, p)``;
* iteration ``i`` of a run with global batch ``G`` on ``W`` processes gives rank ``r`` the positions
  ``i*G + r*G/W ... i*G + (r+1)*G/W - 1``, so the global batch is the same for any ``W``.

Resuming at iteration ``i`` therefore continues exactly where the run stopped, whatever the number
of
dataloader workers, and a 2-process run sees the same global batches as a 1-process run.
"""

import itertools
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from detectron2.data.build import trivial_batch_collator
from detectron2.utils import comm

from .skips import MAX_CONSECUTIVE_SKIPS, SkipCounter

__all__ = ["StreamDataset", "StreamSampler", "build_stream_loader"]

logger = logging.getLogger(__name__)


class StreamDataset(Dataset):
    """``dataset[p]`` = ``mapper(records[perm_e[p mod N]], rng(seed, p))``; unusable records
    skipped.

    A record the mapper rejects (returns ``None``) is replaced by another drawn from the same
    position's generator. A mapper that counts its own skips (a :class:`~.skips.SkipCounter` as
    its ``skips``, as TwoViewMapper and RawViewReader) reports them with the sample and gives up
    by its counter's rule; for any other mapper the dataset counts the rejected records with its
    own counter (the same rule, :data:`~.skips.MAX_CONSECUTIVE_SKIPS`) and sets the sample's
    ``"num_skipped"`` and ``"skipped"``.
    """

    def __init__(self, records, mapper, seed, max_consecutive_skips=MAX_CONSECUTIVE_SKIPS):
        if len(records) == 0:
            raise ValueError(
                "the pre-training dataset is empty (check DATASETS.TRAIN and its root)"
            )
        self._records = records
        self._mapper = mapper
        self._seed = int(seed)
        counter = getattr(mapper, "skips", None)
        self._mapper_counts = isinstance(counter, SkipCounter)
        self._skips = SkipCounter("StreamDataset", max_consecutive_skips, log=False)
        self._perm_epoch, self._perm = None, None

    def __len__(self):  # a stream has no end; DataLoader only needs this for map-style datasets
        return 2**62

    def _record_index(self, position):
        n = len(self._records)
        epoch = position // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self._seed, 0, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[position % n])

    def __getitem__(self, position):
        position = int(position)
        rng = np.random.default_rng([self._seed, 1, position])
        idx = self._record_index(position)
        while True:  # until a record is used, or a SkipCounter gives up
            out = self._mapper(self._records[idx], rng)
            if out is not None:
                self._skips.used()
                count, records = self._skips.take()
                if "num_skipped" not in out:  # a mapper that does not report its own skips
                    out["num_skipped"], out["skipped"] = count, records
                out["stream_position"] = position
                return out
            if not self._mapper_counts:
                name = self._records[idx].get("file_name", idx)
                self._skips.skip(name, "rejected by the mapper")
            idx = int(rng.integers(len(self._records)))


class StreamSampler(Sampler):
    """Yields this rank's stream positions from iteration ``start_iter`` on, forever."""

    def __init__(self, total_batch_size, start_iter=0, rank=None, world_size=None):
        self._world = comm.get_world_size() if world_size is None else world_size
        self._rank = comm.get_rank() if rank is None else rank
        if total_batch_size % self._world != 0:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH={total_batch_size} must be divisible by the number of "
                f"processes ({self._world})"
            )
        self._global = total_batch_size
        self._local = total_batch_size // self._world
        self._start = int(start_iter)

    def __iter__(self):
        for it in itertools.count(self._start):
            base = it * self._global + self._rank * self._local
            yield from range(base, base + self._local)


def build_stream_loader(records, mapper, seed, total_batch_size, num_workers, start_iter=0):
    """DataLoader of ``list[dict]`` batches of ``total_batch_size / world_size`` stream samples."""
    sampler = StreamSampler(total_batch_size, start_iter=start_iter)
    batch_sampler = torch.utils.data.BatchSampler(sampler, sampler._local, drop_last=True)
    return DataLoader(
        StreamDataset(records, mapper, seed),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        persistent_workers=num_workers > 0,
    )
