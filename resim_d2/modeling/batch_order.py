"""The order in which an encoder sees a process's batch, and the way back (MoCo's shuffle-BN and
the batch-norm groups of ``RESIM.BN_GROUP_IMAGES``).

Per-image tensors (images, window boxes, pooled windows, embeddings) travel in *batch order*: row
``i`` is image ``i`` of this process. An encoder whose batch norms normalise groups of images
(:class:`~resim_d2.layers.group_batch_norm.GroupBatchNorm2d`) sees them *interleaved*: group ``g``
is rows ``k % groups == g``. MoCo's key encoder also sees them *shuffled*: one random permutation
of the whole step's images (all processes), so that no group's batch norm sees the images of the
query encoder's group. :class:`BatchOrder` moves any per-image tensor into the encoder's order
(``to_encoder``) and back (``to_batch``), so images and their windows stay together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from detectron2.utils import comm

from ..layers.group_batch_norm import deinterleave_groups, interleave_groups
from . import distributed as dist_utils

__all__ = ["BatchOrder"]


class BatchOrder:
    """How an encoder sees this process's ``batch`` images.

    Args:
        groups: batch-norm groups of the process (1: plain batch norm).
        shuffle: shuffle-BN: permute the images of the whole step (``world * batch``) with one
            permutation drawn by rank 0 (:func:`~resim_d2.modeling.distributed.shuffle_permutation`)
            and broadcast; needs ``batch`` and ``device``.
    """

    def __init__(self, groups: int = 1, shuffle: bool = False, batch: int = 0, device=None):
        self.groups = int(groups)
        self._perm = self._inverse = None
        if shuffle:
            world = comm.get_world_size()
            perm = dist_utils.shuffle_permutation(world * batch, device)
            if world > 1:
                dist.broadcast(perm, src=0)  # every process uses rank 0's permutation
            self._perm = perm.view(world, -1)[comm.get_rank()]  # (batch,) global rows seen here
            self._inverse = torch.argsort(perm).view(world, -1)[comm.get_rank()]

    @property
    def is_identity(self) -> bool:
        """Whether the encoder sees the batch as it is (no shuffle, one group)."""
        return self._perm is None and self.groups == 1

    @torch.no_grad()
    def _permute(self, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return dist_utils.concat_all_gather(t)[rows]

    def to_encoder(self, t: torch.Tensor) -> torch.Tensor:
        """(B, ...) in batch order -> (B, ...) in the encoder's order (no gradient through a
        shuffle)."""
        if self._perm is not None:
            t = self._permute(t, self._perm)
        return interleave_groups(t, self.groups)

    def to_batch(self, t: torch.Tensor) -> torch.Tensor:
        """(B, ...) in the encoder's order -> (B, ...) in batch order; the inverse of
        :meth:`to_encoder`."""
        t = deinterleave_groups(t, self.groups)
        if self._inverse is not None:
            t = self._permute(t, self._inverse)
        return t
