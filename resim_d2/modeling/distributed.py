"""Collective helpers for ReSim pre-training: tensor gathers and means without gradient, and the
permutation of MoCo's shuffle-BN (used by :class:`~resim_d2.modeling.batch_order.BatchOrder`).

What ``detectron2.utils.comm`` lacks: its gathers move picklable objects, these move tensors with
collectives. World size and rank are comm's.

Every helper is a no-op (returns its input unchanged) when ``torch.distributed`` is unavailable, not
initialised, or has a single process, so the model runs unchanged in one process. The collectives
used (``all_gather``, ``all_reduce``, ``broadcast``) exist in both NCCL and gloo, so the helpers
also run on CPU with the gloo backend (the multi-process tests use that).

All per-rank tensors passed to a collective must have the same shape on every rank (the model pads
windows to a fixed count per feature, and detectron2's samplers give each rank the same batch size).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from detectron2.utils.comm import get_world_size

__all__ = [
    "concat_all_gather",
    "all_reduce_mean",
    "shuffle_permutation",
]


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, in rank order. No gradient flows back.

    tensor: (N, ...) with the same shape on every rank  ->  (world_size * N, ...).
    Returns ``tensor`` itself when not distributed.
    """
    ws = get_world_size()
    if ws == 1:
        return tensor
    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(ws)]
    dist.all_gather(out, tensor, async_op=False)
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor; no gradient). Identity when not distributed."""
    ws = get_world_size()
    if ws == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ws


def shuffle_permutation(total: int, device: torch.device) -> torch.Tensor:
    """The random permutation of shuffle-BN: (total,) int64 on ``device``. Rank 0's is used by all
    ranks. One function, so that tests can make two runs draw the same permutation."""
    return torch.randperm(total, device=device)
