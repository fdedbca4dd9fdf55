"""ReSim's two views for a whole batch at once, on the device (a GPU; the CPU in CI).

The CPU path (:class:`~resim_d2.data.two_view_mapper.TwoViewMapper`) renders every view in a
dataloader worker with PIL. In this path the workers only read the files and draw the random
parameters (:mod:`resim_d2.data.gpu_loader`); :class:`GPUViews` turns the packed batch into the
same ``list[dict]`` the CPU path yields, with every pixel operation batched on the device.

Parameters (host)
    :class:`ViewParamSampler` draws, per image, with the generator of its stream position and in the
    CPU path's order: ``sample_view_pair`` (flip, crop_q, crop_k), then MoCo-v2's colour parameters
    of the query view and of the key view (:func:`sample_color_params`, the exact draws of
    :class:`~resim_d2.data.color_augment.MoCoV2ColorAugment`), then ``make_windows``. So for a
    given ``(seed, position)`` crops, flip, colour parameters and windows are *identical* to the
    CPU path's; only the pixel arithmetic differs.
Decode
    ``torchvision.io.decode_jpeg`` on the batch's list of JPEG byte tensors with the device as
    ``device`` (nvJPEG; the hardware decoder on A100/H100/H200 for baseline JPEGs), then the EXIF
    orientation with flips/transposes (:func:`apply_exif_orientation`). Files nvJPEG cannot take
    (PNG and other formats, CMYK JPEGs, JPEGs without an end marker) arrive already decoded by the
    workers with :func:`~resim_d2.data.image_io.load_rgb_image`, as in the CPU path; with
    ``decode="worker"`` (the default on a CPU device) all of them do.
Crop and resize
    ``PIL.Image.resize(size, BILINEAR, box=crop)`` (``render_view``) is separable: output pixel
    ``u`` of an axis is a triangle filter of half-width ``f = max(1, crop / S)`` centred on
    ``x0 + (u + 0.5) * crop / S``, over the input pixels inside the image, normalised. When
    downscaling, ``f > 1`` widens the filter: that is PIL's antialiasing. :func:`resample_views`
    computes exactly these weights on the device for every view and applies them as two batched
    matrix products per group of similarly sized images, so the antialiasing is PIL's own filter,
    not an approximation (no pre-downscale, no box filter). The one difference: PIL rounds to 8 bit
    after its first pass (and Pillow 13 chooses the pass order per call), this path keeps floats
    and rounds once. On identical decoded pixels a view differs from ``render_view`` by at most 1
    grey level per pixel (tested: max 1, mean < 0.3). nvJPEG decodes slightly differently from
    libjpeg-turbo (PIL), mostly its chroma upsampling, so on a GPU the views differ a little more
    at sharp colour edges (docs/benchmarks.md has the measured differences).
Flip
    folded into the resampling weights (the output columns in reverse order): free.
Colour
    :func:`color_augment_views`: brightness, contrast, saturation and hue in each view's own random
    order with its own factors, grayscale, Gaussian blur with each view's sigma, with the semantics
    of ``torchvision.transforms.v2.functional`` on float images in [0, 1] (tested against it, per
    view); each op runs once per group of views that apply it at that position of their order. The
    CPU path uses PIL (``ImageEnhance``, ``ImageFilter.GaussianBlur``), whose integer rounding and
    three-box approximation of the Gaussian differ slightly; the distributions match (tested).
    Blur: separable Gaussian of ``blur_kernel_size`` taps with reflect padding, as torchvision's
    ``gaussian_blur``; the default is the odd number nearest ``0.1 * S`` (23 at S = 224, the
    kernel of torchvision's MoCo/BYOL recipes), at least ``2 * ceil(3 * max sigma) + 1``.
Output
    ``"image_q"``/``"image_k"``: uint8 (3, S, S) on the device (views of one (B, 2, 3, S, S)
    tensor), so :meth:`ReSim._images` only stacks and normalises them; the window tensors on the
    device too (views of one (B, M, 4) / (B, M) tensor per feature and key; ``ReSim._windows``
    stacks them there); crops and the rest as :class:`TwoViewMapper` gives them.
Not like the CPU path
    Colour ops at equal parameters differ from PIL's by about 1.2 grey levels on average (PIL's
    8-bit HSV and enhance rounding, its blur approximation). A JPEG whose header and end marker are
    intact but whose scan data is corrupt is refused by PIL and skipped, while nvJPEG's hardware
    decoder may return an image of garbage without an error (with ``decode="worker"`` it is
    skipped as in the CPU path; torchvision's CPU decoder refuses it, and it is then replaced).
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .color_augment import (  # noqa: F401  (NUM_COLOR_PARAMS, sample_color_params re-exported)
    _NEUTRAL,
    NUM_COLOR_PARAMS,
    P_BLUR,
    P_BRIGHTNESS,
    P_GRAY,
    P_HUE,
    P_JITTER,
    P_ORDER,
    P_SIGMA,
    sample_color_params,
)
from .image_io import ImageLoadError, load_rgb_image
from .view_params import ViewParamSampler  # noqa: F401  (re-exported)

__all__ = [
    "NUM_COLOR_PARAMS",
    "sample_color_params",
    "ViewParamSampler",
    "apply_exif_orientation",
    "device_decodes_jpeg",
    "resample_views",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "gaussian_blur",
    "color_augment_views",
    "default_blur_kernel_size",
    "GPUViews",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- decode
def apply_exif_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Make an image (..., H, W) upright from its EXIF orientation (1-8), as PIL's exif_transpose.

    Orientation 5-8 swap height and width. Returns a view where possible (1, 5), else a copy.
    """
    o = int(orientation)
    if o == 2:  # FLIP_LEFT_RIGHT
        return image.flip(-1)
    if o == 3:  # ROTATE_180
        return image.flip(-2, -1)
    if o == 4:  # FLIP_TOP_BOTTOM
        return image.flip(-2)
    if o == 5:  # TRANSPOSE
        return image.transpose(-2, -1)
    if o == 6:  # ROTATE_270 (a quarter turn clockwise)
        return image.transpose(-2, -1).flip(-1)
    if o == 7:  # TRANSVERSE
        return image.transpose(-2, -1).flip(-2, -1)
    if o == 8:  # ROTATE_90 (a quarter turn counter-clockwise)
        return image.transpose(-2, -1).flip(-2)
    return image


@functools.cache
def _tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 90)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, (list, tuple)) else [out]


@functools.cache
def device_decodes_jpeg(device: str) -> bool:
    """Whether ``torchvision.io.decode_jpeg(..., device=device)`` works here (nvJPEG on CUDA)."""
    try:
        data = torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8)
        (img,) = _decode_jpegs([data], torch.device(device))
        return tuple(img.shape) == (3, 8, 16)
    except Exception as e:  # noqa: BLE001  no nvJPEG in this torchvision build, no device, ...
        logger.info("JPEG decoding on %s is not available (%s: %s)", device, type(e).__name__, e)
        return False


# ----------------------------------------------------------------------------- crop and resize
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
    params = _to_device(torch.from_numpy(params), device)
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
    return out.index_select(0, _to_device(torch.from_numpy(inverse), device))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``; from pinned memory, asynchronously, on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ----------------------------------------------------------------------------- colour
# torchvision.transforms.v2.functional semantics on float images in [0, 1], with one factor per
# image: x (n, 3, H, W), factor (n,) on the device.
def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W): 0.2989 R + 0.587 G + 0.114 B (torchvision's weights)."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (x * f).add_(other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_grayscale(x), factor)


def _rgb_to_hsv(x: torch.Tensor):
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    ones = torch.ones_like(maxc)
    chroma = maxc - minc
    s = chroma / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    h = (bc - gc) * is_r + (2.0 + rc - bc) * is_g + (4.0 + gc - rc) * is_b
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


_HSV_SELECT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))  # rgb from (v, p, q, t)


@functools.cache
def _hsv_select(device: torch.device) -> torch.Tensor:
    return torch.tensor(_HSV_SELECT, device=device)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder_(6)
    p = (v * (1.0 - s)).clamp_(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp_(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), 1)  # (n, 4, H, W)
    select = _hsv_select(h.device)[:, i]  # (3, n, H, W)
    return vpqt.gather(1, select.permute(1, 0, 2, 3))


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Shift the hue by ``factor`` turns (per image, in [-0.5, 0.5]) through HSV, as torchvision."""
    h, s, v = _rgb_to_hsv(x)
    h = (h + factor.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(h, s, v)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, reflect padding (torchvision's kernel).

    Args:
        x: float (n, C, H, W); sigma: (n,) > 0; kernel_size: odd, at most ``2 * min(H, W) - 1``.
    """
    n, C, H, W = x.shape
    k, pad = int(kernel_size), int(kernel_size) // 2
    t = torch.arange(k, device=x.device, dtype=torch.float32) - (k - 1) / 2.0
    kernel = torch.exp(-0.5 * (t / sigma.float().view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (n*C, k)
    y = F.pad(x.reshape(1, n * C, H, W), (pad, pad, 0, 0), mode="reflect")
    y = F.conv2d(y, kernel.view(n * C, 1, 1, k), groups=n * C)
    y = F.pad(y, (0, 0, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(n * C, 1, k, 1), groups=n * C)
    return y.view(n, C, H, W)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def default_blur_kernel_size(view_size: int, max_sigma: float) -> int:
    """The odd number nearest ``0.1 * view_size`` (23 at 224), at least ``2*ceil(3*sigma)+1``."""
    k = int(0.1 * view_size)
    k = max(k + 1 - k % 2, 2 * math.ceil(3 * max_sigma) + 1, 3)
    return min(k, 2 * view_size - 1 - (2 * view_size - 1) % 2)


def color_augment_views(x: torch.Tensor, params: np.ndarray, blur_kernel_size: int) -> torch.Tensor:
    """MoCo-v2's colour augmentation of a batch of views with per-view parameters, in place.

    Args:
        x: float32 (N, 3, S, S) in [0, 1], on the device.
        params: float64 (N, NUM_COLOR_PARAMS) from :func:`sample_color_params`.
        blur_kernel_size: taps of the Gaussian blur (odd).

    Returns:
        ``x``, augmented: for each view, if jittered, its four ops in its order (an op with a
        neutral factor is skipped), then grayscale, then blur, as MoCoV2ColorAugment.
    """
    params = np.asarray(params, dtype=np.float64)
    jitter = params[:, P_JITTER] > 0.5
    order = params[:, P_ORDER : P_ORDER + 4].astype(np.int64)
    active = jitter[:, None] & (params[:, P_BRIGHTNESS : P_HUE + 1] != _NEUTRAL)  # (N, 4)
    groups, ops = [], []  # views applying op at each position of their order, then gray, blur
    for slot in range(4):
        for op in range(4):
            sel = np.flatnonzero(active[:, op] & (order[:, slot] == op))
            if sel.size:
                groups.append(sel)
                ops.append(op)
    for col in (P_GRAY, P_BLUR):
        sel = np.flatnonzero(params[:, col] > 0.5)
        if sel.size:
            groups.append(sel)
            ops.append(col)
    if not groups:
        return x
    sizes = [len(g) for g in groups]
    factors = [
        params[g, P_BRIGHTNESS + op] if op < 4 else params[g, P_SIGMA] if op == P_BLUR else 0 * g
        for g, op in zip(groups, ops)
    ]  # jitter factor, or the blur's sigma
    host = np.stack([np.concatenate(groups), np.concatenate(factors)], 1)
    packed = _to_device(torch.from_numpy(host.astype(np.float64)), x.device)  # one copy
    index = packed[:, 0].long().split(sizes)
    factor = packed[:, 1].float().split(sizes)
    for op, idx, f in zip(ops, index, factor):
        v = x.index_select(0, idx)
        if op < 4:
            v = _JITTER_OPS[op](v, f)
        elif op == P_GRAY:
            v = rgb_to_grayscale(v).expand(-1, 3, -1, -1)
        else:
            v = gaussian_blur(v, f, blur_kernel_size)
        x.index_copy_(0, idx, v)
    return x


# ----------------------------------------------------------------------------- the batch
class GPUViews:
    """The device half of the GPU view path: a packed batch -> ``list[dict]`` as TwoViewMapper's.

    Input: the dict :class:`~resim_d2.data.gpu_loader.GPUViewsCollator` builds in the workers
    (file bytes or worker-decoded pixels, upright image sizes, EXIF orientations, crops, flips,
    colour parameters, windows, names). Output: one dict per image with the keys of
    :class:`TwoViewMapper`'s output (``"image_q"``/``"image_k"`` uint8 (3, S, S) and the window
    tensors on ``device``) plus ``"stream_position"``.

    A JPEG that fails to decode on the device is decoded on the host (PIL); one that fails there
    too is replaced by the next image of the batch with parameters redrawn from
    ``(seed, 2, position)`` (``param_sampler``) and counted in ``"num_skipped"``.
    """

    def __init__(
        self,
        *,
        view_size: int,
        device: torch.device | str,
        blur_kernel_size: int = 0,
        max_sigma: float = 2.0,
        param_sampler: ViewParamSampler | None = None,
        seed: int = 0,
        max_group_elements: int = 2**26,
    ):
        """
        Args:
            view_size: side S of the views.
            device: where decoding and augmentation run.
            blur_kernel_size: taps of the blur; 0 picks :func:`default_blur_kernel_size`.
            max_sigma: the largest blur sigma (for the default kernel size).
            param_sampler: redraws the parameters of a replaced image (None: copy the substitute's).
            seed: stream seed, for replacement draws.
            max_group_elements: memory cap of one resampling group (see :func:`resample_views`).
        """
        self.view_size = int(view_size)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.blur_kernel_size = int(blur_kernel_size) or default_blur_kernel_size(
            self.view_size, max_sigma
        )
        if self.blur_kernel_size % 2 == 0:
            raise ValueError(f"the blur kernel size must be odd, got {self.blur_kernel_size}")
        self.param_sampler = param_sampler
        self.seed = int(seed)
        self.max_group_elements = int(max_group_elements)
        self.num_replaced = 0

    @classmethod
    def from_config(cls, cfg, device=None, param_sampler=None, seed=0) -> GPUViews:
        g = cfg.RESIM.GPU_VIEWS
        return cls(
            view_size=cfg.RESIM.VIEWS.SIZE,
            device=device if device is not None else cfg.MODEL.DEVICE,
            blur_kernel_size=g.BLUR_KERNEL_SIZE,
            max_sigma=max(cfg.RESIM.VIEWS.BLUR_SIGMA),
            param_sampler=param_sampler,
            seed=seed,
            max_group_elements=g.MAX_GROUP_ELEMENTS,
        )

    def __repr__(self):
        return (
            f"{type(self).__name__}(view_size={self.view_size}, device={self.device}, "
            f"blur_kernel_size={self.blur_kernel_size})"
        )

    # ------------------------------------------------------------------ decode
    def decode(self, packed: dict) -> tuple[list[torch.Tensor | None], list[int]]:
        """Upright (3, H, W) uint8 images on the device; indices of images that failed."""
        B = len(packed["file_names"])
        images: list[torch.Tensor | None] = [None] * B
        decoded = packed["decoded"].tolist()
        if any(decoded):
            pixels = packed["pixels"]
            if self.device.type == "cuda":
                pixels = pixels.to(self.device, non_blocking=True)
            offs = packed["pixel_offsets"].tolist()
            sizes = packed["image_sizes"].tolist()
            for i in np.flatnonzero(decoded):
                h, w = sizes[i]
                images[i] = pixels[offs[i] : offs[i + 1]].view(h, w, 3).permute(2, 0, 1)
        jpegs = [i for i in range(B) if not decoded[i]]
        if not jpegs:
            return images, []
        offs = packed["data_offsets"].tolist()
        datas = [packed["data"][offs[i] : offs[i + 1]] for i in jpegs]
        orientations = packed["orientations"].tolist()
        try:
            out = _decode_jpegs(datas, self.device)
        except RuntimeError:  # one bad file fails the whole batch: decode one by one
            out = [None] * len(jpegs)
        failed = []
        for n, i in enumerate(jpegs):
            if out[n] is not None:
                images[i] = apply_exif_orientation(out[n], orientations[i])
            else:
                images[i] = self._decode_one(datas[n], packed["file_names"][i], orientations[i])
                if images[i] is None:
                    failed.append(i)
        return images, failed

    def _decode_one(self, data: torch.Tensor, file_name: str, orientation: int):
        """One JPEG on the device, else on the host with PIL (upright), else None."""
        try:
            return apply_exif_orientation(_decode_jpegs([data], self.device)[0], orientation)
        except RuntimeError as e:
            logger.warning(f"GPUViews: {file_name} does not decode on {self.device} ({e})")
        try:  # PIL's decoder, as the CPU path (it applies the EXIF orientation itself)
            image = load_rgb_image(file_name)
        except ImageLoadError as e:
            logger.warning(f"GPUViews: skipping {file_name} ({e})")
            return None
        return _host_image(image, self.device)

    def _replace(self, packed: dict, images: list, failed: list[int]) -> dict:
        """Fill failed images with the next good image of the batch and fresh parameters."""
        bad = set(failed)
        good = [i for i in range(len(images)) if i not in bad]
        if not good:
            raise RuntimeError(
                "GPUViews: no image of the batch could be decoded (first: "
                f"{packed['file_names'][failed[0]]!r}); is the dataset readable?"
            )
        packed = dict(packed)
        for key in ("crops", "flips", "colors", "image_sizes", "num_skipped"):
            packed[key] = packed[key].clone()
        packed["file_names"] = list(packed["file_names"])
        packed["image_ids"] = list(packed.get("image_ids") or [None] * len(images))
        packed["windows"] = {
            f: {k: v.clone() for k, v in w.items()} for f, w in packed["windows"].items()
        }
        for i in failed:
            j = min((g for g in good if g > i), default=good[0])
            images[i] = images[j]
            h, w = (int(s) for s in images[j].shape[-2:])
            packed["file_names"][i] = packed["file_names"][j]
            packed["image_ids"][i] = packed["image_ids"][j]
            packed["image_sizes"][i] = torch.tensor([h, w])
            packed["num_skipped"][i] += 1
            if self.param_sampler is not None:
                position = int(packed["stream_positions"][i])
                p = self.param_sampler(np.random.default_rng([self.seed, 2, position]), (h, w))
                packed["crops"][i] = torch.from_numpy(np.stack([p["crop_q"], p["crop_k"]]))
                packed["flips"][i] = bool(p["flip"])
                packed["colors"][i] = torch.from_numpy(p["color"])
                for f, (bq, bk, valid) in p["windows"].items():
                    packed["windows"][f]["boxes_q"][i] = torch.from_numpy(bq)
                    packed["windows"][f]["boxes_k"][i] = torch.from_numpy(bk)
                    packed["windows"][f]["valid"][i] = torch.from_numpy(valid)
            else:
                for key in ("crops", "flips", "colors"):
                    packed[key][i] = packed[key][j]
                for w in packed["windows"].values():
                    for v in w.values():
                        v[i] = v[j]
            self.num_replaced += 1
        return packed

    # ------------------------------------------------------------------ views
    def render(
        self,
        images: Sequence[torch.Tensor],
        crops: np.ndarray,
        flips: np.ndarray,
        colors: np.ndarray | None,
    ) -> torch.Tensor:
        """uint8 (B, 2, 3, S, S) views of upright images.

        Args:
            images: B uint8 (3, H_i, W_i) on the device.
            crops: float64 (B, 2, 4) query/key crop boxes in the (flipped when ``flips``) frame.
            flips: bool (B,).
            colors: float64 (B, 2, NUM_COLOR_PARAMS), or None for no colour augmentation.
        """
        crops = np.asarray(crops, dtype=np.float64)
        flips = np.asarray(flips, dtype=bool)
        widths = np.array([float(im.shape[-1]) for im in images])
        boxes = crops.copy()
        # a flipped image's crop is the mirrored box of the unflipped one, its view mirrored back
        boxes[flips, :, 0] = widths[flips, None] - crops[flips, :, 2]
        boxes[flips, :, 2] = widths[flips, None] - crops[flips, :, 0]
        mirror = np.repeat(flips[:, None], 2, 1)
        S = self.view_size
        views = resample_views(
            images, boxes, S, mirror, max_group_elements=self.max_group_elements
        )  # (B, 2, 3, S, S) in 0..255
        B = views.shape[0]
        if colors is not None and np.asarray(colors).any():
            x = views.view(2 * B, 3, S, S).div_(255.0)
            color_augment_views(x, np.asarray(colors).reshape(2 * B, -1), self.blur_kernel_size)
            views = x.mul_(255.0).view(B, 2, 3, S, S)
        return views.round_().clamp_(0.0, 255.0).to(torch.uint8)

    def __call__(self, packed: dict) -> list[dict]:
        images, failed = self.decode(packed)
        if failed:
            packed = self._replace(packed, images, failed)
        colors = packed["colors"].numpy()
        has_color = bool((colors[..., P_JITTER] + colors[..., P_GRAY] + colors[..., P_BLUR]).any())
        views = self.render(
            images,
            packed["crops"].numpy(),
            packed["flips"].numpy(),
            colors if has_color else None,
        )
        return self._outputs(packed, views)

    def _outputs(self, packed: dict, views: torch.Tensor) -> list[dict]:
        crops = packed["crops"].float()
        flips = packed["flips"].tolist()
        sizes = packed["image_sizes"].tolist()
        skipped = packed["num_skipped"].tolist()
        positions = packed["stream_positions"].tolist()
        ids = packed.get("image_ids")
        # windows on the device too: ReSim._windows then only stacks them, and the training step
        # needs no host-to-device copy from pageable memory (which would wait for the GPU)
        windows = {
            f: {k: v.to(self.device, non_blocking=True) for k, v in w.items()}
            for f, w in packed["windows"].items()
        }
        out = []
        for i, name in enumerate(packed["file_names"]):
            d = {
                "image_q": views[i, 0],
                "image_k": views[i, 1],
                "windows": {
                    f: {
                        "boxes_q": w["boxes_q"][i],
                        "boxes_k": w["boxes_k"][i],
                        "valid": w["valid"][i],
                    }
                    for f, w in windows.items()
                },
                "crop_q": crops[i, 0],
                "crop_k": crops[i, 1],
                "flip": bool(flips[i]),
                "file_name": name,
                "image_size": tuple(sizes[i]),
                "num_skipped": int(skipped[i]),
                "stream_position": int(positions[i]),
            }
            if ids is not None and ids[i] is not None:
                d["image_id"] = ids[i]
            out.append(d)
        return out


def _host_image(image, device: torch.device) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W) on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(image))).permute(2, 0, 1)
    return t.to(device)
