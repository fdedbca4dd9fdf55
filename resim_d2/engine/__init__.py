from .hooks import ReSimMetricsHook
from .trainer import Trainer, is_linear_probe, is_pretraining, resolve_pretrain_schedule

__all__ = [
    "Trainer",
    "ReSimMetricsHook",
    "is_linear_probe",
    "is_pretraining",
    "resolve_pretrain_schedule",
]
