"""Collective helpers for ReSim pre-training: gathers without gradient and MoCo's shuffle-BN.

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

from detectron2.utils.comm import get_rank, get_world_size

__all__ = [
    "world_size",
    "rank",
    "concat_all_gather",
    "all_reduce_mean",
    "batch_shuffle",
    "batch_unshuffle",
    "shuffle_permutation",
]

# detectron2's (1 and 0 when not distributed), under the names this module has always exported
world_size = get_world_size
rank = get_rank


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


@torch.no_grad()
def batch_shuffle(
    tensors: list[torch.Tensor], in_process: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """MoCo's shuffle-BN: permute whole samples across ranks with one random permutation.

    tensors: per-sample tensors of this rank, each (B, ...) with the same B (e.g. the key images
    and the key windows, so every image keeps its own windows).
    in_process: shuffle in a single process too (its batch norms normalise several groups of
    images, :mod:`resim_d2.layers.group_batch_norm`); otherwise one process returns
    (tensors, None).
    Returns (the shuffled tensors, each (B, ...), idx_unshuffle (world_size * B,)) where sample i of
    the shuffled batch on rank r is global sample ``perm[r * B + i]``. Pass ``idx_unshuffle`` to
    :func:`batch_unshuffle` to undo it.
    """
    ws = get_world_size()
    if ws == 1 and not in_process:
        return list(tensors), None
    gathered = [concat_all_gather(t) for t in tensors]
    total = gathered[0].shape[0]
    perm = shuffle_permutation(total, gathered[0].device)
    if ws > 1:
        dist.broadcast(perm, src=0)  # every rank uses rank 0's permutation
    idx_unshuffle = torch.argsort(perm)
    idx_this = perm.view(ws, -1)[get_rank()]
    return [g[idx_this] for g in gathered], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(tensor: torch.Tensor, idx_unshuffle: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`batch_shuffle` for an output computed on the shuffled batch.

    tensor: (B, ...) computed from this rank's shuffled samples  ->  (B, ...) in this rank's
    original sample order. ``idx_unshuffle`` None (nothing was shuffled) returns ``tensor``.
    """
    if idx_unshuffle is None:
        return tensor
    ws = get_world_size()
    gathered = concat_all_gather(tensor)
    idx_this = idx_unshuffle.view(ws, -1)[get_rank()]
    return gathered[idx_this]
