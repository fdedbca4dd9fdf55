"""A momentum key encoder (MoCo, BYOL): a copy of the query encoder and its heads that follows it
by an exponential moving average, θk <- m θk + (1 - m) θq, never by gradient.

The copies are registered on the model next to the query side, ``backbone_k``, ``global_head_k``
and ``region_heads_k``, so :meth:`ReSim.encode` with ``key_encoder=True`` finds them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["KEY_ENCODER_PAIRS", "add_momentum_encoder", "momentum_update"]

# (query-side module, its momentum copy) on the model
KEY_ENCODER_PAIRS = (
    ("backbone", "backbone_k"),
    ("global_head", "global_head_k"),
    ("region_heads", "region_heads_k"),
)


def add_momentum_encoder(model: nn.Module) -> None:
    """Register a frozen copy of each query-side module of :data:`KEY_ENCODER_PAIRS`."""
    for name_q, name_k in KEY_ENCODER_PAIRS:
        key_side = copy.deepcopy(getattr(model, name_q))
        for p in key_side.parameters():
            p.requires_grad_(False)
        model.add_module(name_k, key_side)


@torch.no_grad()
def momentum_update(model: nn.Module, momentum: float) -> None:
    """θk <- m θk + (1 - m) θq over every parameter of the key encoder and its heads."""
    params_q, params_k = [], []
    for name_q, name_k in KEY_ENCODER_PAIRS:
        params_q.extend(getattr(model, name_q).parameters())
        params_k.extend(getattr(model, name_k).parameters())
    if not params_k:
        return
    torch._foreach_mul_(params_k, momentum)
    torch._foreach_add_(params_k, params_q, alpha=1.0 - momentum)
