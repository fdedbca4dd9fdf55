"""Checkpoint conversion for transfer: pre-trained encoders -> detectron2 detector weights.

See :mod:`resim_d2.checkpoint.convert` (the logic) and ``tools/convert.py`` (the command line).
"""

from . import convert
from .convert import *  # noqa: F401,F403  (the names in convert.__all__)

__all__ = list(convert.__all__)
