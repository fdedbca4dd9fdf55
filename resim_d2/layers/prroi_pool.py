"""Precise RoI Pooling (PrRoIPool, IoU-Net, ECCV 2018) in pure PyTorch.

The feature map is made continuous by bilinear interpolation: ``F[c, i, j]`` is the value at the
integer point ``(x=j, y=i)`` and the map is zero outside its bounds, so

    f(x, y) = sum_{i, j} F[i, j] * k(y - i) * k(x - j),        k(s) = max(0, 1 - |s|).

Each output bin is the exact integral of ``f`` over the bin divided by the bin's area. With
``G(t) = int_{-inf}^{t} k(s) ds`` (0 for t <= -1, (t+1)^2/2 on [-1, 0], 1 - (1-t)^2/2 on [0, 1],
1 for t >= 1; in one formula ``G(t) = 1/2 + u - u|u|/2`` with ``u = clamp(t, -1, 1)``), the weight
of column ``j`` for a bin ``[x0, x1]`` is ``G(x1 - j) - G(x0 - j)`` and the bin's value is

    out[c, p, q] = sum_{i, j} Ky[p, i] * F[c, i, j] * Kx[q, j] / area,

i.e. ``Ky F Kx^T / area`` per channel. The op is therefore two small matrix products per box, is
differentiable in the features and in the box coordinates (autograd through the closed form), and
needs no sampling grid.

Implementation: the per-box weight matrices ``Ky (R, ph, H)`` and ``Kx (R, pw, W)`` are built in
one vectorised pass, the boxes are grouped by image into a padded ``(N, Rmax, ...)`` layout (no copy
of the feature map per box is ever made: no ``R x C x H x W`` tensor), and the contraction with the
feature map of each image is one or two batched matrix products (``torch.bmm`` over the N images):

* ``"outer"``: ``W[r] = Ky[r] (x) Kx[r]`` of shape ``(ph*pw, H*W)``; one ``bmm`` per batch. Cheapest
  when ``ph * pw`` is small (ReSim's 1x1 output).
* ``"sep_h"`` / ``"sep_w"``: contract rows (columns) first, then the other axis; cheaper for larger
  outputs (detectron2's 7x7 / 14x14 heads).

The cheapest is picked from the FLOP count. Large problems are processed in chunks of box slots,
with activation checkpointing per chunk when gradients are needed, so memory stays bounded.

Coordinate convention (the original op's): boxes ``(batch_index, x0, y0, x1, y1)`` in input pixels
are multiplied by ``spatial_scale`` with no half-pixel offset; ``aligned=True`` subtracts 0.5 after
scaling (the convention of ``roi_align(aligned=True)``). Boxes with ``x1 < x0`` or ``y1 < y0`` are
treated as empty, like the original op; empty bins give 0 and zero gradient.

The only host-device synchronisation is the check of the boxes' image layout (one when the boxes are
sorted by image with the same number per image, as ReSim's are; two otherwise).

Precision: the per-box weights are computed in float64 (bin edges keep full precision however small
the bins), the contraction with the features in float32 or float64: float32 and float64 features in
their own dtype; float16 / bfloat16 features in float32 (autocast is disabled inside the op), the
result cast back to the input dtype. The contraction uses ``torch.bmm`` and so follows
``torch.backends.cuda.matmul.allow_tf32`` on CUDA (off by default). All operations are
deterministic.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .prroi_weights_triton import bin_weights_triton, triton_available

__all__ = ["prroi_pool", "PrRoIPool"]

# Upper bound on the elements of the largest intermediate of one chunk (about 128 MiB in float32).
_CHUNK_ELEMENTS = 1 << 25
_METHODS = ("auto", "outer", "sep_h", "sep_w")


def _pair(output_size) -> tuple[int, int]:
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        size = (output_size, output_size)
    elif isinstance(output_size, Sequence) and len(output_size) == 2:
        size = tuple(output_size)
    else:
        raise ValueError(
            f"prroi_pool: output_size must be an int or a pair (ph, pw), got {output_size!r}"
        )
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"prroi_pool: output_size must hold positive ints, got {output_size!r}")
    return size  # type: ignore[return-value]


def _boxes_from_list(boxes: Sequence[Tensor]) -> Tensor:
    """``[(R_i, 4), ...]`` per image -> ``(sum R_i, 5)`` with the image index in column 0."""
    rows = []
    for n, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"prroi_pool: boxes[{n}] must be a (R_{n}, 4) tensor, got {shape}")
        rows.append(torch.cat([b.new_full((b.shape[0], 1), n), b], dim=1))
    if not rows:
        raise ValueError("prroi_pool: boxes is an empty list; pass a (0, 5) tensor instead")
    return torch.cat(rows, dim=0)


def _check_inputs(features, boxes) -> Tensor:
    if not isinstance(features, Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"prroi_pool: features must be a (N, C, H, W) tensor, got {shape}")
    if not features.is_floating_point():
        raise TypeError(f"prroi_pool: features must be floating point, got {features.dtype}")
    if isinstance(boxes, (list, tuple)):
        boxes = _boxes_from_list(boxes)
    per_image = isinstance(boxes, Tensor) and boxes.dim() == 3 and boxes.shape[2] == 4
    if per_image and boxes.shape[0] != features.shape[0]:
        raise ValueError(
            f"prroi_pool: boxes of shape (N, M, 4) = {tuple(boxes.shape)} need N = "
            f"{features.shape[0]} (the images of features)"
        )
    if not per_image and (not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 5):
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(
            f"prroi_pool: boxes must be a (R, 5) tensor of (batch_index, x0, y0, x1, y1) or a "
            f"(N, M, 4) tensor of (x0, y0, x1, y1), got {shape}"
        )
    if not boxes.is_floating_point():
        raise TypeError(f"prroi_pool: boxes must be floating point, got {boxes.dtype}")
    if boxes.device != features.device:
        raise ValueError(
            f"prroi_pool: boxes are on {boxes.device} but features are on {features.device}"
        )
    return boxes


# Small constant tensors (bin fractions, grid positions), cached per device so that a call launches
# no arange/copy for them; a handful of entries in practice (one per output size and map size).
_CONSTANTS: dict = {}
_CONSTANTS_MAX = 64


def _constants(ph: int, pw: int, L: int, dtype: torch.dtype, device: torch.device):
    """frac (2, q+1) = k / (pw, ph), bins (2, 1, 1) = (pw, ph), grid (L,) = 0 .. L-1, all in
    ``dtype`` on ``device``."""
    key = (ph, pw, L, dtype, device)
    hit = _CONSTANTS.get(key)
    if hit is None:
        q = max(ph, pw)
        k = torch.arange(q + 1, dtype=torch.float64)
        frac = torch.stack([k / pw, k / ph]).to(device=device, dtype=dtype)
        bins = torch.tensor([pw, ph], dtype=dtype).view(2, 1, 1).to(device)
        grid = torch.arange(L, dtype=dtype).to(device)
        if len(_CONSTANTS) >= _CONSTANTS_MAX:
            _CONSTANTS.clear()
        hit = _CONSTANTS[key] = (frac, bins, grid)
    return hit


def _bin_weights(coords: Tensor, ph: int, pw: int, H: int, W: int):
    """Per-box integration weights, already divided by the bin size.

    Args:
        coords: (R, 4) scaled boxes (x0, y0, x1, y1) in feature-map units, compute dtype.

    Returns:
        (R, 2, q, L) weights, q = max(ph, pw), L = max(H, W): ``[:, 1, :ph, :H]`` is Ky (R, ph, H)
        and ``[:, 0, :pw, :W]`` is Kx (R, pw, W), with ``Ky[r] F Kx[r]^T`` = the bin averages; all
        zero for a box with an empty bin (zero or negative width or height).

    Written with few operations (about a dozen kernels for any output size): on a GPU the op's
    cost is dominated by the number of launches, not by arithmetic.
    """
    R = coords.shape[0]
    frac, bins, grid = _constants(ph, pw, max(H, W), coords.dtype, coords.device)
    c = coords.view(R, 2, 2)  # [:, 0] = (x0, y0), [:, 1] = (x1, y1)
    start, end = c[:, 0, :, None], c[:, 1, :, None]  # (R, 2, 1)
    edges = torch.lerp(start, end, frac)  # (R, 2, q+1) bin edges along x and y
    size = (end - start)[..., None]  # (R, 2, 1, 1) box width, height
    # bins per box side / box side for non-empty boxes, 0 otherwise (1 / inf): finite zero grads.
    inv = torch.where(size > 0, size, math.inf).reciprocal_() * bins
    u = (edges[..., None] - grid).clamp_(-1.0, 1.0)  # (R, 2, q+1, L)
    g = torch.addcmul(u, u, u.abs(), value=-0.5)  # G(t) - 1/2
    weights = (g[:, :, 1:] - g[:, :, :-1]) * inv  # (R, 2, q, L)
    return weights


def _choose_method(ph: int, pw: int, H: int, W: int) -> str:
    """The contraction with the fewest multiply-adds per (box, channel); ties go to 'outer'."""
    cost = {
        "outer": ph * pw * H * W,
        "sep_h": ph * H * W + ph * pw * W,
        "sep_w": pw * H * W + ph * pw * H,
    }
    return min(cost, key=lambda m: (cost[m], m != "outer"))


def _group_by_image(batch_index: Tensor, N: int):
    """Slots of the boxes in a padded (N, Rmax) layout.

    Returns:
        (Rmax, pos): ``pos`` (R,) int64 is ``image * Rmax + rank of the box among its image's
        boxes``, or None when the boxes are already in that layout (sorted by image, Rmax each).
    """
    R = batch_index.numel()
    if R == 0:
        return 0, None
    if N == 0:
        raise ValueError("prroi_pool: features has N = 0 images but boxes is not empty")
    if R % N == 0:  # the common layout: sorted by image, R / N boxes each (one sync)
        regular = torch.arange(R, device=batch_index.device).div_(R // N, rounding_mode="floor")
        if torch.equal(batch_index, regular):
            return R // N, None
    counts = torch.bincount(batch_index.clamp(0, N - 1), minlength=N)
    in_order = (batch_index[1:] >= batch_index[:-1]).all()
    lo, hi, rmax, ordered = torch.stack(
        [batch_index.min(), batch_index.max(), counts.max(), in_order.long()]
    ).tolist()
    if lo < 0 or hi >= N:
        raise ValueError(
            f"prroi_pool: boxes[:, 0] (batch index) must lie in [0, {N - 1}] for features with "
            f"N = {N}, got values in [{lo}, {hi}]"
        )
    starts = counts.cumsum(0) - counts
    if ordered:
        idx, order = batch_index, None
    else:
        order = torch.argsort(batch_index, stable=True)
        idx = batch_index[order]
    pos = idx * rmax + torch.arange(R, device=idx.device) - starts[idx]
    if order is not None:
        pos = torch.empty_like(pos).index_copy_(0, order, pos)
    return rmax, pos


def _pad(x: Tensor, N: int, rmax: int, pos: Tensor | None) -> Tensor:
    """(R, ...) -> (N, Rmax, ...), zeros in the unused slots."""
    if pos is not None:
        x = x.new_zeros((N * rmax,) + x.shape[1:]).index_copy(0, pos, x)
    return x.reshape((N, rmax) + x.shape[1:])


def _unpad(x: Tensor, pos: Tensor | None) -> Tensor:
    """(N, Rmax, ...) -> (R, ...)."""
    x = x.flatten(0, 1)
    return x if pos is None else x.index_select(0, pos)


def _contract_outer(feat: Tensor, ky: Tensor, kx: Tensor) -> Tensor:
    """feat (N, C, H, W), ky (N, S, ph, H), kx (N, S, pw, W) -> (N, S, C, ph, pw)."""
    N, C, H, W = feat.shape
    S, ph, pw = ky.shape[1], ky.shape[2], kx.shape[2]
    w = (ky[:, :, :, None, :, None] * kx[:, :, None, :, None, :]).reshape(N, S * ph * pw, H * W)
    out = torch.bmm(w, feat.reshape(N, C, H * W).transpose(1, 2))  # (N, S*ph*pw, C)
    return out.reshape(N, S, ph * pw, C).transpose(2, 3).reshape(N, S, C, ph, pw)


def _contract_sep_h(feat_hcw: Tensor, ky: Tensor, kx: Tensor) -> Tensor:
    """feat_hcw (N, H, C, W), ky (N, S, ph, H), kx (N, S, pw, W) -> (N, S, C, ph, pw)."""
    N, H, C, W = feat_hcw.shape
    S, ph, pw = ky.shape[1], ky.shape[2], kx.shape[2]
    t = torch.bmm(ky.reshape(N, S * ph, H), feat_hcw.reshape(N, H, C * W))  # (N, S*ph, C*W)
    out = torch.bmm(t.reshape(N * S, ph * C, W), kx.reshape(N * S, pw, W).transpose(1, 2))
    return out.reshape(N, S, ph, C, pw).transpose(2, 3)


def _contract(feat: Tensor, ky: Tensor, kx: Tensor, method: str) -> Tensor:
    """Bin averages of padded boxes. feat (N, C, H, W); ky (N, Rmax, ph, H); kx (N, Rmax, pw, W).

    Returns (N, Rmax, C, ph, pw).
    """
    N, C, H, W = feat.shape
    rmax, ph, pw = ky.shape[1], ky.shape[2], kx.shape[2]
    if method == "outer":
        fn, feat_in, a, b, per_slot = _contract_outer, feat, ky, kx, ph * pw * (H * W + C)
    elif method == "sep_h":  # one (N, H, C, W) copy of the map, shared by all chunks
        fn, feat_in, a, b = _contract_sep_h, feat.transpose(1, 2).contiguous(), ky, kx
        per_slot = ph * C * W + ph * pw * C
    else:  # sep_w: the same with the axes swapped, (N, W, C, H)
        fn, feat_in, a, b = _contract_sep_h, feat.permute(0, 3, 1, 2).contiguous(), kx, ky
        per_slot = pw * C * H + ph * pw * C
    chunk = max(1, _CHUNK_ELEMENTS // max(1, N * per_slot))
    if rmax <= chunk:
        out = fn(feat_in, a, b)
    else:
        needs_grad = torch.is_grad_enabled() and (
            feat_in.requires_grad or a.requires_grad or b.requires_grad
        )
        parts = []
        for s in range(0, rmax, chunk):
            args = (feat_in, a[:, s : s + chunk], b[:, s : s + chunk])
            if needs_grad:  # recompute the large intermediate in backward instead of keeping it
                parts.append(checkpoint(fn, *args, use_reentrant=False))
            else:
                parts.append(fn(*args))
        out = torch.cat(parts, dim=1)
    return out if method != "sep_w" else out.transpose(3, 4)


def _no_autocast(device: torch.device):
    """Autocast off on ``device`` inside the op (a no-op context when it is not on)."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError, TypeError):  # a device type autocast does not know
        return contextlib.nullcontext()


def prroi_pool(
    features: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    aligned: bool = False,
    method: str = "auto",
    boxes_per_image: int | None = None,
) -> Tensor:
    """Precise RoI Pooling: the exact average of the bilinearly interpolated map over each bin.

    Args:
        features: (N, C, H, W) feature maps, float16 / bfloat16 / float32 / float64.
        boxes: (R, 5) tensor of ``(batch_index, x0, y0, x1, y1)`` in input-image pixels, or a list
            of N tensors (R_n, 4) of ``(x0, y0, x1, y1)`` (as in torchvision's ``roi_align``), or
            a (N, M, 4) tensor: M boxes ``(x0, y0, x1, y1)`` on each image (R = N * M, image-major;
            no layout check and no host-device synchronisation, the fastest form on a GPU).
            Any floating dtype; gradients flow to the coordinates.
        output_size: ``ph`` = ``pw`` (int) or ``(ph, pw)``.
        spatial_scale: multiplies the box coordinates (1/stride of the map), e.g. 1/16.
        aligned: if True, subtract 0.5 from the scaled coordinates (pixel-centre convention); the
            default False is the original PrRoIPool convention.
        method: ``"auto"`` (default), or force one contraction: ``"outer"``, ``"sep_h"``,
            ``"sep_w"`` (all give the same result; for tests and benchmarks).
        boxes_per_image: optional promise that the boxes are sorted by image with exactly this many
            per image (``R == N * boxes_per_image``). The layout is then not checked, which removes
            the op's only host-device synchronisation (for CUDA graphs / ``torch.compile``
            ``fullgraph``). A wrong promise gives wrong results.

    Returns:
        (R, C, ph, pw) tensor in the dtype of ``features``; box r pools image ``boxes[r, 0]``
        (for (N, M, 4) boxes, row ``n * M + m`` is box m of image n).
        Bins of zero area give 0 (and zero gradient).
    """
    boxes = _check_inputs(features, boxes)
    ph, pw = _pair(output_size)
    spatial_scale = float(spatial_scale)
    if not (math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"prroi_pool: spatial_scale must be positive, got {spatial_scale}")
    if method not in _METHODS:
        raise ValueError(f"prroi_pool: method must be one of {_METHODS}, got {method!r}")
    N, C, H, W = features.shape
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32

    with _no_autocast(features.device):
        feat = features if features.dtype == dtype else features.to(dtype)
        # The weights are built in float64 (they are small: (R, 2, q, max(H, W))) so that the bin
        # edges of small bins lose no precision, then cast to the dtype of the contraction.
        wdtype = torch.float32 if features.device.type == "mps" else torch.float64
        if boxes.dim() == 3:  # (N, M, 4): the layout is the shape
            if boxes_per_image not in (None, boxes.shape[1]):
                raise ValueError(
                    f"prroi_pool: boxes_per_image={boxes_per_image} contradicts boxes of shape "
                    f"{tuple(boxes.shape)}"
                )
            rmax, pos = boxes.shape[1], None
            boxes = boxes.reshape(-1, 4)
        elif boxes_per_image is None:
            rmax, pos = _group_by_image(boxes[:, 0].to(torch.int64), N)
        elif boxes.shape[0] == N * boxes_per_image and boxes_per_image >= 0:
            rmax, pos = boxes_per_image, None
        else:
            raise ValueError(
                f"prroi_pool: boxes_per_image={boxes_per_image} with N = {N} images needs "
                f"R = {N * boxes_per_image} boxes, got boxes of shape {tuple(boxes.shape)}"
            )
        first = boxes.shape[1] - 4  # column of x0: 1 for (R, 5) rows, 0 for (R, 4)
        box_grad = boxes.requires_grad and torch.is_grad_enabled()
        if (
            not box_grad
            and wdtype == torch.float64
            and triton_available(features.device, (ph, pw, H, W))
        ):
            # one fused kernel instead of ~15 small ones (same float64 arithmetic)
            weights = bin_weights_triton(boxes, ph, pw, H, W, spatial_scale, aligned, dtype)
        else:
            coords = boxes[:, first:].to(wdtype) * spatial_scale
            if aligned:
                coords = coords - 0.5
            weights = _bin_weights(coords, ph, pw, H, W).to(dtype)
        ky, kx = weights[:, 1, :ph, :H], weights[:, 0, :pw, :W]
        if method == "auto":
            method = _choose_method(ph, pw, H, W)
        R, P = boxes.shape[0], ph * pw
        if pos is None and method == "outer" and rmax * P * (H * W + C) <= _CHUNK_ELEMENTS:
            # The common case (boxes sorted by image, as many per image, e.g. ReSim's windows):
            # one outer product and one bmm, no padding and no intermediate copies.
            w = (ky[:, :, None, :, None] * kx[:, None, :, None, :]).view(N, rmax * P, H * W)
            out = torch.bmm(w, feat.reshape(N, C, H * W).transpose(1, 2))  # (N, rmax*P, C)
            if P == 1:
                out = out.view(R, C, 1, 1)
            else:
                out = out.view(R, P, C).transpose(1, 2).reshape(R, C, ph, pw)
        else:
            out = _contract(feat, _pad(ky, N, rmax, pos), _pad(kx, N, rmax, pos), method)
            out = _unpad(out, pos).contiguous()
    return out if out.dtype == features.dtype else out.to(features.dtype)


class PrRoIPool(nn.Module):
    """Module form of :func:`prroi_pool`.

    ``forward(features, boxes, boxes_per_image=None)``: features (N, C, H, W), boxes (R, 5)
    ``(batch_index, x0, y0, x1, y1)`` or a list of (R_n, 4) -> (R, C, ph, pw).
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        aligned: bool = False,
    ):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.aligned = bool(aligned)

    def forward(
        self,
        features: Tensor,
        boxes: Tensor | Sequence[Tensor],
        boxes_per_image: int | None = None,
    ) -> Tensor:
        return prroi_pool(
            features,
            boxes,
            self.output_size,
            self.spatial_scale,
            self.aligned,
            boxes_per_image=boxes_per_image,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"aligned={self.aligned}"
        )
