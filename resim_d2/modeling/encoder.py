"""The encoder's feature maps for pre-training: which maps a backbone produces, and FPN levels
computed only as far down as the region branch needs them.

Encoder: detectron2's ``build_resnet_backbone`` (ReSim-C4; OUT_FEATURES must contain res4 and res5)
or ``build_resnet_fpn_backbone`` (ReSim-FPN). For the FPN, :func:`backbone_features` runs
``backbone.bottom_up`` once and then the FPN's own lateral/output convs top-down, returning both the
bottom-up maps (res5 for the global branch) and the p-levels the region branch needs; the module
tree is detectron2's FPN unchanged, so its state dict converts losslessly. FPN convs that
pre-training never uses (output convs of p-levels not in REGION.IN_FEATURES, lateral convs below the
lowest used level) are kept with ``requires_grad=False`` (:func:`freeze_unused_fpn`) so DDP needs no
``find_unused_parameters``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import FPN

__all__ = ["all_output_shapes", "backbone_features", "freeze_unused_fpn"]


def all_output_shapes(backbone: Backbone) -> dict:
    """{name: ShapeSpec} of the backbone's outputs, plus its bottom-up network's for an FPN."""
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


def freeze_unused_fpn(backbone: Backbone, used_levels) -> list[str]:
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
