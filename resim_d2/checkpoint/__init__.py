"""Checkpoint conversion for transfer: pre-trained encoders -> detectron2 detector weights.

See :mod:`resim_d2.checkpoint.convert` (the logic) and ``tools/convert.py`` (the command line).
"""

from .convert import (
    LAYOUTS,
    Conversion,
    Reconciliation,
    TransferCheckpointer,
    convert_checkpoint,
    detect_layout,
    format_report,
    infer_resnet_config,
    load_checkpoint,
    reconcile,
    save_conversion,
    trained_fpn_convs,
)

__all__ = [
    "LAYOUTS",
    "Conversion",
    "Reconciliation",
    "TransferCheckpointer",
    "convert_checkpoint",
    "detect_layout",
    "format_report",
    "infer_resnet_config",
    "load_checkpoint",
    "reconcile",
    "save_conversion",
    "trained_fpn_convs",
]
