"""MoCo-v2's colour augmentation of a batch of views on the device, one parameter set per view.

:func:`color_augment_views` applies brightness, contrast, saturation and hue in each view's own
random order with its own factors, then grayscale, then a Gaussian blur with each view's sigma,
with the semantics of ``torchvision.transforms.v2.functional`` on float images in [0, 1] (tested
against it, per view); each op runs once per group of views that apply it at that position of
their order. The parameters are :func:`~resim_d2.data.color_augment.sample_color_params`'s, the
exact draws of the CPU path's :class:`~resim_d2.data.color_augment.MoCoV2ColorAugment`, whose PIL
ops (``ImageEnhance``, 8-bit HSV, ``ImageFilter.GaussianBlur``'s three-box approximation) round
differently: at equal parameters the two differ by about 1.2 grey levels on average, and the
distributions match (tested).

Blur: separable Gaussian of ``blur_kernel_size`` taps with reflect padding, as torchvision's
``gaussian_blur``; :func:`default_blur_kernel_size` is the odd number nearest ``0.1 * S`` (23 at
S = 224, the kernel of torchvision's MoCo/BYOL recipes), at least ``2 * ceil(3 * max sigma) + 1``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..color_augment import (
    _NEUTRAL,
    P_BLUR,
    P_BRIGHTNESS,
    P_GRAY,
    P_HUE,
    P_JITTER,
    P_ORDER,
    P_SIGMA,
)
from .transfer import to_device

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "gaussian_blur",
    "default_blur_kernel_size",
    "color_augment_views",
]


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
    packed = to_device(torch.from_numpy(host.astype(np.float64)), x.device)  # one copy
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
