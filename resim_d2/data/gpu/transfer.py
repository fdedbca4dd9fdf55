"""Small host-to-device copies of the GPU view path (parameters, index tensors, host images)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_device", "host_image"]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``; from pinned memory, asynchronously, on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def host_image(image, device: torch.device) -> torch.Tensor:
    """RGB PIL image (H, W) -> uint8 (3, H, W) on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(image))).permute(2, 0, 1)
    return t.to(device)
