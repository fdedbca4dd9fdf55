"""MoCo-v2 as ReSim's global objective (paper eq. 3-4; Chen et al. 2020, He et al. 2020).

The key encoder (``backbone_k``, ``global_head_k``, ``region_heads_k``) is a copy of the query
side, updated by momentum at the start of every step's key computation (θk <- m θk + (1 - m) θq),
never by gradient. The global loss is InfoNCE of each query against its key and a queue of the
keys of earlier steps (``queue`` (D, K), ``queue_ptr``); the keys of the whole step (all processes)
are enqueued after the loss.

Batch norm: with ``RESIM.BN_GROUP_IMAGES`` every plain batch norm of both encoders and the region
heads normalises each group of that many images of a process separately (one GPU of the paper's
8 x 32 each; the query encoder sees the groups interleaved, :class:`BatchOrder`). Keys go through
shuffle-BN when ``RESIM.MOCO.BN`` is "shuffle" and the step has more than one group (processes x
groups): the key images are permuted across processes and groups before the key encoder, and every
per-image output is put back. "sync" relies on SyncBN norms instead. A step normalised as one group
leaks batch statistics from query to key encoder; the first training step then logs a warning.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import NaiveSyncBatchNorm, ShapeSpec
from detectron2.utils import comm

from ..layers.group_batch_norm import num_groups
from . import distributed as dist_utils
from .batch_order import BatchOrder
from .global_objective import GLOBAL_OBJECTIVE_REGISTRY, EncodedView, GlobalObjective
from .heads import MoCoMLP
from .losses import global_infonce
from .momentum_encoder import add_momentum_encoder, momentum_update

__all__ = ["MoCo"]

logger = logging.getLogger(__name__)


@GLOBAL_OBJECTIVE_REGISTRY.register()
class MoCo(GlobalObjective):
    """MoCo-v2: momentum key encoder, queue of negative keys, shuffle-BN (module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        mlp_dim: int = 2048,
        dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        shuffle_bn: bool = True,
        bn_group_images: int = 0,
        loss_weight: float = 1.0,
    ):
        """
        Args:
            mlp_dim, dim: hidden and output width of the MoCo-v2 MLP head.
            queue_size: negative keys kept (K).
            momentum: m of the key encoder's update.
            temperature: τ of the global InfoNCE.
            shuffle_bn: MoCo's shuffle-BN ("shuffle"); False: synchronised norms ("sync").
            bn_group_images: images per batch-norm group of a process (0: the whole process).
            loss_weight: λ, the global loss's weight.
        """
        self.mlp_dim, self.dim, self.queue_size = int(mlp_dim), int(dim), int(queue_size)
        self.momentum = float(momentum)
        self.temperature = float(temperature)
        self.shuffle_bn = bool(shuffle_bn)
        self.bn_group_images = int(bn_group_images)
        self.loss_weight = float(loss_weight)
        self._leak_checked = False  # whether the first step has checked for the leak

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        m = cfg.RESIM.MOCO
        return {
            "mlp_dim": m.MLP_DIM,
            "dim": m.DIM,
            "queue_size": m.QUEUE_SIZE,
            "momentum": m.MOMENTUM,
            "temperature": m.TEMPERATURE,
            "shuffle_bn": m.BN == "shuffle",
            "bn_group_images": cfg.RESIM.BN_GROUP_IMAGES,
            "loss_weight": cfg.RESIM.GLOBAL.LOSS_WEIGHT,
        }

    def build_heads(self, input_shape: ShapeSpec) -> dict[str, nn.Module]:
        return {"global_head": MoCoMLP(input_shape.channels, self.mlp_dim, self.dim)}

    def attach(self, model: nn.Module) -> None:
        add_momentum_encoder(model)
        model.register_buffer("queue", F.normalize(torch.randn(self.dim, self.queue_size), dim=0))
        model.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # ------------------------------------------------------------------ the step
    def groups(self, batch: int) -> int:
        """Batch-norm groups of a process of ``batch`` images (virtual GPUs)."""
        return num_groups(batch, self.bn_group_images) if self.bn_group_images else 1

    def query_order(self, batch: int) -> BatchOrder:
        return BatchOrder(self.groups(batch))

    @torch.no_grad()
    def encode_keys(self, model: nn.Module, x_k: torch.Tensor) -> EncodedView:
        batch = x_k.shape[0]
        self._check_leak(model, batch)
        momentum_update(model, self.momentum)
        groups = self.groups(batch)
        shuffle = self.shuffle_bn and (comm.get_world_size() > 1 or groups > 1)
        order = BatchOrder(groups, shuffle=shuffle, batch=batch, device=x_k.device)
        key = model.encode(x_k, order, key_encoder=True)  # under no_grad already
        key.embedding = F.normalize(key.embedding.float(), dim=1)  # the keys, as enqueued
        return key

    def loss(self, model: nn.Module, query: EncodedView, key: EncodedView):
        q = F.normalize(query.embedding.float(), dim=1)
        loss, stats = global_infonce(q, key.embedding, model.queue.clone(), self.temperature)
        return loss * self.loss_weight, stats

    def after_step(self, model: nn.Module, key: EncodedView) -> None:
        self.dequeue_and_enqueue(model, key.embedding)

    @torch.no_grad()
    def dequeue_and_enqueue(self, model: nn.Module, keys: torch.Tensor) -> None:
        """Write the keys of the whole step (all processes, (world*B, D)) at ``queue_ptr`` (it
        wraps)."""
        keys = dist_utils.concat_all_gather(keys)
        n, size = keys.shape[0], model.queue.shape[1]
        if size % n != 0:
            raise ValueError(
                f"RESIM.MOCO.QUEUE_SIZE ({size}) must be divisible by the global batch size ({n})"
            )
        idx = (model.queue_ptr + torch.arange(n, device=keys.device)) % size
        model.queue.index_copy_(1, idx, keys.t().to(model.queue.dtype))
        model.queue_ptr.copy_((model.queue_ptr + n) % size)

    # ------------------------------------------------------------------ the leak
    def leaks_batch_statistics(self, model: nn.Module, batch: int, world: int) -> bool:
        """Whether a step at ``batch`` images per process on ``world`` processes normalises the
        whole step as one group: the key encoder's batch norms then see the statistics of exactly
        the query encoder's images (the leak shuffle-BN exists to remove). "sync" (synchronised
        norms by choice) is not counted."""
        if not self.shuffle_bn:
            return False
        per_process, synced = False, False
        for module in (model.backbone, model.region_heads):
            for m in module.modules():
                if isinstance(m, (nn.SyncBatchNorm, NaiveSyncBatchNorm)):
                    synced = True
                elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                    per_process = True
        if synced:  # one set of statistics over all processes, whatever the shuffle
            return True
        return per_process and world * self.groups(batch) == 1

    def _check_leak(self, model: nn.Module, batch: int) -> None:
        """Warn once, at the first training step, when batch statistics leak (see above)."""
        if self._leak_checked:
            return
        self._leak_checked = True
        world = comm.get_world_size()
        if self.leaks_batch_statistics(model, batch, world):
            logger.warning(
                "ReSim (MoCo): every batch norm of this step normalises all %d images as one "
                "group (%d process(es), RESIM.BN_GROUP_IMAGES %d), so shuffle-BN has nothing to "
                "shuffle across and the key encoder's batch statistics are those of the query "
                "encoder's own images: the intra-batch leak shuffle-BN exists to remove (it "
                "makes the contrastive task easier than intended). Set RESIM.BN_GROUP_IMAGES to "
                "a divisor of the per-process batch below it (the paper: 32 images per GPU) with "
                "plain batch norm (MODEL.RESNETS.NORM 'BN'), or use RESIM.MOCO.BN 'sync' with "
                "MODEL.RESNETS.NORM 'SyncBN'.",
                batch * world,
                world,
                self.bn_group_images,
            )
