"""The run's record of skipped files: every process's, in ``log.txt``, and a running total."""

from __future__ import annotations

import logging

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.skip_report import SkipCollector

__all__ = ["SkippedFilesHook"]

logger = logging.getLogger(__name__)

# how often (iterations) several processes pool their skipped files: detectron2's writer period,
# so every metrics.json line carries the total up to it
GATHER_PERIOD = 20


class SkippedFilesHook(HookBase):
    """Logs each skipped file with its reason on the main process (so in ``log.txt``), and puts the
    number skipped since the start of the run, over all processes, in ``data/skipped_images``
    (kept in checkpoints, so a resumed run continues the count).

    Works with loaders that are a :class:`~resim_d2.data.skip_report.SkipCollector` (the
    pre-training loaders); does nothing for others. With several processes the files are pooled
    every :data:`GATHER_PERIOD` iterations, before each checkpoint and at the last iteration (one
    small object all-gather).
    """

    def __init__(self):
        self.total = 0
        self._loader = None

    def before_train(self):
        loader = getattr(self.trainer._trainer, "data_loader", None)
        self._loader = loader if isinstance(loader, SkipCollector) else None
        if self._loader is not None:
            self._loader.log_locally = False

    def after_step(self):
        if self._loader is None:
            return
        it = self.trainer.iter
        multi = comm.get_world_size() > 1
        # pool at the writers' period, before each checkpoint (its total must include everything
        # before it, for --resume) and at the last iteration
        period = self.trainer.cfg.SOLVER.CHECKPOINT_PERIOD
        due = (it + 1) % GATHER_PERIOD == 0 or (it + 1) % period == 0
        if multi and not due and it < self.trainer.max_iter - 1:
            return
        count, records = self._loader.take()
        pooled = comm.all_gather((count, records)) if multi else [(count, records)]
        self.total += sum(c for c, _ in pooled)
        if comm.is_main_process():
            for rank, (_, recs) in enumerate(pooled):
                for name, why in recs:
                    where = f" (process {rank})" if multi else ""
                    logger.warning(f"skipped {name}{where}: {why}")
        self.trainer.storage.put_scalar("data/skipped_images", self.total, smoothing_hint=False)

    def after_train(self):
        # a run that stops early: this process's files not yet pooled still reach its log
        if self._loader is not None:
            for name, why in self._loader.take()[1]:
                logger.warning(f"skipped {name}: {why}")

    def state_dict(self):
        return {"skipped_images": self.total}

    def load_state_dict(self, state_dict):
        self.total = int(state_dict.get("skipped_images", 0))
