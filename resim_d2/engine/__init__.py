from . import densepose_rcnn, finetuning, pretraining  # noqa: F401  (register the run kinds)
from .finetuning import is_linear_probe
from .hooks import ReSimMetricsHook
from .pretraining import is_pretraining, resolve_pretrain_schedule
from .run_kind import RUN_KIND_REGISTRY, RunKind, build_run_kind, run_kind_name
from .trainer import Trainer

__all__ = [
    "RUN_KIND_REGISTRY",
    "ReSimMetricsHook",
    "RunKind",
    "Trainer",
    "build_run_kind",
    "is_linear_probe",
    "is_pretraining",
    "resolve_pretrain_schedule",
    "run_kind_name",
]
