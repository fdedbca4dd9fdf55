"""Mixed precision and compilation settings of pre-training (``RESIM.SPEED``)."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_DTYPES", "COMPILE_MODES", "CUDAGRAPH_MODES", "autocast"]

# RESIM.SPEED.AMP_DTYPE -> autocast dtype (None: float32)
AMP_DTYPES = {
    "": None,
    "none": None,
    "float32": None,
    "bfloat16": torch.bfloat16,
    # float16 is left out on purpose: it needs a GradScaler, bfloat16 does not
}
# RESIM.SPEED.COMPILE_MODE: torch.compile's modes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# torch.compile modes that replay CUDA graphs (on CUDA devices)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context for ``dtype`` None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
