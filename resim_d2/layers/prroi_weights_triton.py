"""PrRoIPool's per-box integration weights in one Triton kernel (CUDA fast path).

On a GPU, :func:`resim_d2.layers.prroi_pool` is bound by kernel launches, not arithmetic: building
the weights ``Ky``/``Kx`` from the boxes in PyTorch takes about fifteen small kernels. This module
computes the same ``(R, 2, q, L)`` weights (see ``prroi_pool._bin_weights``) from the raw
``(R, 5)`` boxes in a single kernel: scale, ``aligned`` offset, bin edges, the closed-form
integral ``G`` and the division by the bin size, in float64, written in the contraction dtype.

It is used only when the boxes need no gradient (the kernel has no backward; ReSim's windows and
detectron2's proposals are constants) and Triton can run: on CUDA tensors, or on CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1``, how the tests check it on machines without a GPU).
``RESIM_D2_PRROI_TRITON=0`` turns it off; under ``torch.compile`` the PyTorch path is traced instead
(inductor fuses it).
"""

from __future__ import annotations

import os

import torch

__all__ = ["triton_available", "bin_weights_triton"]

try:  # Triton ships with CUDA builds of torch on Linux; it is optional everywhere else
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The kernel is specialised (compiled) per output size and map side. ReSim uses two or three; a
# detector whose input sizes vary would compile one per new map side, so after this many distinct
# shapes new ones take the PyTorch path instead of stalling on compilation.
MAX_SHAPES = 16
_shapes: set = set()


def triton_available(device: torch.device, shape: tuple | None = None) -> bool:
    """Whether :func:`bin_weights_triton` can run on ``device`` in this process (for weights of
    ``shape`` = (ph, pw, H, W), if given: within the :data:`MAX_SHAPES` compiled so far)."""
    if triton is None or os.environ.get("RESIM_D2_PRROI_TRITON", "1") == "0":
        return False
    if torch.compiler.is_compiling():  # traced code: inductor fuses the PyTorch path by itself
        return False
    if not (device.type == "cuda" or (device.type == "cpu" and _interpreting())):
        return False
    if shape is not None:
        ph, pw, H, W = shape
        key = (ph, pw, max(H, W))
        if key not in _shapes:
            if len(_shapes) >= MAX_SHAPES:
                return False
            _shapes.add(key)
    return True


if triton is not None:

    @triton.jit
    def _weights_kernel(
        boxes_ptr,  # (R, S) any float dtype, contiguous: (batch_index, x0, y0, x1, y1) or no index
        out_ptr,  # (R, 2, Q, L) contiguous, the contraction dtype
        R,
        scale,
        offset,
        STRIDE: tl.constexpr,  # 5 or 4
        FIRST: tl.constexpr,  # column of x0: 1 or 0
        PW: tl.constexpr,
        PH: tl.constexpr,
        Q: tl.constexpr,
        L: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_KL: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        axis = tl.program_id(1)  # 0: x (columns, PW bins), 1: y (rows, PH bins)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        kl = tl.arange(0, BLOCK_KL)
        k = kl // L
        col = kl % L
        row_ok = rows < R
        lo = tl.load(boxes_ptr + rows * STRIDE + FIRST + axis, mask=row_ok, other=0.0)
        hi = tl.load(boxes_ptr + rows * STRIDE + FIRST + 2 + axis, mask=row_ok, other=0.0)
        lo = lo.to(tl.float64)
        hi = hi.to(tl.float64)
        lo = lo * scale - offset
        hi = hi * scale - offset
        nbins = tl.where(axis == 0, PW, PH).to(tl.float64)
        size = hi - lo
        step = size / nbins
        kf = k.to(tl.float64)
        e0 = lo[:, None] + step[:, None] * kf[None, :]
        e1 = lo[:, None] + step[:, None] * (kf[None, :] + 1.0)
        j = col.to(tl.float64)[None, :]
        u0 = tl.minimum(tl.maximum(e0 - j, -1.0), 1.0)
        u1 = tl.minimum(tl.maximum(e1 - j, -1.0), 1.0)
        g0 = u0 - 0.5 * u0 * tl.abs(u0)
        g1 = u1 - 0.5 * u1 * tl.abs(u1)
        inv = tl.where(size > 0, nbins / tl.where(size > 0, size, 1.0), 0.0)
        w = (g1 - g0) * inv[:, None]
        keep = (k < Q)[None, :] & (k < tl.where(axis == 0, PW, PH))[None, :]
        w = tl.where(keep, w, 0.0)
        dst = out_ptr + rows[:, None] * (2 * Q * L) + axis * (Q * L) + kl[None, :]
        mask = row_ok[:, None] & (kl < Q * L)[None, :]
        tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=mask)


def bin_weights_triton(
    boxes: torch.Tensor,
    ph: int,
    pw: int,
    H: int,
    W: int,
    spatial_scale: float,
    aligned: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Weights of ``prroi_pool._bin_weights`` straight from the boxes, in ``dtype``.

    Args:
        boxes: (R, 5) ``(batch_index, x0, y0, x1, y1)`` or (R, 4) ``(x0, y0, x1, y1)`` in input
            pixels (no gradient is computed).
        ph, pw: output size; H, W: feature map size.

    Returns:
        (R, 2, q, L) tensor, q = max(ph, pw), L = max(H, W); rows ``[:, 0, :pw, :W]`` = Kx,
        ``[:, 1, :ph, :H]`` = Ky; zero elsewhere and for boxes with an empty side.
    """
    R = boxes.shape[0]
    q, L = max(ph, pw), max(H, W)
    out = torch.empty((R, 2, q, L), dtype=dtype, device=boxes.device)
    if R == 0:
        return out
    boxes = boxes.detach().contiguous()
    block_kl = triton.next_power_of_2(q * L)
    block_r = max(1, min(64, 4096 // block_kl))
    grid = (triton.cdiv(R, block_r), 2)
    _weights_kernel[grid](
        boxes,
        out,
        R,
        float(spatial_scale),
        0.5 if aligned else 0.0,
        STRIDE=boxes.shape[1],
        FIRST=boxes.shape[1] - 4,
        PW=pw,
        PH=ph,
        Q=q,
        L=L,
        BLOCK_R=block_r,
        BLOCK_KL=block_kl,
    )
    return out
