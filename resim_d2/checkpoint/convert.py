"""Pre-trained checkpoints -> detectron2 detector weights (the library of ``tools/convert.py``).

One concern per module; this one gathers their public names:

* :mod:`~.layouts`: the source layouts as data (recognising them, their prefixes and renames).
* :mod:`~.conversion`: renaming to detectron2's C4/FPN detector names, checking against a built
  detector (:func:`reconcile`) and writing the result.
* :mod:`~.report`: the human-readable report of a conversion.
* :mod:`~.transfer_checkpointer`: the fine-tuning checkpointer that reads converted files.
"""

from .conversion import (
    Conversion,
    Reconciliation,
    convert_checkpoint,
    infer_resnet_config,
    load_checkpoint,
    reconcile,
    save_conversion,
    trained_fpn_convs,
)
from .layouts import LAYOUTS, detect_layout
from .report import format_report
from .transfer_checkpointer import TransferCheckpointer

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
