"""Region features and region negatives of ReSim (paper §3.3, appendix A.1).

* :func:`pool_regions`: a 1x1 feature per sliding window, by Precise RoI Pooling (the paper) or
  ROIAlign (the paper's ablation), at the map's spatial scale (1/16 on C4/P4, 1/8 on P3).
* :func:`region_negatives`: stride-1 average pooling of the key map with a window-sized kernel
  (3x3 on C4/P4: 14x14 -> 12x12 at 224 px), L2-normalised, every position of every image.

Windows of all images are pooled with fixed shapes, valid or not (the loss masks padded windows), so
the model needs no data-dependent indexing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from resim_d2.layers import prroi_pool

__all__ = ["POOLER_TYPES", "pool_regions", "region_negatives"]

POOLER_TYPES = ("PrRoIPool", "ROIAlign")


def _rois(boxes: torch.Tensor) -> torch.Tensor:
    """(B, M, 4) boxes -> (B*M, 5) rois ``(batch_index, x0, y0, x1, y1)``, image-major."""
    B, M = boxes.shape[:2]
    idx = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(M)
    return torch.cat([idx[:, None], boxes.reshape(B * M, 4)], dim=1)


def pool_regions(
    features: torch.Tensor,
    boxes: torch.Tensor,
    spatial_scale: float,
    pooler_type: str = "PrRoIPool",
) -> torch.Tensor:
    """One feature vector per window (1x1 output), NOT normalised.

    Args:
        features: (B, C, H, W) feature map of the view (any float dtype; pooled in float32).
        boxes: (B, M, 4) windows ``(x0, y0, x1, y1)`` in view pixels, row b on image b.
        spatial_scale: 1 / stride of ``features`` (1/16 for res4/p4, 1/8 for p3).
        pooler_type: "PrRoIPool" (exact integral, no half-pixel offset) or "ROIAlign" (torchvision
            roi_align, adaptive sampling, aligned=False so both poolers place feature cell j at
            input coordinate j / spatial_scale).

    Returns:
        (B, M, C) float32 tensor.
    """
    B, C = features.shape[:2]
    M = boxes.shape[1]
    feats = features.float()
    boxes = boxes.to(device=feats.device, dtype=torch.float32)
    if pooler_type == "PrRoIPool":
        out = prroi_pool(feats, boxes, 1, spatial_scale)  # (B, M, 4): M boxes per image
    elif pooler_type == "ROIAlign":
        rois = _rois(boxes)
        out = roi_align(feats, rois, output_size=1, spatial_scale=spatial_scale, sampling_ratio=0)
    else:
        raise ValueError(
            f"RESIM.REGION.POOLER_TYPE must be one of {POOLER_TYPES}, got '{pooler_type}'"
        )
    return out.reshape(B, M, C)


def region_negatives(key_map: torch.Tensor, kernel: int) -> torch.Tensor:
    """Region negatives from a key feature map: stride-1 ``kernel`` x ``kernel`` average pooling,
    L2-normalised over channels, every position of every image (positives' own locations included).

    Args:
        key_map: (B, D, H, W) key-view map (after the region head); treated as constant.
        kernel: average-pool kernel = window / stride (3 on C4/P4 and, as the released code, on P3).

    Returns:
        (B * (H - kernel + 1) * (W - kernel + 1), D) float32; rows image-major, then row-major
        positions.
        ReSim-C4 at batch 256, 224 px: 256 * 12 * 12 = 36,864 rows.
    """
    with torch.no_grad():
        pooled = F.avg_pool2d(key_map.detach().float(), kernel_size=kernel, stride=1)
        pooled = F.normalize(pooled, dim=1)
        D = pooled.shape[1]
        return pooled.permute(0, 2, 3, 1).reshape(-1, D)
