"""The host half of the GPU view path; the code lives in :mod:`resim_d2.data.gpu`.

This module re-exports its names, so that ``from resim_d2.data.gpu_loader import ...`` keeps
working.
"""

from .gpu.decode import DECODE_MODES, probe_jpeg, resolve_decode
from .gpu.loader import (
    GPUViewsCollator,
    GPUViewsLoader,
    RawViewReader,
    build_gpu_pretrain_loader,
)

__all__ = [
    "DECODE_MODES",
    "probe_jpeg",
    "RawViewReader",
    "GPUViewsCollator",
    "GPUViewsLoader",
    "resolve_decode",
    "build_gpu_pretrain_loader",
]
