"""Skipped files of the pre-training data paths: one counter and one give-up rule for all of them.

Every reader of image files during pre-training (``TwoViewMapper`` in the CPU path, the workers'
``RawViewReader`` and the device's ``GPUViews`` in the GPU path, ``StreamDataset`` for a mapper
that does not count) owns a :class:`SkipCounter`. A file that cannot be used is passed to
:meth:`SkipCounter.skip` with the reason; a used one to :meth:`SkipCounter.used`. The counter:

* keeps the ``(file_name, reason)`` of each skip until the next sample takes them
  (:meth:`SkipCounter.take`): the sample's ``"num_skipped"``/``"skipped"`` fields, which carry them
  to the run's log (:mod:`resim_d2.data.skip_report`);
* gives up after ``limit`` files in a row could not be used (:data:`MAX_CONSECUTIVE_SKIPS`, or
  ``RESIM.VIEWS.MAX_CONSECUTIVE_SKIPS``): a dataset that bad is a wrong path or root, not a few
  broken files, and :class:`DatasetUnreadableError` says so, naming the last file.
"""

from __future__ import annotations

import collections
import logging

__all__ = [
    "MAX_CONSECUTIVE_SKIPS",
    "DatasetUnreadableError",
    "SkipCounter",
    "CountsSkips",
    "give_up_message",
]

logger = logging.getLogger(__name__)

# files in a row that could not be used, after which a run stops (the dataset is unreadable)
MAX_CONSECUTIVE_SKIPS = 100


class DatasetUnreadableError(RuntimeError):
    """Too many files in a row could not be used: the dataset (or its root) is wrong."""


def give_up_message(count: int, file_name: str, reason: str) -> str:
    """The one error message of the give-up rule: how many, the last file and why, what to check."""
    return (
        f"{count} records in a row could not be used (the last: {file_name}: {reason}); the "
        "dataset looks unreadable: check DATASETS.TRAIN and its root ($DETECTRON2_DATASETS)"
    )


class SkipCounter:
    """Counts the files one reader skipped, keeps them for the next sample, and gives up.

    Attributes:
        total: files skipped since construction (in this process).
        kinds: ``collections.Counter`` of the ``kind`` of each skip.
        consecutive: files skipped since the last used one.
        log: log each skip as a warning (the training loaders turn it off: the samples carry
            the files to the run's log, once, whichever worker met them).
    """

    def __init__(self, owner: str, limit: int = MAX_CONSECUTIVE_SKIPS, log: bool = True):
        """
        Args:
            owner: who skips (the log lines name it).
            limit: this many skipped files in a row raise :class:`DatasetUnreadableError` (>= 1).
            log: see :attr:`log`.
        """
        if int(limit) < 1:
            raise ValueError(f"the limit of skipped files in a row must be >= 1, got {limit}")
        self.owner = owner
        self.limit = int(limit)
        self.log = bool(log)
        self.total = 0
        self.kinds: collections.Counter = collections.Counter()
        self.consecutive = 0
        self._pending: list[tuple[str, str]] = []

    def __repr__(self):
        return f"{type(self).__name__}({self.owner!r}, limit={self.limit}, total={self.total})"

    def skip(self, file_name: str, reason: str, kind: str = "unreadable") -> None:
        """Count one unusable file; raises :class:`DatasetUnreadableError` at the limit.

        ``reason`` may start with the file's name (as :class:`~.image_io.ImageLoadError`'s
        messages do); the kept record drops it, since it names the file already.
        """
        file_name = str(file_name)
        reason = str(reason).removeprefix(f"{file_name}: ")
        self.total += 1
        self.kinds[kind] += 1
        self.consecutive += 1
        self._pending.append((file_name, reason))
        if self.log:
            logger.warning(
                f"{self.owner}: skipping {file_name} ({reason}); {self.total} skipped so far"
            )
        if self.consecutive >= self.limit:
            raise DatasetUnreadableError(give_up_message(self.consecutive, file_name, reason))

    def used(self) -> None:
        """A file was used: the run of skipped files ends."""
        self.consecutive = 0

    def carry(self, records: list[tuple[str, str]]) -> None:
        """Report ``records``, skipped and counted elsewhere, with the next sample that takes."""
        self._pending += [tuple(r) for r in records]

    def take(self) -> tuple[int, list[tuple[str, str]]]:
        """``(num_skipped, skipped)`` since the previous call: a sample's two fields."""
        out, self._pending = self._pending, []
        return len(out), out


class CountsSkips:
    """Base of a reader that owns a :class:`SkipCounter` as ``skips``: ``log_skips`` switches
    its log (the training loaders turn it off; the batches carry the files to the run's log)."""

    skips: SkipCounter

    @property
    def log_skips(self) -> bool:
        """Log each skipped file as a warning."""
        return self.skips.log

    @log_skips.setter
    def log_skips(self, value: bool):
        self.skips.log = bool(value)
