"""ReSim pre-training as a detectron2 meta-architecture (paper §3; ReSim-C4, ReSim-FPN, baselines).

Input (one dict per image, from the two-view mapper)::

    {"image_q": uint8 (3, S, S) RGB, "image_k": uint8 (3, S, S) RGB,
     "windows": {feature: {"boxes_q": float32 (M, 4) x0,y0,x1,y1 in query-view pixels,
                           "boxes_k": float32 (M, 4) in key-view pixels,
                           "valid": bool (M,)}}}        # M fixed per feature (padded)

Training output (``model.train()``): a dict of 0-dim loss tensors, all to be summed (as
detectron2's ``SimpleTrainer`` does with every value).

* ``loss_global``: the global loss (MoCo-v2 InfoNCE or SimSiam's cosine loss) times
  ``RESIM.GLOBAL.LOSS_WEIGHT`` (λ).
* ``loss_region_<feature>``: region InfoNCE of that feature times its ``RESIM.REGION.LOSS_WEIGHTS``
  entry (absent for the baselines, ``RESIM.REGION.ENABLED False``).

Log-only metrics are NOT in the returned dict (detectron2 v0.6 sums every returned value). Each
training forward stores them, detached and still on the device (no host synchronisation inside the
step), in ``model.last_metrics``: ``global/{pos_sim,neg_sim,acc_top1}`` (SimSiam adds
``global/z_std``) and ``region_<feature>/{pos_sim,neg_sim,acc_top1,valid_per_image}``.
:meth:`ReSim.put_metrics` writes them to detectron2's current ``EventStorage`` with one host sync;
call it after the step, e.g. from a hook's ``after_step``.

Eval output (``model.eval()``), for the region-correspondence evaluator. Both views go through the
query backbone in eval mode; ``region_*`` are windows of the raw backbone maps, ``head_*`` of the
query region head's output on them (what the region loss trains), for every windowed feature that
has a region head other than the identity::

    {"region_q": {feature: (B, M, C) L2-normalised query-window features},
     "region_k": {feature: (B, M, C) L2-normalised key-window features},
     "head_q":   {feature: (B, M, D) the same from the region head's output},
     "head_k":   {feature: (B, M, D)},
     "valid":    {feature: (B, M) bool},
     "global_q": (B, C5) L2-normalised average-pooled res5 of the query view,
     "global_k": (B, C5) the same for the key view}

Raw backbone features are what transfers to detectors, and they exist for the baselines as well, so
MoCo-v2 and ReSim are compared on the same footing; the head's output shows what the objective
itself learned.

Encoder: detectron2's ``build_resnet_backbone`` (ReSim-C4; OUT_FEATURES must contain res4 and res5)
or ``build_resnet_fpn_backbone`` (ReSim-FPN). For the FPN, :func:`backbone_features` runs
``backbone.bottom_up`` once and then the FPN's own lateral/output convs top-down, returning both the
bottom-up maps (res5 for the global branch) and the p-levels the region branch needs; the module
tree is detectron2's FPN unchanged, so its state dict converts losslessly. FPN convs that
pre-training never uses (output convs of p-levels not in REGION.IN_FEATURES, lateral convs below the
lowest used level) are kept with ``requires_grad=False`` so DDP needs no ``find_unused_parameters``.

MoCo-v2: the key encoder (``backbone_k``, ``global_head_k``, ``region_heads_k``) is a copy of the
query side updated by momentum at the start of the key computation of every training forward
(θk <- m θk + (1 - m) θq), never by gradient. With ``RESIM.BN_GROUP_IMAGES`` every plain batch norm
of both encoders and the region heads is a
:class:`~resim_d2.layers.group_batch_norm.GroupBatchNorm2d`: each group of that many images of a
process (one GPU of the paper's 8 x 32) has its own statistics. The images of group g are rows
``g*n .. g*n + n-1`` of the process's batch; they enter the encoders interleaved (row ``k`` in
group ``k % G``, the order the layer normalises for free) and pooled outputs are put back. Keys go
through shuffle-BN when ``RESIM.MOCO.BN`` is "shuffle" and the step has more than one group
(processes x groups): the key images and their windows are permuted across processes and groups
before the key encoder, and its outputs unpermuted. "sync" relies on SyncBN norms instead. A step
normalised as one group leaks batch statistics from query to key encoder; the first training step
then logs a warning (:meth:`ReSim.leaks_batch_statistics`). The global keys of the whole batch (all
ranks) are enqueued after the loss.

SimSiam: one encoder for both views, predictor on both, symmetric negative cosine loss with
stop-gradient. Its region branch is the same region InfoNCE, the keys (key-view windows and
negatives) being the same encoder's key-view maps, detached.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import FPN
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..layers.group_batch_norm import (
    convert_group_batchnorm,
    deinterleave_groups,
    interleave_groups,
    num_groups,
)
from . import distributed as dist_utils
from .heads import (
    MoCoMLP,
    RegionSimSiamMLP,
    SimSiamPredictor,
    SimSiamProjector,
    build_region_head,
)
from .losses import global_infonce, region_infonce, region_simsiam_loss, simsiam_loss
from .region_pooling import POOLER_TYPES, pool_regions, region_negatives

__all__ = ["ReSim", "backbone_features", "all_output_shapes"]

logger = logging.getLogger(__name__)

_AMP_DTYPES = {
    "": None,
    "none": None,
    "float32": None,
    "bfloat16": torch.bfloat16,
    # float16 is left out on purpose: it needs a GradScaler, bfloat16 does not
}
_TRAINABLE_NORMS = ("BN", "SyncBN", "naiveSyncBN", "nnSyncBN", "GN")
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# torch.compile modes that replay CUDA graphs (on CUDA devices)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def all_output_shapes(backbone: Backbone) -> dict:
    """Output shapes of the backbone, plus those of its bottom-up network for an FPN."""
    shapes = {}
    if isinstance(backbone, FPN):
        shapes.update(backbone.bottom_up.output_shape())
    shapes.update(backbone.output_shape())
    return shapes


def _fpn_levels(fpn: FPN) -> list[str]:
    """The FPN's lateral/output levels in top-down order, e.g. ["p5", "p4", "p3", "p2"]."""
    shapes = fpn.bottom_up.output_shape()
    return [f"p{int(math.log2(shapes[f].stride))}" for f in fpn.in_features][::-1]


def backbone_features(backbone: Backbone, x: torch.Tensor, names) -> dict:
    """Feature maps ``names`` of ``backbone`` on ``x`` (may also return others).

    For a detectron2 ``FPN`` this returns the bottom-up maps (``res2`` .. ``res5``) and the
    requested p-levels, computed exactly as ``FPN.forward`` does but only down to the lowest
    requested level and with output convs only for requested levels (no top block: p6 is not
    supported). For any other backbone it is ``backbone(x)``.
    """
    if not isinstance(backbone, FPN):
        return backbone(x)
    bottom_up = backbone.bottom_up(x)
    out = dict(bottom_up)
    levels = _fpn_levels(backbone)
    wanted = [n for n in names if n.startswith("p") and n not in bottom_up]
    missing = [n for n in wanted if n not in levels]
    if missing:
        raise ValueError(f"FPN levels {missing} are not lateral levels of this FPN ({levels})")
    if not wanted:
        return out
    lowest = max(levels.index(n) for n in wanted)
    in_features = backbone.in_features
    prev = backbone.lateral_convs[0](bottom_up[in_features[-1]])
    if levels[0] in wanted:
        out[levels[0]] = backbone.output_convs[0](prev)
    for i in range(1, lowest + 1):
        lateral = backbone.lateral_convs[i](bottom_up[in_features[-1 - i]])
        top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
        prev = lateral + top_down
        if backbone._fuse_type == "avg":
            prev = prev / 2
        if levels[i] in wanted:
            out[levels[i]] = backbone.output_convs[i](prev)
    return out


def _freeze_unused_fpn(backbone: Backbone, used_levels) -> list[str]:
    """Set requires_grad=False on FPN convs no used level depends on. Returns their module names."""
    if not isinstance(backbone, FPN):
        return []
    levels = _fpn_levels(backbone)
    used = [lv for lv in used_levels if lv in levels]
    lowest = max((levels.index(lv) for lv in used), default=-1)
    frozen = []
    for i, lv in enumerate(levels):
        stage = lv[1:]
        pieces = []
        if lv not in used:
            pieces.append(f"fpn_output{stage}")
        if i > lowest:
            pieces.append(f"fpn_lateral{stage}")
        for name in pieces:
            for p in getattr(backbone, name).parameters():
                p.requires_grad_(False)
            frozen.append(name)
    return frozen


@META_ARCH_REGISTRY.register()
class ReSim(nn.Module):
    """ReSim pre-training model (see the module docstring for inputs, outputs and design)."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        global_head: nn.Module,
        region_heads: nn.ModuleDict,
        predictor: nn.Module | None = None,
        region_mlps: nn.ModuleDict | None = None,
        simsiam_region_loss: str = "infonce",
        pixel_mean,
        pixel_std,
        framework: str = "moco",
        global_in_feature: str = "res5",
        region_enabled: bool = True,
        region_in_features=("res4",),
        region_loss_weights=(1.0,),
        neg_pool_kernels=(3,),
        gather_negatives=(True,),
        neg_group_images=None,
        pooler_type: str = "PrRoIPool",
        region_temperature: float = 0.2,
        global_loss_weight: float = 1.0,
        moco_dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        moco_temperature: float = 0.2,
        moco_bn: str = "shuffle",
        bn_group_images: int = 0,
        amp_dtype: str = "",
        channels_last: bool = False,
        compile_encoders: bool = False,
        compile_mode: str = "default",
    ):
        """
        Args:
            backbone: query encoder, a detectron2 Backbone (ResNet or FPN over a ResNet).
            global_head: MoCoMLP (MoCo-v2) or SimSiamProjector (SimSiam) on the pooled global
                feature.
            region_heads: {feature: region head} (RegionProjection or Identity); empty for the
                baselines.
            predictor: SimSiam's predictor (None for MoCo-v2).
            region_mlps: SimSiam with ``simsiam_region_loss`` "cosine": {feature: ModuleDict with
                "proj" and "pred" :class:`RegionSimSiamMLP`} on the pooled windows.
            simsiam_region_loss: "cosine" (Table 7's region MLPs, SimSiam's loss per window) or
                "infonce" (region InfoNCE, as in the MoCo variant); see ``RESIM.SIMSIAM``.
            pixel_mean, pixel_std: per-channel input normalisation, in the 0-255 range (RGB).
            framework: "moco" or "simsiam".
            global_in_feature: map average-pooled for the global branch ("res5").
            region_enabled: False gives the MoCo-v2 / SimSiam baselines.
            region_in_features, region_loss_weights, neg_pool_kernels, gather_negatives,
                neg_group_images: per region feature, see ``RESIM.REGION`` (``neg_group_images``
                None: no grouping).
            pooler_type: "PrRoIPool" or "ROIAlign".
            region_temperature: τ of the region InfoNCE.
            global_loss_weight: λ.
            moco_dim, queue_size, momentum, moco_temperature, moco_bn: see ``RESIM.MOCO``.
            bn_group_images: MoCo only: every ``BatchNorm2d`` of the encoders and region heads
                normalises groups of this many images of the process separately (one GPU's batch
                norm each) and shuffle-BN shuffles the keys across the groups; 0: one group per
                process. See ``RESIM.BN_GROUP_IMAGES``.
            amp_dtype: "" (fp32) or "bfloat16" autocast around encoders and heads.
            channels_last: channels-last memory format for encoders and inputs.
            compile_encoders: torch.compile the encoder function (backbone + heads).
            compile_mode: ``torch.compile``'s mode ("default", "reduce-overhead", ...).
        """
        super().__init__()
        framework = framework.lower()
        if framework not in ("moco", "simsiam"):
            raise ValueError(
                f"RESIM.GLOBAL.FRAMEWORK must be 'moco' or 'simsiam', got '{framework}'"
            )
        if framework == "simsiam" and predictor is None:
            raise ValueError("SimSiam needs a predictor")
        if pooler_type not in POOLER_TYPES:
            raise ValueError(f"RESIM.REGION.POOLER_TYPE must be one of {POOLER_TYPES}")
        if amp_dtype not in _AMP_DTYPES:
            raise ValueError(f"RESIM.SPEED.AMP_DTYPE must be one of {sorted(_AMP_DTYPES)}")
        n = len(region_in_features)
        if neg_group_images is None:
            neg_group_images = [0] * n
        for name, seq in (
            ("LOSS_WEIGHTS", region_loss_weights),
            ("NEG_POOL_KERNELS", neg_pool_kernels),
            ("GATHER_NEGATIVES", gather_negatives),
            ("NEG_GROUP_IMAGES", neg_group_images),
        ):
            if region_enabled and len(seq) != n:
                raise ValueError(
                    f"RESIM.REGION.{name} has {len(seq)} entries but IN_FEATURES has {n} "
                    f"({list(region_in_features)})"
                )
        shapes = all_output_shapes(backbone)
        used = list(region_in_features) if region_enabled else []
        for f in used + [global_in_feature]:
            if f not in shapes:
                raise ValueError(
                    f"feature '{f}' is not produced by the backbone ({sorted(shapes)})"
                )
        if region_enabled and set(region_heads.keys()) != set(region_in_features):
            raise ValueError("region_heads must have one head per region feature")

        self.framework = framework
        self.backbone = backbone
        self.global_head = global_head
        self.region_heads = region_heads if region_enabled else nn.ModuleDict()
        self.predictor = predictor
        simsiam_region_loss = simsiam_region_loss.lower()
        if simsiam_region_loss not in ("cosine", "infonce"):
            raise ValueError(
                "RESIM.SIMSIAM.REGION_LOSS must be 'cosine' or 'infonce', "
                f"got '{simsiam_region_loss}'"
            )
        self.region_cosine = (
            framework == "simsiam" and region_enabled and (simsiam_region_loss == "cosine")
        )
        region_mlps = region_mlps if region_mlps is not None else nn.ModuleDict()
        if self.region_cosine and set(region_mlps.keys()) != set(region_in_features):
            raise ValueError("SimSiam's cosine region loss needs region_mlps for every feature")
        self.region_mlps = region_mlps if self.region_cosine else nn.ModuleDict()
        self.global_in_feature = global_in_feature
        self.region_enabled = bool(region_enabled)
        self.region_in_features = list(region_in_features)
        self.region_loss_weights = {
            f: float(w) for f, w in zip(region_in_features, region_loss_weights)
        }
        self.neg_pool_kernels = {f: int(k) for f, k in zip(region_in_features, neg_pool_kernels)}
        self.gather_negatives = {f: bool(g) for f, g in zip(region_in_features, gather_negatives)}
        self.neg_group_images = {f: int(g) for f, g in zip(region_in_features, neg_group_images)}
        for f, g in self.neg_group_images.items():
            if g < 0 or (g > 0 and self.gather_negatives[f]):
                raise ValueError(
                    f"RESIM.REGION.NEG_GROUP_IMAGES for '{f}' is {g}: it must be >= 0, and 0 when "
                    "its GATHER_NEGATIVES is True (gathered negatives are one set)"
                )
        self.region_strides = {f: shapes[f].stride for f in used}
        self.feature_strides = {name: shape.stride for name, shape in shapes.items()}
        self.pooler_type = pooler_type
        self.region_temperature = float(region_temperature)
        self.global_loss_weight = float(global_loss_weight)
        self.momentum = float(momentum)
        self.moco_temperature = float(moco_temperature)
        self.moco_bn = moco_bn
        if bn_group_images < 0:
            raise ValueError(f"RESIM.BN_GROUP_IMAGES must be >= 0, got {bn_group_images}")
        self.bn_group_images = int(bn_group_images) if framework == "moco" else 0
        # whether the first training step has checked for the batch-norm leak (see _check_leak)
        self._leak_checked = False
        self.amp_dtype = _AMP_DTYPES[amp_dtype]
        self.channels_last = bool(channels_last)
        self.compile_encoders = bool(compile_encoders)
        if compile_mode not in _COMPILE_MODES:
            raise ValueError(
                f"RESIM.SPEED.COMPILE_MODE must be one of {_COMPILE_MODES}, got '{compile_mode}'"
            )
        self.compile_mode = compile_mode
        # log-only metrics of the last training forward (see the module docstring)
        self.last_metrics: dict[str, torch.Tensor] = {}
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

        frozen = _freeze_unused_fpn(
            self.backbone, self.region_in_features if self.region_enabled else []
        )
        if frozen:
            logger.info(
                "ReSim: FPN convs unused by pre-training kept frozen: %s", ", ".join(frozen)
            )

        if self.bn_group_images:
            # before the key encoder is copied from the query encoder, so both are converted
            for module in (self.backbone, self.region_heads):
                convert_group_batchnorm(module, self.bn_group_images)
        if framework == "moco":
            self.backbone_k = copy.deepcopy(self.backbone)
            self.global_head_k = copy.deepcopy(self.global_head)
            self.region_heads_k = copy.deepcopy(self.region_heads)
            for module in (self.backbone_k, self.global_head_k, self.region_heads_k):
                for p in module.parameters():
                    p.requires_grad_(False)
            self.register_buffer("queue", F.normalize(torch.randn(moco_dim, queue_size), dim=0))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        r = cfg.RESIM
        rn = cfg.MODEL.RESNETS
        if rn.NORM in ("FrozenBN", "", None) or rn.NORM not in _TRAINABLE_NORMS:
            raise ValueError(
                f"ReSim pre-training needs trainable norms: MODEL.RESNETS.NORM must be one of "
                f"{_TRAINABLE_NORMS}, got '{rn.NORM}'"
            )
        if cfg.MODEL.BACKBONE.FREEZE_AT != 0:
            raise ValueError(
                "ReSim pre-training trains the whole encoder: set MODEL.BACKBONE.FREEZE_AT 0"
            )
        if rn.STRIDE_IN_1X1:
            raise ValueError(
                "ReSim uses torchvision-style ResNets (stride in the 3x3 conv): set "
                "MODEL.RESNETS.STRIDE_IN_1X1 False"
            )
        framework = r.GLOBAL.FRAMEWORK.lower()
        if framework == "moco":
            if r.MOCO.BN not in ("shuffle", "sync"):
                raise ValueError(f"RESIM.MOCO.BN must be 'shuffle' or 'sync', got '{r.MOCO.BN}'")
            if r.MOCO.BN == "sync" and rn.NORM not in ("SyncBN", "naiveSyncBN", "nnSyncBN"):
                raise ValueError(
                    "RESIM.MOCO.BN 'sync' needs synchronised norms: set MODEL.RESNETS.NORM 'SyncBN'"
                )
            if r.MOCO.QUEUE_SIZE % cfg.SOLVER.IMS_PER_BATCH != 0:
                raise ValueError(
                    f"RESIM.MOCO.QUEUE_SIZE ({r.MOCO.QUEUE_SIZE}) must be divisible by the global "
                    f"batch SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH})"
                )
        backbone = build_backbone(cfg)
        shapes = all_output_shapes(backbone)
        g_feat = r.GLOBAL.IN_FEATURE
        if g_feat not in shapes:
            raise ValueError(
                f"RESIM.GLOBAL.IN_FEATURE '{g_feat}' is not a backbone output ({sorted(shapes)}); "
                "add it to MODEL.RESNETS.OUT_FEATURES"
            )
        g_in = shapes[g_feat].channels
        predictor = None
        if framework == "moco":
            global_head = MoCoMLP(g_in, r.MOCO.MLP_DIM, r.MOCO.DIM)
        elif framework == "simsiam":
            global_head = SimSiamProjector(
                g_in, r.SIMSIAM.PROJ_DIM, rn.NORM, num_layers=r.SIMSIAM.PROJ_LAYERS
            )
            predictor = SimSiamPredictor(r.SIMSIAM.PROJ_DIM, r.SIMSIAM.PRED_HIDDEN_DIM, rn.NORM)
        else:
            raise ValueError(
                f"RESIM.GLOBAL.FRAMEWORK must be 'moco' or 'simsiam', got '{framework}'"
            )
        region_heads, region_dims = nn.ModuleDict(), {}
        if r.REGION.ENABLED:
            for f in r.REGION.IN_FEATURES:
                if f not in shapes:
                    raise ValueError(
                        f"RESIM.REGION.IN_FEATURES '{f}' is not a backbone output "
                        f"({sorted(shapes)})"
                    )
                region_heads[f], region_dims[f] = build_region_head(
                    r.REGION.HEAD, shapes[f].channels, r.REGION.HEAD_DIM, rn.NORM
                )
        neg_groups = []
        for f, g, gather in zip(
            r.REGION.IN_FEATURES, r.REGION.NEG_GROUP_IMAGES, r.REGION.GATHER_NEGATIVES
        ):
            if g == -1 and gather:
                raise ValueError(
                    f"RESIM.REGION.NEG_GROUP_IMAGES for '{f}' is -1 (RESIM.BN_GROUP_IMAGES), but "
                    "its GATHER_NEGATIVES is True: gathered negatives are one set; use 0"
                )
            neg_groups.append(r.BN_GROUP_IMAGES if g == -1 else g)
        region_mlps = nn.ModuleDict()
        cosine = framework == "simsiam" and r.SIMSIAM.REGION_LOSS.lower() == "cosine"
        if r.REGION.ENABLED and cosine:
            # synchronised like the encoder's norms (SimSiam: SyncBN over the whole batch)
            sync = rn.NORM in ("SyncBN", "naiveSyncBN", "nnSyncBN")
            for f in r.REGION.IN_FEATURES:
                c = region_dims[f]
                hidden = max(1, round(c * r.SIMSIAM.REGION_PRED_RATIO))
                proj = RegionSimSiamMLP(
                    c, c, c, final_norm=True, num_layers=r.SIMSIAM.PROJ_LAYERS, sync=sync
                )
                pred = RegionSimSiamMLP(c, hidden, c, final_norm=False, num_layers=2, sync=sync)
                region_mlps[f] = nn.ModuleDict({"proj": proj, "pred": pred})
        return {
            "backbone": backbone,
            "global_head": global_head,
            "region_heads": region_heads,
            "predictor": predictor,
            "region_mlps": region_mlps,
            "simsiam_region_loss": r.SIMSIAM.REGION_LOSS,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "framework": framework,
            "global_in_feature": g_feat,
            "region_enabled": r.REGION.ENABLED,
            "region_in_features": r.REGION.IN_FEATURES,
            "region_loss_weights": r.REGION.LOSS_WEIGHTS,
            "neg_pool_kernels": r.REGION.NEG_POOL_KERNELS,
            "gather_negatives": r.REGION.GATHER_NEGATIVES,
            "neg_group_images": neg_groups,
            "pooler_type": r.REGION.POOLER_TYPE,
            "region_temperature": r.REGION.TEMPERATURE,
            "global_loss_weight": r.GLOBAL.LOSS_WEIGHT,
            "moco_dim": r.MOCO.DIM,
            "queue_size": r.MOCO.QUEUE_SIZE,
            "momentum": r.MOCO.MOMENTUM,
            "moco_temperature": r.MOCO.TEMPERATURE,
            "moco_bn": r.MOCO.BN,
            "bn_group_images": r.BN_GROUP_IMAGES,
            "amp_dtype": r.SPEED.AMP_DTYPE,
            "channels_last": r.SPEED.CHANNELS_LAST,
            "compile_encoders": r.SPEED.COMPILE,
            "compile_mode": r.SPEED.COMPILE_MODE,
        }

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """SimSiam's predictors (global, and per level for ReSim on SimSiam): the parameters
        ``RESIM.SIMSIAM.FIX_PRED_LR`` keeps at a fixed learning rate (resim_d2.solver)."""
        modules = [self.predictor] if self.predictor is not None else []
        modules += [mlps["pred"] for mlps in self.region_mlps.values()]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def encoder_backbone(self) -> Backbone:
        """The encoder to convert to detectron2 detectors: the query backbone (ResNet or FPN)."""
        return self.backbone

    def put_metrics(self, storage=None) -> dict:
        """Write :attr:`last_metrics` to ``storage`` (default: detectron2's current EventStorage).

        One host synchronisation for all metrics; call it after the training step. Returns the
        values written ({} when there is no storage or no metrics yet).
        """
        if not self.last_metrics:
            return {}
        if storage is None:
            try:
                storage = get_event_storage()
            except AssertionError:  # not inside an EventStorage context
                return {}
        names = list(self.last_metrics)
        values = torch.stack([self.last_metrics[n].float() for n in names]).tolist()
        scalars = dict(zip(names, values))
        storage.put_scalars(**scalars)
        return scalars

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _images(self, batched_inputs, key: str) -> torch.Tensor:
        """Stack, move and normalise one view: (B, 3, S, S) float32."""
        x = torch.stack([torch.as_tensor(d[key]) for d in batched_inputs])
        x = x.to(self.device, non_blocking=True).float()
        x = (x - self.pixel_mean) / self.pixel_std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _windows(self, batched_inputs, features=None) -> dict:
        """{feature: (boxes_q (B, M, 4), boxes_k (B, M, 4), valid (B, M) bool)}, padding zeroed."""
        out = {}
        for f in self.region_in_features if features is None else features:
            ws = [d["windows"][f] for d in batched_inputs]

            def stack(key, dtype, ws=ws):
                t = torch.stack([torch.as_tensor(w[key]) for w in ws])
                return t.to(self.device, dtype=dtype, non_blocking=True)

            valid = stack("valid", torch.bool)
            zero = torch.zeros((), device=self.device)
            bq = torch.where(valid[..., None], stack("boxes_q", torch.float32), zero)
            bk = torch.where(valid[..., None], stack("boxes_k", torch.float32), zero)
            out[f] = (bq, bk, valid)
        return out

    def _needed_features(self) -> list[str]:
        region = self.region_in_features if self.region_enabled else []
        return list(dict.fromkeys(region + [self.global_in_feature]))

    def _encode(self, backbone, global_head, region_heads, x, region_grad: bool = True):
        """Encoder + heads on one view -> (global embedding (B, D), {feature: map (B, C, H, W)})."""
        feats = backbone_features(backbone, x, self._needed_features())
        g = global_head(feats[self.global_in_feature].mean(dim=(2, 3)))
        maps = {}
        if self.region_enabled:
            ctx = contextlib.nullcontext() if region_grad else torch.no_grad()
            with ctx:
                for f in self.region_in_features:
                    inp = feats[f] if region_grad else feats[f].detach()
                    maps[f] = region_heads[f](inp)
        return g, maps

    def _encoder_fn(self):
        if not self.compile_encoders:
            return self._encode
        fn = self.__dict__.get("_compiled_encode")
        if fn is None:
            fn = torch.compile(self._encode, mode=self.compile_mode)
            self.__dict__["_compiled_encode"] = fn
        return fn

    def __getstate__(self):
        # the compiled encoder is a cache bound to this instance: copies and pickles rebuild it
        state = self.__dict__.copy()
        state.pop("_compiled_encode", None)
        return state

    def _key_pairs(self):
        return (
            (self.backbone, self.backbone_k),
            (self.global_head, self.global_head_k),
            (self.region_heads, self.region_heads_k),
        )

    @torch.no_grad()
    def momentum_update(self):
        """θk <- m θk + (1 - m) θq over every parameter of the key encoder and key heads."""
        params_q, params_k = [], []
        for mq, mk in self._key_pairs():
            params_q.extend(mq.parameters())
            params_k.extend(mk.parameters())
        if not params_k:
            return
        torch._foreach_mul_(params_k, self.momentum)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor):
        """Write the keys of the whole batch (all ranks, (world*B, D)) at queue_ptr (it wraps)."""
        keys = dist_utils.concat_all_gather(keys)
        n = keys.shape[0]
        size = self.queue.shape[1]
        if size % n != 0:
            raise ValueError(
                f"RESIM.MOCO.QUEUE_SIZE ({size}) must be divisible by the global batch size ({n})"
            )
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue.index_copy_(1, idx, keys.t().to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    @staticmethod
    def _valid_denominator(valid):
        """(valid windows here, the loss normaliser): the mean over processes of the valid count,
        so that the DDP-averaged gradient is that of the mean over the global batch's windows."""
        n_valid = valid.float().sum()
        denom = dist_utils.all_reduce_mean(n_valid).clamp_min(1.0 / comm.get_world_size())
        return n_valid, denom

    def _put_region(self, f, loss, stats, n_valid, num_images, losses, metrics):
        """Add feature f's weighted region loss to ``losses`` and its stats to ``metrics``."""
        losses[f"loss_region_{f}"] = loss * self.region_loss_weights[f]
        for name, value in stats.items():
            metrics[f"region_{f}/{name}"] = value
        metrics[f"region_{f}/valid_per_image"] = n_valid.detach() / num_images

    def _region_loss(
        self, f, q_map, boxes_q, k_regions, negatives, valid, losses, metrics, groups=1
    ):
        """Region InfoNCE of feature f; adds the loss to ``losses`` and its stats to ``metrics``.

        ``q_map`` holds the images in :func:`interleave_groups` order of ``groups`` (the order the
        query encoder saw them in), everything else in the batch's order."""
        B = boxes_q.shape[0]
        scale = 1.0 / self.region_strides[f]
        pooled = pool_regions(q_map, interleave_groups(boxes_q, groups), scale, self.pooler_type)
        q = F.normalize(deinterleave_groups(pooled, groups), dim=-1)
        per_group = self.neg_group_images[f]
        if per_group and B > per_group and B % per_group:
            raise ValueError(
                f"RESIM.REGION.NEG_GROUP_IMAGES for '{f}' is {per_group}, but this process has "
                f"{B} images: the per-GPU batch must be a multiple of it, or at most it"
            )
        groups = B // per_group if per_group and B > per_group else 1
        n_valid, denom = self._valid_denominator(valid)
        loss, stats = region_infonce(
            q.flatten(0, 1),
            k_regions.flatten(0, 1),
            negatives,
            valid.flatten(),
            self.region_temperature,
            denom,
            groups=groups,
            matmul_dtype=self.amp_dtype,
        )
        self._put_region(f, loss, stats, n_valid, B, losses, metrics)

    def _region_cosine_loss(self, f, q_map, k_map, boxes_q, boxes_k, valid, losses, metrics):
        """ReSim on SimSiam (Table 7): SimSiam's loss between the query and key window of each
        valid window pair, through the level's projection and prediction MLPs."""
        scale = 1.0 / self.region_strides[f]
        mask = valid.flatten()
        vq = pool_regions(q_map, boxes_q, scale, self.pooler_type).flatten(0, 1)  # (B*M, C)
        vk = pool_regions(k_map, boxes_k, scale, self.pooler_type).flatten(0, 1)
        mlp = self.region_mlps[f]
        with self._autocast():
            z1, z2 = mlp["proj"](vq, mask), mlp["proj"](vk, mask)
            p1, p2 = mlp["pred"](z1, mask), mlp["pred"](z2, mask)
        n_valid, denom = self._valid_denominator(valid)
        loss, stats = region_simsiam_loss(
            p1.float(), p2.float(), z1.float(), z2.float(), mask, denom, boxes_q.shape[1]
        )
        self._put_region(f, loss, stats, n_valid, boxes_q.shape[0], losses, metrics)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        if self.compile_encoders and self.compile_mode in CUDAGRAPH_MODES:
            # a new training step: outputs of the previous step's CUDA graphs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if self.framework == "moco":
            return self._forward_moco(batched_inputs)
        return self._forward_simsiam(batched_inputs)

    def bn_groups(self, batch: int) -> int:
        """Batch-norm groups per process at a per-process batch of ``batch`` images (MoCo's
        ``RESIM.BN_GROUP_IMAGES``; 1 when the encoders have no grouped batch norm)."""
        if not self.bn_group_images:
            return 1
        return num_groups(batch, self.bn_group_images)

    def leaks_batch_statistics(self, batch: int, world: int | None = None) -> bool:
        """Whether a MoCo step at ``batch`` images per process on ``world`` processes normalises
        the whole step as one group: the key encoder's batch norms then see the statistics of
        exactly the query encoder's images (the leak shuffle-BN exists to remove). ``RESIM.MOCO.BN``
        "sync" (synchronised norms by choice) is not counted."""
        if self.framework != "moco" or self.moco_bn != "shuffle":
            return False
        world = comm.get_world_size() if world is None else world
        per_process, synced = False, False
        for module in (self.backbone, self.region_heads):
            for m in module.modules():
                if isinstance(m, (nn.SyncBatchNorm, NaiveSyncBatchNorm)):
                    synced = True
                elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                    per_process = True
        if synced:  # one set of statistics over all processes, whatever the shuffle
            return True
        return per_process and world * self.bn_groups(batch) == 1

    def _check_leak(self, batch: int):
        """Warn once, at the first training step, when batch statistics leak (see above)."""
        if self._leak_checked:
            return
        self._leak_checked = True
        if self.leaks_batch_statistics(batch):
            world = comm.get_world_size()
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

    def _forward_moco(self, batched_inputs):
        x_q = self._images(batched_inputs, "image_q")
        x_k = self._images(batched_inputs, "image_k")
        windows = self._windows(batched_inputs) if self.region_enabled else {}
        encode = self._encoder_fn()
        B = x_q.shape[0]
        groups = self.bn_groups(B)  # batch-norm groups in this process (virtual GPUs)
        self._check_leak(B)

        # the query encoder sees the images of group g at rows k % groups == g (GroupBatchNorm2d)
        with self._autocast():
            q_vec, q_maps = encode(
                self.backbone, self.global_head, self.region_heads, interleave_groups(x_q, groups)
            )
        q = F.normalize(deinterleave_groups(q_vec, groups).float(), dim=1)

        with torch.no_grad():
            self.momentum_update()
            feats = list(windows)
            boxes_k = [windows[f][1] for f in feats]
            # shuffle-BN: keys permuted across processes and/or this process's groups, with
            # their windows, then put in group order; outputs undo both
            idx_unshuffle = None
            if self.moco_bn == "shuffle" and (comm.get_world_size() > 1 or groups > 1):
                (x_k, *boxes_k), idx_unshuffle = dist_utils.batch_shuffle(
                    [x_k, *boxes_k], in_process=True
                )

            def unshuffle(t):
                return dist_utils.batch_unshuffle(deinterleave_groups(t, groups), idx_unshuffle)

            with self._autocast():
                k_vec, k_maps = encode(
                    self.backbone_k,
                    self.global_head_k,
                    self.region_heads_k,
                    interleave_groups(x_k, groups),
                )
            k = unshuffle(F.normalize(k_vec.float(), dim=1))
            k_regions, negatives = {}, {}
            for f, bk in zip(feats, boxes_k):
                k_map = k_maps[f].float()
                kr = pool_regions(
                    k_map,
                    interleave_groups(bk, groups),
                    1.0 / self.region_strides[f],
                    self.pooler_type,
                )
                k_regions[f] = unshuffle(F.normalize(kr, dim=-1))
                if self.gather_negatives[f] or (idx_unshuffle is None and groups == 1):
                    # a gathered set is the same whatever the order, so no unshuffle is needed
                    negatives[f] = region_negatives(
                        k_map, self.neg_pool_kernels[f], self.gather_negatives[f]
                    )
                else:  # per-group negatives must come from the group's own images
                    neg = region_negatives(k_map, self.neg_pool_kernels[f]).view(
                        k_map.shape[0], -1, k_map.shape[1]
                    )
                    negatives[f] = unshuffle(neg).flatten(0, 1)

        out = {}
        loss_g, stats = global_infonce(q, k, self.queue.clone(), self.moco_temperature)
        out["loss_global"] = loss_g * self.global_loss_weight
        metrics = {f"global/{n}": v for n, v in stats.items()}
        for f in windows:
            bq, _, valid = windows[f]
            self._region_loss(
                f, q_maps[f], bq, k_regions[f], negatives[f], valid, out, metrics, groups
            )
        self.dequeue_and_enqueue(k)
        self.last_metrics = metrics
        return out

    def _forward_simsiam(self, batched_inputs):
        x_q = self._images(batched_inputs, "image_q")
        x_k = self._images(batched_inputs, "image_k")
        windows = self._windows(batched_inputs) if self.region_enabled else {}
        encode = self._encoder_fn()

        with self._autocast():
            z1, q_maps = encode(self.backbone, self.global_head, self.region_heads, x_q)
            # the cosine region loss is symmetric: the key view's windows need gradients too
            z2, k_maps = encode(
                self.backbone,
                self.global_head,
                self.region_heads,
                x_k,
                region_grad=self.region_cosine,
            )
            p1 = self.predictor(z1)
            p2 = self.predictor(z2)
        out = {}
        loss_g, stats = simsiam_loss(p1.float(), p2.float(), z1.float(), z2.float())
        out["loss_global"] = loss_g * self.global_loss_weight
        metrics = {f"global/{n}": v for n, v in stats.items()}
        for f in windows:
            bq, bk, valid = windows[f]
            if self.region_cosine:
                self._region_cosine_loss(f, q_maps[f], k_maps[f], bq, bk, valid, out, metrics)
                continue
            with torch.no_grad():
                k_map = k_maps[f].detach().float()
                kr = pool_regions(k_map, bk, 1.0 / self.region_strides[f], self.pooler_type)
                k_regions = F.normalize(kr, dim=-1)
                negatives = region_negatives(
                    k_map, self.neg_pool_kernels[f], self.gather_negatives[f]
                )
            self._region_loss(f, q_maps[f], bq, k_regions, negatives, valid, out, metrics)
        self.last_metrics = metrics
        return out

    @torch.no_grad()
    def inference(self, batched_inputs) -> dict:
        """Region (and global) embeddings of both views from the query backbone; see module doc.

        Every windowed feature of the inputs that the backbone produces is evaluated, whether or not
        the region branch trained it (so the baselines can be scored too).
        """
        x_q = self._images(batched_inputs, "image_q")
        x_k = self._images(batched_inputs, "image_k")
        windowed = batched_inputs[0].get("windows", {}) if batched_inputs else {}
        features = [f for f in windowed if f in self.feature_strides]
        names = list(dict.fromkeys(features + [self.global_in_feature]))
        with self._autocast():
            fq = backbone_features(self.backbone, x_q, names)
            fk = backbone_features(self.backbone, x_k, names)
        out = {
            "region_q": {},
            "region_k": {},
            "head_q": {},
            "head_k": {},
            "valid": {},
            "global_q": F.normalize(fq[self.global_in_feature].float().mean(dim=(2, 3)), dim=1),
            "global_k": F.normalize(fk[self.global_in_feature].float().mean(dim=(2, 3)), dim=1),
        }
        for f, (bq, bk, valid) in self._windows(batched_inputs, features).items():
            scale = 1.0 / self.feature_strides[f]
            out["region_q"][f] = F.normalize(
                pool_regions(fq[f], bq, scale, self.pooler_type), dim=-1
            )
            out["region_k"][f] = F.normalize(
                pool_regions(fk[f], bk, scale, self.pooler_type), dim=-1
            )
            out["valid"][f] = valid
            head = self.region_heads[f] if f in self.region_heads else None
            if head is not None and not isinstance(head, nn.Identity):
                with self._autocast():
                    hq, hk = head(fq[f]), head(fk[f])
                for key, h, boxes in (("head_q", hq, bq), ("head_k", hk, bk)):
                    out[key][f] = F.normalize(
                        pool_regions(h, boxes, scale, self.pooler_type), dim=-1
                    )
        return out
