"""Geometry of ReSim's two views: crop sampling, the shared flip, the query->key map and windows.

Pure functions on NumPy arrays and Python numbers (no torch, no detectron2), so they are cheap to
call per image and easy to test on their own.

Conventions
-----------
* A box is ``(x0, y0, x1, y1)`` in continuous pixel coordinates: pixel ``(row i, column j)``
  covers ``[j, j + 1) x [i, i + 1)``. This is the convention of PIL's and torchvision's resize, so a
  view of side ``S`` made from the crop box ``(l, t, r, b)`` shows the original point
  ``x = l + u * (r - l) / S`` at view coordinate ``u`` (same for ``y``).
* Crop boxes live in original-image pixels *of the flipped frame* when the image is flipped: the
  flip is decided once per image and applied before cropping, so both views share it (paper §3.3).
* Query -> key map, per axis (paper §3.3, released code ``anchor_mapping``)::

      x_orig = w_q * x_q / S + l_q,      x_k = (x_orig - l_k) * S / w_k

  evaluated in float64 in exactly this order, as the released code does, so that a window whose
  mapped far edge lands on the view's edge is decided as the released code decides it.

* Windows: a ``w x w`` window slid with stride ``s`` over the query view. A window is used only
  where its mapped box lies inside the key view, i.e. inside the overlap of the two crops. Two
  placements:

  ``"grid"``     anchored at the query view's origin: positions ``0, s, 2s, ...`` with the window's
                 far edge strictly inside the view (released code: ``if x1 >= 224: continue``),
                 which gives 6 x 6 windows for 48/32 and 8 x 8 for 32/24 at ``S = 224``; a
                 window is valid exactly as in the released code: its key box has
                 ``x0 >= 0, y0 >= 0, x1 < S, y1 < S`` (far edges strictly inside the key view, no
                 tolerance; with integer crops about 1.6 in 10,000 windows map exactly onto it);
  ``"overlap"``  the same lattice started at the overlap's top-left corner in query-view pixels
                 (the paper's wording "slides a window across the overlapping area"), with the same
                 strict far-edge rule inside the overlap (decided in query-view pixels; the key box
                 is only checked against rounding there, since the overlap's corner maps onto the
                 key view's edge).

  Both give at most :func:`windows_per_axis` ``** 2`` windows, so outputs are padded to that fixed
  count ``M`` (row-major: window ``m`` is row ``m // n``, column ``m % n``) and batches stack.
"""

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "PLACEMENTS",
    "sample_crop_box",
    "sample_flip",
    "sample_view_pair",
    "flip_boxes",
    "view_to_image",
    "image_to_view",
    "map_boxes",
    "box_intersection",
    "windows_per_axis",
    "make_windows",
    "released_valid",
]

PLACEMENTS = ("grid", "overlap")

# "overlap" placement: mapped boxes may leave the key view by floating-point rounding only; this
# much (view pixels) is forgiven and clipped away. ("grid" follows the released code exactly.)
_INSIDE_TOL = 1e-4


def sample_crop_box(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    num_tries: int = 10,
) -> np.ndarray:
    """Sample a RandomResizedCrop box, following torchvision's ``RandomResizedCrop.get_params``.

    The area fraction is uniform in ``scale``, the aspect ratio (w / h) log-uniform in ``ratio``;
    width and height are rounded to integers. Up to ``num_tries`` draws must fit the image;
    otherwise the central crop with the aspect ratio clamped to ``ratio`` (the whole image if it
    already fits).

    Args:
        rng: the random generator.
        image_size: ``(height, width)`` of the image, pixels (>= 1 each).
        scale, ratio: ``(min, max)`` ranges.
        num_tries: draws before the fallback (torchvision: 10).

    Returns:
        float64 array (4,): the crop box ``(x0, y0, x1, y1)``, integer-valued, inside the image.
    """
    height, width = int(image_size[0]), int(image_size[1])
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {image_size}")
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(num_tries):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return np.array([left, top, left + w, top + h], dtype=np.float64)
    # Fallback to a central crop.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = max(1, min(height, int(round(w / min(ratio)))))
    elif in_ratio > max(ratio):
        h = height
        w = max(1, min(width, int(round(h * max(ratio)))))
    else:
        w, h = width, height
    top = (height - h) // 2
    left = (width - w) // 2
    return np.array([left, top, left + w, top + h], dtype=np.float64)


def sample_flip(rng: np.random.Generator, prob: float) -> bool:
    """One horizontal-flip decision (True with probability ``prob``), shared by both views."""
    return bool(prob > 0 and rng.random() < prob)


def sample_view_pair(
    rng: np.random.Generator, image_size: tuple[int, int], flip_prob: float = 0.5, **crop
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Sample the geometry of a query/key pair: one flip, then two independent crop boxes.

    ``crop``: ``scale``, ``ratio`` of :func:`sample_crop_box` (its defaults: MoCo-v2's).

    Returns:
        ``(crop_q, crop_k, flip)``: float64 (4,) boxes in original pixels of the flipped frame (when
        ``flip``), and the flip decision. Draw order: flip, crop_q, crop_k.
    """
    flip = sample_flip(rng, flip_prob)
    crop_q = sample_crop_box(rng, image_size, **crop)
    crop_k = sample_crop_box(rng, image_size, **crop)
    return crop_q, crop_k, flip


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Mirror boxes (..., 4) horizontally in a frame of the given width: ``x -> width - x``."""
    boxes = np.asarray(boxes, dtype=np.float64)
    out = boxes.copy()
    out[..., 0] = width - boxes[..., 2]
    out[..., 2] = width - boxes[..., 0]
    return out


def _size_offset(crop):
    crop = np.asarray(crop, dtype=np.float64)
    w, h = crop[2] - crop[0], crop[3] - crop[1]
    return np.array([w, h, w, h]), np.array([crop[0], crop[1], crop[0], crop[1]])


def view_to_image(boxes: np.ndarray, crop: np.ndarray, view_size: float) -> np.ndarray:
    """Boxes (..., 4) in view pixels -> original pixels, for a view (side view_size) of crop:
    ``size * x / S + offset`` (the released code's order of operations)."""
    size, offset = _size_offset(crop)
    return size * np.asarray(boxes, dtype=np.float64) / float(view_size) + offset


def image_to_view(boxes: np.ndarray, crop: np.ndarray, view_size: float) -> np.ndarray:
    """Boxes (..., 4) in original pixels -> view pixels, for a view (side view_size) of crop:
    ``(x - offset) * S / size`` (the released code's order of operations)."""
    size, offset = _size_offset(crop)
    return (np.asarray(boxes, dtype=np.float64) - offset) * float(view_size) / size


def map_boxes(
    boxes_q: np.ndarray, crop_q: np.ndarray, crop_k: np.ndarray, view_size: float
) -> np.ndarray:
    """Map boxes (..., 4) from query-view to key-view pixels (both views of side view_size)."""
    return image_to_view(view_to_image(boxes_q, crop_q, view_size), crop_k, view_size)


def box_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """Intersection of two boxes (4,), or None if it has no area."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.concatenate([np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])])
    if out[2] <= out[0] or out[3] <= out[1]:
        return None
    return out


def windows_per_axis(view_size: float, window: float, stride: float) -> int:
    """Window positions per axis of the query-view grid: ``#{i >= 0 : i*s + w < S}``.

    That is ``ceil((S - w) / s)`` (6 for 48/32 and 8 for 32/24 at S = 224, as the released code),
    and the padded window count per view pair is its square.
    """
    if stride <= 0 or window <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    if window >= view_size:
        return 0
    return int(math.ceil((view_size - window) / stride - 1e-9))


def _fit_count(start: float, end: float, window: float, stride: float, cap: int) -> int:
    """#{i >= 0 : start + i*stride + window < end}, at most ``cap``."""
    span = end - start - window
    if span <= 0:
        return 0
    return min(cap, int(math.ceil(span / stride - 1e-9)))


def released_valid(boxes_k: np.ndarray, view_size: float) -> np.ndarray:
    """The released code's test of a mapped key box (N, 4): near edges at or inside the view, far
    edges strictly inside (``x0 < 0 or y0 < 0 or x1 >= S or y1 >= S`` is rejected)."""
    return (
        (boxes_k[:, 0] >= 0)
        & (boxes_k[:, 1] >= 0)
        & (boxes_k[:, 2] < view_size)
        & (boxes_k[:, 3] < view_size)
    )


def _inside(boxes: np.ndarray, view_size: float) -> np.ndarray:
    tol = _INSIDE_TOL
    return (
        (boxes[:, 0] >= -tol)
        & (boxes[:, 1] >= -tol)
        & (boxes[:, 2] <= view_size + tol)
        & (boxes[:, 3] <= view_size + tol)
    )


def make_windows(
    crop_q: np.ndarray,
    crop_k: np.ndarray,
    view_size: float,
    window: float,
    stride: float,
    placement: str = "grid",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The matched windows of a view pair, padded to a fixed count.

    Args:
        crop_q, crop_k: (4,) crop boxes of the query and key views in original pixels (same frame).
        view_size: side ``S`` of both views, pixels.
        window, stride: window side and stride, query-view pixels.
        placement: ``"grid"`` or ``"overlap"`` (see the module docstring).

    Returns:
        ``(boxes_q, boxes_k, valid)`` with ``M = windows_per_axis(S, window, stride) ** 2``:
        boxes_q float32 (M, 4) in query-view pixels, boxes_k float32 (M, 4) the same windows in
        key-view pixels (clipped to the view against rounding), valid bool (M,). Rows that are not
        valid are all zeros in both box arrays. Zero valid rows is a legal result (no overlap).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    n = windows_per_axis(view_size, window, stride)
    steps = np.arange(n, dtype=np.float64) * stride
    cols = np.tile(steps, n)  # x offset of window m = (m % n) * stride
    rows = np.repeat(steps, n)  # y offset of window m = (m // n) * stride
    if placement == "grid":
        x0, y0 = cols, rows
        valid = np.ones(n * n, dtype=bool)
    else:
        overlap = box_intersection(crop_q, crop_k)
        if overlap is None:
            zeros = np.zeros((n * n, 4), dtype=np.float32)
            return zeros, zeros.copy(), np.zeros(n * n, dtype=bool)
        ov = np.clip(image_to_view(overlap, crop_q, view_size), 0.0, view_size)
        nx = _fit_count(ov[0], ov[2], window, stride, n)
        ny = _fit_count(ov[1], ov[3], window, stride, n)
        index = np.arange(n * n)
        valid = (index % n < nx) & (index // n < ny)
        x0, y0 = ov[0] + cols, ov[1] + rows
    boxes_q = np.stack([x0, y0, x0 + window, y0 + window], axis=1)
    boxes_k = map_boxes(boxes_q, crop_q, crop_k, view_size)
    if placement == "grid":  # query windows lie inside the query view by construction
        valid &= released_valid(boxes_k, view_size)
    else:
        valid &= _inside(boxes_k, view_size) & _inside(boxes_q, view_size)
    boxes_k = np.clip(boxes_k, 0.0, view_size)
    boxes_q[~valid] = 0.0
    boxes_k[~valid] = 0.0
    return boxes_q.astype(np.float32), boxes_k.astype(np.float32), valid
