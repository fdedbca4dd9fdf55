"""ReSim pre-training model: meta-architecture, global objectives, region branches, heads, losses,
region pooling, collectives.

Importing this package registers :class:`ReSim` in detectron2's ``META_ARCH_REGISTRY``
(``cfg.MODEL.META_ARCHITECTURE = "ReSim"``).
"""

from .global_objective import GLOBAL_OBJECTIVE_REGISTRY, GlobalObjective
from .heads import MoCoMLP, RegionProjection, SimSiamPredictor, SimSiamProjector, build_region_head
from .linear_probe import LinearProbe  # noqa: F401  (registers META_ARCHITECTURE "LinearProbe")
from .losses import global_infonce, region_infonce, simsiam_loss
from .meta_arch import ReSim, all_output_shapes, backbone_features
from .moco import MoCo
from .region_branch import RegionInfoNCE, RegionSimSiam
from .region_pooling import pool_regions, region_negatives
from .roi_heads import Res5ROIHeadsExtraNorm  # noqa: F401  (registers it in ROI_HEADS_REGISTRY)
from .simsiam import SimSiam

__all__ = [
    "ReSim",
    "GLOBAL_OBJECTIVE_REGISTRY",
    "GlobalObjective",
    "MoCo",
    "SimSiam",
    "RegionInfoNCE",
    "RegionSimSiam",
    "backbone_features",
    "all_output_shapes",
    "MoCoMLP",
    "SimSiamProjector",
    "SimSiamPredictor",
    "RegionProjection",
    "build_region_head",
    "region_infonce",
    "global_infonce",
    "simsiam_loss",
    "pool_regions",
    "region_negatives",
]
