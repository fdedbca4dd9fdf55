"""ReSim's region branch, one per feature level (paper §3.3-3.4, eq. 1-2; Table 7 for SimSiam).

A branch owns everything of its level: the sliding windows' size and stride (the data pipeline
places them, ``RESIM.REGION.WINDOW_SIZES/STRIDES``; the branch checks they match its feature), the
region head on the level's map (built here, registered on the model as ``region_heads[feature]``,
applied by the encoder), the pooler that turns each window into one feature, the negatives, the
temperature and the grouping of negatives per emulated GPU. Called with both views' head outputs
and the windows, it returns ``(losses, metrics)``:

* :class:`RegionInfoNCE`: the paper's region InfoNCE. Query windows pooled from the query view's
  map, their positives from the key view's map (MoCo: the momentum encoder's; SimSiam: the same
  encoder's, detached), negatives every window-sized average of the key map.
* :class:`RegionSimSiam`: ReSim on SimSiam with ``RESIM.SIMSIAM.REGION_LOSS "cosine"``: SimSiam's
  symmetric cosine between each window pair through per-level projection and prediction MLPs
  (registered as ``region_mlps[feature]``).

Windows: ``boxes_q``/``boxes_k`` (B, M, 4) in view pixels, ``valid`` (B, M) bool, padded windows
zeroed; everything per image in batch order. Maps come in their encoder's order (``q_order``,
``k_order``: :class:`~resim_d2.modeling.batch_order.BatchOrder`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.utils import comm

from . import distributed as dist_utils
from .heads import RegionSimSiamMLP, build_region_head
from .losses import region_infonce, region_simsiam_loss
from .precision import AMP_DTYPES, autocast
from .region_pooling import pool_regions, region_negatives

__all__ = [
    "RegionWindows",
    "RegionBranch",
    "RegionInfoNCE",
    "RegionSimSiam",
    "build_region_branches",
]

_SYNC_NORMS = ("SyncBN", "naiveSyncBN", "nnSyncBN")


@dataclass
class RegionWindows:
    """The windows of one feature for a batch: boxes_q, boxes_k (B, M, 4) float32, valid (B, M)."""

    boxes_q: torch.Tensor
    boxes_k: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_inputs(cls, batched_inputs: list[dict], feature: str, device) -> RegionWindows:
        """The windows of ``feature`` of the model's inputs (one dict per image, ``"windows"``:
        {feature: {"boxes_q" (M, 4), "boxes_k" (M, 4), "valid" (M,)}}) on ``device``, padding
        zeroed. Where the per-image tensors are the rows of one batch tensor (the GPU view path
        makes them so), that tensor is used as it is, not stacked again."""
        per_image = [d["windows"][feature] for d in batched_inputs]

        def batch(key, dtype):
            rows = [torch.as_tensor(w[key]) for w in per_image]
            t = _rows_of_one_tensor(rows)
            t = torch.stack(rows) if t is None else t
            return t.to(device, dtype=dtype, non_blocking=True)

        valid = batch("valid", torch.bool)
        zero = torch.zeros((), device=device)
        boxes_q = torch.where(valid[..., None], batch("boxes_q", torch.float32), zero)
        boxes_k = torch.where(valid[..., None], batch("boxes_k", torch.float32), zero)
        return cls(boxes_q, boxes_k, valid)


def _rows_of_one_tensor(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """The (B, ...) tensor whose rows 0..B-1 are exactly ``rows`` (views of it), else None."""
    base = rows[0]._base
    if base is None or base.shape[0] != len(rows) or base.shape[1:] != rows[0].shape:
        return None
    for i, row in enumerate(rows):
        view = base[i]
        if row._base is not base or (row.data_ptr(), row.stride()) != (
            view.data_ptr(),
            view.stride(),
        ):
            return None
    return base


class RegionBranch:
    """One level's region objective; see the module docstring.

    Args:
        feature: the level ("res4", "p3", ...); its losses are ``loss_region_<feature>``.
        input_shape: the level's backbone output (stride: the windows' scale).
        head: "conv" (the paper's projection) or "none" (raw maps); ``head_dim`` its width.
        norm: the head's batch norm, as the backbone's.
        pooler_type: "PrRoIPool" (paper) or "ROIAlign".
        loss_weight: the level's weight in the total loss.
        amp_dtype: the autocast dtype of the step (None: float32).
    """

    def __init__(
        self,
        feature,
        input_shape: ShapeSpec,
        *,
        head="conv",
        head_dim=128,
        norm="BN",
        pooler_type="PrRoIPool",
        loss_weight=1.0,
        amp_dtype=None,
    ):
        self.feature = feature
        self.stride = input_shape.stride
        self.head, self.channels = build_region_head(head, input_shape.channels, head_dim, norm)
        self.pooler_type = pooler_type
        self.loss_weight = float(loss_weight)
        self.amp_dtype = amp_dtype

    def pool(self, feature_map: torch.Tensor, boxes: torch.Tensor, order) -> torch.Tensor:
        """Windows ``boxes`` (B, M, 4, batch order) of a map in ``order`` -> (B, M, C) float32,
        batch order, not normalised."""
        pooled = pool_regions(
            feature_map, order.to_encoder(boxes), 1.0 / self.stride, self.pooler_type
        )
        return order.to_batch(pooled)

    def _finish(self, loss, stats, valid):
        """The weighted loss and the level's metrics, ``region_<feature>/<name>``."""
        n_valid = valid.float().sum()
        metrics = {f"region_{self.feature}/{k}": v for k, v in stats.items()}
        metrics[f"region_{self.feature}/valid_per_image"] = n_valid.detach() / valid.shape[0]
        return {f"loss_region_{self.feature}": loss * self.loss_weight}, metrics

    @staticmethod
    def valid_denominator(valid: torch.Tensor) -> torch.Tensor:
        """The loss normaliser: the mean over processes of the valid count, so that the
        DDP-averaged gradient is that of the mean over the global batch's windows."""
        n_valid = valid.float().sum()
        return dist_utils.all_reduce_mean(n_valid).clamp_min(1.0 / comm.get_world_size())


class RegionInfoNCE(RegionBranch):
    """The paper's region InfoNCE (eq. 1-2) of one level.

    Args (besides :class:`RegionBranch`'s):
        temperature: τ.
        neg_pool_kernel: average-pool kernel of the negatives (window / stride: 3 on C4/P4).
        gather_negatives: negatives of all processes (released code: C4/P4 yes, P3 no).
        neg_group_images: images whose negatives form one set (0: the process's batch); the
            per-process batch must be a multiple of it, or at most it.
    """

    def __init__(
        self,
        feature,
        input_shape,
        *,
        temperature=0.2,
        neg_pool_kernel=3,
        gather_negatives=True,
        neg_group_images=0,
        **kwargs,
    ):
        super().__init__(feature, input_shape, **kwargs)
        self.temperature = float(temperature)
        self.neg_pool_kernel = int(neg_pool_kernel)
        self.gather_negatives = bool(gather_negatives)
        self.neg_group_images = int(neg_group_images)

    @torch.no_grad()
    def keys(self, k_map: torch.Tensor, windows: RegionWindows, k_order):
        """(positives (B*M, D) normalised, negatives (N, D) normalised) from the key map."""
        k_map = k_map.detach().float()
        k = F.normalize(self.pool(k_map, windows.boxes_k, k_order), dim=-1)
        if self.gather_negatives or k_order.is_identity:
            # a gathered set is the same whatever the order, so it needs no reordering
            neg = region_negatives(k_map, self.neg_pool_kernel)
            if self.gather_negatives:  # the negatives of every process, one set
                neg = dist_utils.concat_all_gather(neg)
        else:  # per-group negatives must come from the group's own images
            neg = region_negatives(k_map, self.neg_pool_kernel).view(
                k_map.shape[0], -1, k_map.shape[1]
            )
            neg = k_order.to_batch(neg).flatten(0, 1)
        return k.flatten(0, 1), neg

    def negative_groups(self, batch: int) -> int:
        """Sets of negatives of a process of ``batch`` images."""
        per_group = self.neg_group_images
        if per_group and batch > per_group and batch % per_group:
            raise ValueError(
                f"RESIM.REGION.NEG_GROUP_IMAGES for '{self.feature}' is {per_group}, but this "
                f"process has {batch} images: the per-GPU batch must be a multiple of it, or at "
                "most it"
            )
        return batch // per_group if per_group and batch > per_group else 1

    def __call__(self, q_map, k_map, windows: RegionWindows, q_order, k_order):
        """Region InfoNCE of the level: ({"loss_region_<f>": 0-dim}, metrics)."""
        positives, negatives = self.keys(k_map, windows, k_order)
        q = F.normalize(self.pool(q_map, windows.boxes_q, q_order), dim=-1)
        valid = windows.valid
        loss, stats = region_infonce(
            q.flatten(0, 1),
            positives,
            negatives,
            valid.flatten(),
            self.temperature,
            self.valid_denominator(valid),
            groups=self.negative_groups(valid.shape[0]),
            matmul_dtype=self.amp_dtype,
        )
        return self._finish(loss, stats, valid)


class RegionSimSiam(RegionBranch):
    """ReSim on SimSiam (Table 7): SimSiam's loss between the query and key window of each valid
    window pair, through the level's projection and prediction MLPs (``self.mlp``: "proj", "pred").

    Args (besides :class:`RegionBranch`'s):
        proj_layers: linear layers of the projection (as the global projector's).
        pred_ratio: the prediction bottleneck as a fraction of the level's channels.
    """

    def __init__(self, feature, input_shape, *, proj_layers=3, pred_ratio=0.25, **kwargs):
        super().__init__(feature, input_shape, **kwargs)
        self.proj_layers = int(proj_layers)
        self.pred_ratio = float(pred_ratio)
        self.mlp = None

    def build_mlp(self, norm: str) -> nn.Module:
        """The level's MLPs on the pooled windows, synchronised like the encoder's norms."""
        c, sync = self.channels, norm in _SYNC_NORMS
        hidden = max(1, round(c * self.pred_ratio))
        proj = RegionSimSiamMLP(c, c, c, final_norm=True, num_layers=self.proj_layers, sync=sync)
        pred = RegionSimSiamMLP(c, hidden, c, final_norm=False, num_layers=2, sync=sync)
        self.mlp = nn.ModuleDict({"proj": proj, "pred": pred})
        return self.mlp

    def __call__(self, q_map, k_map, windows: RegionWindows, q_order, k_order):
        """SimSiam's cosine per window pair: ({"loss_region_<f>": 0-dim}, metrics)."""
        mask = windows.valid.flatten()
        vq = self.pool(q_map, windows.boxes_q, q_order).flatten(0, 1)  # (B*M, C)
        vk = self.pool(k_map, windows.boxes_k, k_order).flatten(0, 1)
        with autocast(vq.device, self.amp_dtype):
            z1, z2 = self.mlp["proj"](vq, mask), self.mlp["proj"](vk, mask)
            p1, p2 = self.mlp["pred"](z1, mask), self.mlp["pred"](z2, mask)
        M = windows.valid.shape[1]
        loss, stats = region_simsiam_loss(
            p1.float(),
            p2.float(),
            z1.float(),
            z2.float(),
            mask,
            self.valid_denominator(windows.valid),
            M,
        )
        return self._finish(loss, stats, windows.valid)


def build_region_branches(cfg, shapes: dict) -> dict[str, RegionBranch]:
    """{feature: branch} for ``RESIM.REGION.IN_FEATURES`` ({} for the baselines), their heads
    (and SimSiam MLPs) built level by level in that order. ``shapes``: {name: ShapeSpec} of the
    backbone's outputs. Expects a config that passed :func:`check_resim_config`."""
    r = cfg.RESIM
    if not r.REGION.ENABLED:
        return {}
    cosine = r.GLOBAL.FRAMEWORK.lower() == "simsiam" and r.SIMSIAM.REGION_LOSS.lower() == "cosine"
    norm = cfg.MODEL.RESNETS.NORM
    branches = {}
    for i, f in enumerate(r.REGION.IN_FEATURES):
        common = {
            "head": r.REGION.HEAD,
            "head_dim": r.REGION.HEAD_DIM,
            "norm": norm,
            "pooler_type": r.REGION.POOLER_TYPE,
            "loss_weight": r.REGION.LOSS_WEIGHTS[i],
            "amp_dtype": AMP_DTYPES[r.SPEED.AMP_DTYPE],
        }
        if cosine:
            branches[f] = RegionSimSiam(
                f,
                shapes[f],
                proj_layers=r.SIMSIAM.PROJ_LAYERS,
                pred_ratio=r.SIMSIAM.REGION_PRED_RATIO,
                **common,
            )
        else:
            groups = r.REGION.NEG_GROUP_IMAGES[i]
            branches[f] = RegionInfoNCE(
                f,
                shapes[f],
                temperature=r.REGION.TEMPERATURE,
                neg_pool_kernel=r.REGION.NEG_POOL_KERNELS[i],
                gather_negatives=r.REGION.GATHER_NEGATIVES[i],
                neg_group_images=r.BN_GROUP_IMAGES if groups == -1 else groups,
                **common,
            )
    if cosine:  # after every head, in the order of the levels
        for branch in branches.values():
            branch.build_mlp(norm)
    return branches
