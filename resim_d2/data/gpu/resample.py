"""Crop-and-resize of every view of a batch on the device, with PIL's own bilinear filter.

``PIL.Image.resize(size, BILINEAR, box=crop)`` (the CPU path's ``render_view``) is separable:
output pixel ``u`` of an axis is a triangle filter of half-width ``f = max(1, crop / S)`` centred
on ``x0 + (u + 0.5) * crop / S``, over the input pixels inside the image, normalised. When
downscaling, ``f > 1`` widens the filter: that is PIL's antialiasing. :func:`resample_views`
computes exactly these weights on the device for every view and applies them as two batched
matrix products per group of similarly sized images, so the antialiasing is PIL's own filter, not
an approximation (no pre-downscale, no box filter). A horizontal flip is folded into the weights
(the output columns in reverse order).

The one difference: PIL rounds to 8 bit after its first pass (and Pillow 13 chooses the pass
order per call); this path keeps floats and rounds once. On identical decoded pixels a view
differs from ``render_view`` by at most 1 grey level per pixel (tests/test_gpu_views.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .transfer import to_device

__all__ = ["resample_views"]


def _support_range(lo: np.ndarray, hi: np.ndarray, in_size: np.ndarray, size: int):
    """First and one-past-last input pixel any output pixel of an axis reads (PIL's bounds)."""
    scale = (hi - lo) / size
    support = np.maximum(scale, 1.0)  # triangle of half-width max(1, scale)
    first = np.trunc(lo + 0.5 * scale - support + 0.5)  # (int)(center - support + 0.5)
    last = np.trunc(lo + (size - 0.5) * scale + support + 0.5)
    return np.maximum(first, 0).astype(np.int64), np.minimum(last, in_size).astype(np.int64)


def _axis_weights(
    lo: torch.Tensor,
    hi: torch.Tensor,
    start: torch.Tensor,
    in_size: torch.Tensor,
    length: int,
    size: int,
    mirror: torch.Tensor,
) -> torch.Tensor:
    """PIL's bilinear (triangle) resampling weights of one axis for n images x V views.

    Args:
        lo, hi: float64 (n, V) crop bounds on the axis, input pixels.
        start: float64 (n,) first input pixel of each image's region; ``length`` its padded size.
        in_size: float64 (n,) the image's extent on the axis (weights stop at its border).
        size: output pixels.
        mirror: bool (n, V): output pixels in reverse order (a horizontal flip of the view).

    Returns:
        float32 (n, V, size, length): row ``u`` holds the normalised weights of output pixel ``u``
        over region pixels ``start + 0 ... start + length - 1``.
    """
    dev = lo.device
    scale = (hi - lo) / size
    u = torch.arange(size, device=dev, dtype=torch.float64) + 0.5
    u = torch.where(mirror[..., None], size - u, u)  # mirrored: pixel u shows size-1-u
    centers = (lo - start[:, None])[..., None] + u * scale[..., None]  # (n, V, S), region coords
    fs = scale.clamp(min=1.0).float()[..., None, None]
    j = torch.arange(length, device=dev, dtype=torch.float32) + 0.5  # (L,)
    w = (1.0 - (j - centers.float()[..., None]).abs() / fs).clamp_(min=0.0)
    inside = (start[:, None] + j.double()) < in_size[:, None]  # (n, L): pixel inside the image
    w = w * inside[:, None, None, :]
    return w / w.sum(-1, keepdim=True).clamp_(min=1e-12)


def _groups(rh: np.ndarray, rw: np.ndarray, max_waste: float, max_elements: int) -> list:
    """Images in groups to pad to a common size: sorted by region size, a group grows while its
    padded area stays within ``max_waste`` times its images' own area and ``max_elements``."""
    order = np.lexsort((rw, rh))
    groups, current = [], []
    hb = wb = area = 0
    for i in order.tolist():
        h, w = int(rh[i]), int(rw[i])
        nh, nw = max(hb, h), max(wb, w)
        padded = (len(current) + 1) * nh * nw
        if current and (padded > max_waste * (area + h * w) or padded > max_elements):
            groups.append(current)
            current, hb, wb, area = [], 0, 0, 0
            nh, nw = h, w
        current.append(i)
        hb, wb, area = nh, nw, area + h * w
    if current:
        groups.append(current)
    return groups


def resample_views(
    images: Sequence[torch.Tensor],
    boxes: np.ndarray,
    size: int,
    mirror: np.ndarray | None = None,
    max_waste: float = 1.5,
    max_group_elements: int = 2**26,
) -> torch.Tensor:
    """Crop-and-resize of every view of every image, as PIL's ``resize(box=..., BILINEAR)``.

    Each image contributes the region its views read. Regions are sorted by size and grouped
    (:func:`_groups`), zero-padded to a common size per group, and each group is resampled with two
    batched matrix products: the horizontal pass for all views of an image at once, then the
    vertical pass per view.

    Args:
        images: B tensors (C, H_i, W_i) on one device, any dtype and strides (uint8 decoded
            images, views of them).
        boxes: float (B, V, 4) boxes ``(x0, y0, x1, y1)`` in each image's pixels (x1 > x0,
            y1 > y0; any real values inside the image, e.g. a mirrored crop).
        size: output side S.
        mirror: bool (B, V): reverse the output columns of that view (horizontal flip); optional.
        max_waste: padded area of a group over its images' own, at most (extra work vs. calls).
        max_group_elements: cap on the elements of one group's padded float32 input (memory).

    Returns:
        float32 (B, V, C, S, S), in the input's value range, not rounded.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    B, V = boxes.shape[:2]
    if len(images) != B:
        raise ValueError(f"{len(images)} images but boxes for {B}")
    if B == 0:
        raise ValueError("resample_views needs at least one image")
    device = images[0].device
    C = int(images[0].shape[0])
    mirror = np.zeros((B, V), dtype=bool) if mirror is None else np.asarray(mirror, dtype=bool)
    hw = np.array([(int(im.shape[-2]), int(im.shape[-1])) for im in images], dtype=np.int64)
    H, W = hw[:, 0], hw[:, 1]
    # the region of each image that any of its views reads (PIL's bounds), per axis
    x_first, x_last = _support_range(boxes[..., 0], boxes[..., 2], W[:, None], size)
    y_first, y_last = _support_range(boxes[..., 1], boxes[..., 3], H[:, None], size)
    x0, x1 = x_first.min(1), x_last.max(1)
    y0, y1 = y_first.min(1), y_last.max(1)
    rh, rw = y1 - y0, x1 - x0
    region = np.stack([y0, y1, x0, x1], 1).tolist()  # python ints, for slicing
    groups = _groups(rh, rw, max_waste, max(1, max_group_elements // C))
    order = np.concatenate(groups)  # images in group order: a group is a slice of the params
    # every per-image number the device needs, in group order, in one host->device copy
    params = np.concatenate(
        [
            boxes[order].reshape(B, V * 4),
            mirror[order].astype(np.float64),
            np.stack([x0, y0, W, H], 1)[order].astype(np.float64),
        ],
        1,
    )
    params = to_device(torch.from_numpy(params), device)
    box_d = params[:, : V * 4].view(B, V, 4)
    mirror_d = params[:, V * 4 : V * 5] > 0.5
    x0_d, y0_d, W_d, H_d = params[:, V * 5 :].unbind(1)

    out = torch.empty((B, V, C, size, size), dtype=torch.float32, device=device)
    start = 0
    for group in groups:
        n = len(group)
        sl = slice(start, start + n)
        start += n
        hb, wb = int(rh[group].max()), int(rw[group].max())
        x = torch.zeros((n, C, hb, wb), dtype=torch.float32, device=device)
        for k, i in enumerate(group):
            r0, r1, c0, c1 = region[i]
            x[k, :, : r1 - r0, : c1 - c0].copy_(images[i][:, r0:r1, c0:c1])
        no_mirror = torch.zeros_like(mirror_d[sl])
        wx = _axis_weights(
            box_d[sl, :, 0], box_d[sl, :, 2], x0_d[sl], W_d[sl], wb, size, mirror_d[sl]
        )  # (n, V, S, wb)
        wy = _axis_weights(
            box_d[sl, :, 1], box_d[sl, :, 3], y0_d[sl], H_d[sl], hb, size, no_mirror
        )  # (n, V, S, hb)
        # horizontal pass, all views of an image at once: (n, C*hb, wb) @ (n, wb, V*S)
        t = torch.bmm(x.view(n, C * hb, wb), wx.reshape(n, V * size, wb).transpose(1, 2))
        # -> (n*V, hb, C*S), then the vertical pass (n*V, S, hb) @ (n*V, hb, C*S)
        t = t.view(n, C, hb, V, size).permute(0, 3, 2, 1, 4).reshape(n * V, hb, C * size)
        r = torch.bmm(wy.reshape(n * V, size, hb), t)  # (n*V, S, C*S)
        out[sl] = r.view(n, V, size, C, size).permute(0, 1, 3, 2, 4)
    if (order == np.arange(B)).all():
        return out
    inverse = np.empty(B, dtype=np.int64)
    inverse[order] = np.arange(B)
    return out.index_select(0, to_device(torch.from_numpy(inverse), device))
