"""Checkpoints: reading weight files safely, the training checkpointer, and conversion for transfer.

* :mod:`resim_d2.checkpoint.safe_load`: weight files read without running code from them.
* :mod:`resim_d2.checkpoint.checkpointer`: atomic saves; ``--resume`` past unreadable files.
* :mod:`resim_d2.checkpoint.convert`: pre-trained encoders -> detectron2 detector weights
  (``tools/convert.py`` is its command line); it gathers :mod:`~.layouts` (the source layouts as
  data), :mod:`~.conversion`, :mod:`~.report` and :mod:`~.transfer_checkpointer`.
"""

from . import checkpointer, convert, safe_load
from .checkpointer import *  # noqa: F401,F403  (the names in checkpointer.__all__)
from .convert import *  # noqa: F401,F403  (the names in convert.__all__)
from .safe_load import *  # noqa: F401,F403  (the names in safe_load.__all__)

__all__ = list(convert.__all__) + list(checkpointer.__all__) + list(safe_load.__all__)
