"""What every run of tools/train_net.py gets so that nothing is lost or silently idle (see
docs/reliability.md): resim_d2's log lines in the run's log.txt, and the Trainer's guard hooks."""

from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .nan_guard import NonFiniteGuard
from .resume_schedule import ResumeScheduleHook
from .rng_state import RNGStateHook
from .skip_log import SkippedFilesHook

__all__ = ["reliability_hooks", "setup_run_logging"]


def setup_run_logging(cfg):
    """Send the ``resim_d2`` loggers (skipped files, --resume notes, config warnings) to the
    console and ``OUTPUT_DIR/log.txt``, as detectron2's ``default_setup`` does for its own;
    processes other than the first write ``log.txt.rank<N>``, as detectron2's do."""
    setup_logger(
        cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="resim_d2", abbrev_name="resim"
    )


def reliability_hooks(cfg) -> list:
    """Hooks for every process of a run, ahead of detectron2's: the schedule of a resumed run from
    the config, the non-finite guard (before the optimizer step), the skipped-files record, and
    torch's random state in checkpoints (an exact --resume with several processes)."""
    return [ResumeScheduleHook(), NonFiniteGuard(), SkippedFilesHook(), RNGStateHook()]
