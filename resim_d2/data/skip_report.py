"""Which files the pre-training loaders skipped, and why, carried with the batches to the trainer.

Mappers skip unusable files in dataloader workers (other processes, possibly started without the
run's log handlers), so their own log lines may miss the run's ``log.txt``. Each sample instead
carries the files skipped since the previous one (``"num_skipped"``, ``"skipped"``: ``(file_name,
reason)`` pairs); :class:`SkipReportingLoader` collects them in the training process. By default
it logs them there; the trainer's :class:`~resim_d2.engine.skip_log.SkippedFilesHook` takes them
over, gathers every process's to the main one, logs them to ``log.txt`` and keeps the running
total in ``metrics.json``.
"""

from __future__ import annotations

import logging

__all__ = ["SkipCollector", "SkipReportingLoader"]

logger = logging.getLogger(__name__)


class SkipCollector:
    """Collects the skipped files of the batches a loader yields (:meth:`note`).

    ``log_locally`` (default True): log each skipped file as it arrives; a consumer that reports
    them itself sets it False and calls :meth:`take`.
    """

    def __init__(self):
        self.log_locally = True
        self._count = 0
        self._records: list[tuple[str, str]] = []

    def note(self, batch: list[dict]) -> list[dict]:
        """Record ``batch``'s skipped files; returns the batch unchanged."""
        count = sum(int(d.get("num_skipped", 0)) for d in batch)
        records = [tuple(r) for d in batch for r in d.get("skipped", ())]
        if count or records:
            self._count += count
            self._records += records
            if self.log_locally:
                for name, why in records:
                    logger.warning(f"skipped {name}: {why}")
        return batch

    def take(self) -> tuple[int, list[tuple[str, str]]]:
        """(files skipped, their (file_name, reason)) since the previous call."""
        out = (self._count, self._records)
        self._count, self._records = 0, []
        return out


class SkipReportingLoader(SkipCollector):
    """Iterates ``loader`` unchanged, collecting each batch's skipped files. Other attributes are
    the wrapped loader's."""

    def __init__(self, loader):
        self.loader = loader
        super().__init__()

    def __getattr__(self, name):
        if name == "loader":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            yield self.note(batch)
