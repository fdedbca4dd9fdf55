"""Precise RoI Pooling against independent references (never against the op's own output).

References: hand-computed known answers, a 2x2 stride-1 average pool, a brute-force integral that
splits each bin at the integer grid lines and integrates each bilinear patch exactly (NumPy,
float64, no use of the closed form), a fine midpoint rule (to check that reference), exact
identities for constant and affine maps (and torchvision's roi_align on affine maps), and
invariances.
"""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from resim_d2.layers import PrRoIPool, prroi_pool

prroi_module = importlib.import_module("resim_d2.layers.prroi_pool")  # the module, not the function

METHODS = ["outer", "sep_h", "sep_w"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- references
def _cells(a, b):
    """Split [a, b] at the integers: [(cell j, lo, hi)] with j <= lo <= hi <= j + 1."""
    out = []
    j = math.floor(a)
    while j < b:
        lo, hi = max(a, j), min(b, j + 1)
        if hi > lo:
            out.append((j, lo, hi))
        j += 1
    return out


def _integral(fmap, xa, xb, ya, yb):
    """Exact integral of the bilinear interpolation of fmap (C, H, W) over [xa, xb] x [ya, yb].

    On the cell [j, j+1] x [i, i+1] the map is sum over its 4 corners of F * (1 - |x - corner x|) *
    (1 - |y - corner y|); corners outside the map are zero. Integrate each linear factor exactly.
    """
    C, H, W = fmap.shape
    total = np.zeros(C)
    for j, x0, x1 in _cells(xa, xb):
        # int (1 - (x - j)) dx and int (x - j) dx over [x0, x1]
        ax = {
            j: (x1 - x0) - ((x1 - j) ** 2 - (x0 - j) ** 2) / 2,
            j + 1: ((x1 - j) ** 2 - (x0 - j) ** 2) / 2,
        }
        for i, y0, y1 in _cells(ya, yb):
            ay = {
                i: (y1 - y0) - ((y1 - i) ** 2 - (y0 - i) ** 2) / 2,
                i + 1: ((y1 - i) ** 2 - (y0 - i) ** 2) / 2,
            }
            for ii, wy in ay.items():
                for jj, wx in ax.items():
                    if 0 <= ii < H and 0 <= jj < W:
                        total += fmap[:, ii, jj] * wy * wx
    return total


def reference(features, boxes, output_size, scale=1.0, aligned=False):
    """Brute-force PrRoIPool in float64 NumPy; boxes (R, 5)."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    fm = features.detach().double().cpu().numpy()
    bx = boxes.detach().double().cpu().numpy()
    out = np.zeros((len(bx), fm.shape[1], ph, pw))
    for r, (n, *xyxy) in enumerate(bx):
        x0, y0, x1, y1 = (np.array(xyxy) * scale - (0.5 if aligned else 0.0)).tolist()
        bw, bh = max(x1 - x0, 0.0) / pw, max(y1 - y0, 0.0) / ph
        if bw * bh == 0:
            continue
        for p in range(ph):
            for q in range(pw):
                xa, ya = x0 + q * bw, y0 + p * bh
                out[r, :, p, q] = _integral(fm[int(n)], xa, xa + bw, ya, ya + bh) / (bw * bh)
    return torch.from_numpy(out)


def midpoint(fmap, xa, xb, ya, yb, k=400):
    """Midpoint rule, k x k points of the bilinear map (zero outside); fmap (C, H, W) float64."""
    fm = torch.from_numpy(fmap)
    C, H, W = fm.shape
    pad = F.pad(fm, (1, 1, 1, 1))  # the zero ring outside the map
    xs = xa + (torch.arange(k, dtype=torch.float64) + 0.5) * (xb - xa) / k
    ys = ya + (torch.arange(k, dtype=torch.float64) + 0.5) * (yb - ya) / k
    # grid_sample with align_corners=True on the padded map: pixel centre j <-> x = j
    gx = (xs + 1) / (W + 1) * 2 - 1
    gy = (ys + 1) / (H + 1) * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    vals = F.grid_sample(pad[None], grid, align_corners=True, padding_mode="zeros")
    return vals[0].mean(dim=(1, 2)).numpy() * (xb - xa) * (yb - ya)


def random_boxes(n_images, r, H, W, scale=1.0, margin=0.5, gen=None, dtype=torch.float64):
    """Boxes over [-margin, 1 + margin] of the map (so some cross the border or lie outside)."""
    lo = torch.tensor([-margin * W, -margin * H], dtype=dtype)
    hi = torch.tensor([(1 + margin) * W, (1 + margin) * H], dtype=dtype)
    p = lo + (hi - lo) * torch.rand(r, 2, 2, generator=gen, dtype=dtype)
    xy0, xy1 = torch.minimum(p[:, 0], p[:, 1]), torch.maximum(p[:, 0], p[:, 1])
    idx = torch.randint(0, n_images, (r, 1), generator=gen).to(dtype)
    return torch.cat([idx, xy0 / scale, xy1 / scale], dim=1)


# ----------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("method", METHODS)
def test_known_answer_2x2(method):
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    out = prroi_pool(f, torch.tensor([[0.0, 0, 0, 1, 1]]), 2, 1.0, method=method)
    assert torch.equal(out[0, 0], torch.tensor([[1.75, 2.25], [2.75, 3.25]]))


def test_reference_known_answer_and_midpoint():
    # the brute-force reference itself: the known answer and a fine midpoint rule
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)[None, None]
    ref = reference(f, torch.tensor([[0.0, 0, 0, 1, 1]]), 2)
    assert torch.allclose(ref[0, 0], torch.tensor([[1.75, 2.25], [2.75, 3.25]], dtype=ref.dtype))
    fm = np.random.default_rng(0).standard_normal((3, 5, 6))
    for box in [(-1.3, 0.4, 2.7, 3.9), (4.2, -0.9, 6.6, 4.5), (6.5, 5.0, 8.0, 7.0)]:
        exact = _integral(fm, box[0], box[2], box[1], box[3])
        assert np.allclose(exact, midpoint(fm, box[0], box[2], box[1], box[3]), atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_unit_bins_equal_avg_pool(method):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[0.0, 0, 0, 6, 4], [1.0, 0, 0, 6, 4]], dtype=torch.float64)
    out = prroi_pool(f, boxes, (4, 6), 1.0, method=method)
    torch.testing.assert_close(out, F.avg_pool2d(f, 2, stride=1), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- brute force
@pytest.mark.parametrize(
    "size,scale,aligned,method",
    [
        ((1, 1), 1.0, False, "auto"),
        ((2, 3), 0.5, False, "outer"),
        ((3, 2), 0.25, True, "sep_h"),
        ((4, 4), 1 / 16, False, "sep_w"),
        ((7, 7), 1.0, True, "auto"),
    ],
)
def test_matches_brute_force_integral(size, scale, aligned, method):
    g = torch.Generator().manual_seed(hash((size, scale)) % 1000)
    N, C, H, W = 3, 4, 6, 9
    f = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    boxes = random_boxes(N, 12, H, W, scale, gen=g)
    boxes[0, 1:] = torch.tensor([W + 1.0, 1.0, W + 3.0, 2.0]) / scale  # entirely outside
    boxes[1, 1:] = torch.tensor([-3.0, -2.5, -1.5, 4.0]) / scale  # entirely outside (left)
    boxes[2, 1:] = torch.tensor([-0.7, -0.4, W - 0.3, H + 0.6]) / scale  # crosses all borders
    out = prroi_pool(f, boxes, size, scale, aligned=aligned, method=method)
    ref = reference(f, boxes, size, scale, aligned)
    assert out.shape == (12, C) + size and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert out[0].abs().max() == 0 and out[1].abs().max() == 0


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_features_and_boxes(method):
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    # non-degenerate boxes, off the integer grid, some crossing the border
    boxes = torch.tensor(
        [[0, 0.3, 0.7, 4.1, 3.6], [1, -0.8, 1.2, 2.9, 5.4], [0, 2.2, -0.6, 6.7, 2.3]],
        dtype=torch.float64,
    )
    coords = boxes[:, 1:].clone().requires_grad_(True)

    def fn(feat, xyxy):
        return prroi_pool(feat, torch.cat([boxes[:, :1], xyxy], 1), (2, 3), 1.0, method=method)

    assert torch.autograd.gradcheck(fn, (f, coords), eps=1e-6, atol=1e-7)


def test_box_gradient_matches_brute_force_difference():
    # d out / d x1 from the independent reference by central differences
    g = torch.Generator().manual_seed(4)
    f = torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64)
    box = torch.tensor([[0, 0.4, 1.3, 3.7, 4.2]], dtype=torch.float64, requires_grad=True)
    out = prroi_pool(f, box, 1, 1.0)
    (grad,) = torch.autograd.grad(out.sum(), box)
    h = 1e-5
    for k in range(1, 5):
        e = torch.zeros_like(box)
        e[0, k] = h
        fd = (reference(f, box + e, 1).sum() - reference(f, box - e, 1).sum()) / (2 * h)
        assert abs(grad[0, k].item() - fd.item()) < 1e-6


def test_no_gradient_to_images_without_boxes():
    f = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[0, 0.5, 0.5, 3.5, 3.0], [2, 1.0, 0.0, 4.0, 4.0]], dtype=torch.float64)
    prroi_pool(f, boxes, 2).sum().backward()
    assert torch.all(f.grad[1] == 0)
    assert f.grad[0].abs().sum() > 0 and f.grad[2].abs().sum() > 0


def test_zero_area_bins_give_zero_and_zero_gradient():
    f = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor(
        [
            [0, 1.0, 1.0, 1.0, 3.0],  # zero width
            [0, 1.0, 2.0, 3.0, 2.0],  # zero height
            [0, 2.0, 2.0, 2.0, 2.0],  # a point
            [0, 3.0, 3.0, 1.0, 4.0],  # inverted (x1 < x0): empty, as in the original op
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    for method in METHODS:
        out = prroi_pool(f, boxes, (2, 2), method=method)
        assert torch.all(out == 0)
        gf, gb = torch.autograd.grad(out.sum(), (f, boxes))
        assert torch.all(gf == 0) and torch.all(gb == 0)
        assert torch.isfinite(gb).all()


def test_empty_boxes():
    f = torch.randn(2, 5, 4, 4, requires_grad=True)
    boxes = torch.zeros(0, 5, requires_grad=True)
    out = prroi_pool(f, boxes, (3, 2), 0.5)
    assert out.shape == (0, 5, 3, 2) and out.dtype == f.dtype
    gf, gb = torch.autograd.grad(out.sum(), (f, boxes))
    assert torch.all(gf == 0) and gb.shape == (0, 5)
    assert PrRoIPool(1)(f.half(), boxes.half()).shape == (0, 5, 1, 1)


# ----------------------------------------------------------------------------- identities
def test_constant_map_gives_constant():
    f = torch.full((2, 3, 6, 8), 2.5, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    p = torch.rand(20, 2, 2, generator=g, dtype=torch.float64) * torch.tensor([7.0, 5.0])
    boxes = torch.cat(
        [torch.randint(0, 2, (20, 1), generator=g).double(), p.min(1).values, p.max(1).values], 1
    )
    out = prroi_pool(f, boxes, (3, 2))
    torch.testing.assert_close(out, torch.full_like(out, 2.5), rtol=0, atol=1e-12)


def test_affine_map_gives_centre_value_and_equals_roi_align():
    H, W = 7, 9
    a, bx, by = 0.3, 1.7, -0.9
    ar = lambda n: torch.arange(n, dtype=torch.float64)
    ys, xs = torch.meshgrid(ar(H), ar(W), indexing="ij")
    f = (a + bx * xs + by * ys)[None, None].repeat(2, 2, 1, 1)
    f[:, 1] *= -2.0
    g = torch.Generator().manual_seed(6)
    # inside [0, W-1] x [0, H-1], at least 1 wide/high (roi_align clamps smaller boxes to 1)
    x0 = torch.rand(30, generator=g, dtype=torch.float64) * (W - 2)
    y0 = torch.rand(30, generator=g, dtype=torch.float64) * (H - 2)
    x1 = x0 + 1 + torch.rand(30, generator=g, dtype=torch.float64) * (W - 2 - x0)
    y1 = y0 + 1 + torch.rand(30, generator=g, dtype=torch.float64) * (H - 2 - y0)
    idx = torch.randint(0, 2, (30,), generator=g).double()
    boxes = torch.stack([idx, x0, y0, x1, y1], 1)
    ph, pw = 3, 4
    out = prroi_pool(f, boxes, (ph, pw))
    cx = x0[:, None] + (torch.arange(pw) + 0.5) * (x1 - x0)[:, None] / pw  # (R, pw)
    cy = y0[:, None] + (torch.arange(ph) + 0.5) * (y1 - y0)[:, None] / ph  # (R, ph)
    centre = a + bx * cx[:, None, :] + by * cy[:, :, None]  # (R, ph, pw)
    torch.testing.assert_close(out[:, 0], centre, rtol=0, atol=1e-10)
    torch.testing.assert_close(out[:, 1], -2 * centre, rtol=0, atol=1e-10)
    ra = roi_align(f, boxes, (ph, pw), 1.0, sampling_ratio=2, aligned=False)
    torch.testing.assert_close(out, ra, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- invariances
def test_scale_invariance_and_aligned_offset():
    g = torch.Generator().manual_seed(7)
    f = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    boxes = random_boxes(2, 10, 8, 8, gen=g)
    s = 1 / 8
    scaled = boxes.clone()
    scaled[:, 1:] /= s
    torch.testing.assert_close(prroi_pool(f, scaled, 2, s), prroi_pool(f, boxes, 2, 1.0))
    shifted = boxes.clone()
    shifted[:, 1:] -= 0.5
    torch.testing.assert_close(
        prroi_pool(f, boxes, (2, 3), aligned=True), prroi_pool(f, shifted, (2, 3))
    )


def test_integer_translation():
    g = torch.Generator().manual_seed(8)
    f = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64)
    dx, dy = 3, 2
    big = torch.zeros(1, 2, 5 + dy + 4, 6 + dx + 4, dtype=torch.float64)
    big[:, :, dy : dy + 5, dx : dx + 6] = f
    boxes = random_boxes(1, 15, 5, 6, margin=0.3, gen=g)
    moved = boxes + torch.tensor([0.0, dx, dy, dx, dy], dtype=torch.float64)
    torch.testing.assert_close(prroi_pool(big, moved, (2, 2)), prroi_pool(f, boxes, (2, 2)))


def test_horizontal_flip():
    g = torch.Generator().manual_seed(9)
    W = 7
    f = torch.randn(2, 2, 5, W, generator=g, dtype=torch.float64)
    boxes = random_boxes(2, 15, 5, W, margin=0.3, gen=g)
    flipped = boxes.clone()
    flipped[:, 1], flipped[:, 3] = (W - 1) - boxes[:, 3], (W - 1) - boxes[:, 1]
    out = prroi_pool(f.flip(-1), flipped, (2, 3))
    torch.testing.assert_close(out, prroi_pool(f, boxes, (2, 3)).flip(-1))


def test_permuting_boxes_permutes_outputs():
    g = torch.Generator().manual_seed(10)
    f = torch.randn(3, 4, 6, 6, generator=g)
    boxes = random_boxes(3, 17, 6, 6, gen=g, dtype=torch.float32)
    perm = torch.randperm(17, generator=g)
    out = prroi_pool(f, boxes, 2)
    torch.testing.assert_close(prroi_pool(f, boxes[perm], 2), out[perm], rtol=1e-6, atol=1e-6)
    # sorted-by-image equal-count fast path vs the general path
    sorted_boxes = boxes[torch.argsort(boxes[:, 0], stable=True)][:15]
    sorted_boxes[:, 0] = torch.arange(3).repeat_interleave(5)
    ref = reference(f, sorted_boxes, 2).float()
    torch.testing.assert_close(prroi_pool(f, sorted_boxes, 2), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- dtypes, API
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    g = torch.Generator().manual_seed(11)
    f = torch.randn(2, 8, 10, 10, generator=g).to(dtype)
    boxes = random_boxes(2, 9, 10, 10, gen=g, dtype=torch.float32).to(dtype)
    out = prroi_pool(f, boxes, 2)
    assert out.dtype == dtype
    ref = reference(f, boxes, 2)  # of the rounded inputs, in float64
    # only the final rounding to the half type: half an ulp of the output
    eps = torch.finfo(dtype).eps
    assert ((out.double() - ref).abs() <= eps * ref.abs() + 1e-6).all()
    f.requires_grad_(True)
    (gf,) = torch.autograd.grad(prroi_pool(f, boxes, 2).sum(), f)
    assert gf.dtype == dtype and torch.isfinite(gf).all()


def test_autocast_does_not_lower_precision():
    g = torch.Generator().manual_seed(12)
    f = torch.randn(2, 8, 10, 10, generator=g)
    boxes = random_boxes(2, 9, 10, 10, gen=g, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prroi_pool(f, boxes, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(f, boxes, 2), rtol=1e-5, atol=1e-5)


def test_module_list_boxes_and_determinism():
    g = torch.Generator().manual_seed(13)
    f = torch.randn(2, 4, 9, 9, generator=g)
    b0 = random_boxes(1, 4, 9, 9, gen=g, dtype=torch.float32)[:, 1:] * 4
    b1 = random_boxes(1, 3, 9, 9, gen=g, dtype=torch.float32)[:, 1:] * 4
    m = PrRoIPool((2, 3), spatial_scale=0.25)
    assert "output_size=(2, 3), spatial_scale=0.25, aligned=False" in repr(m)
    out = m(f, [b0, b1])
    cat = torch.cat([torch.cat([torch.zeros(4, 1), b0], 1), torch.cat([torch.ones(3, 1), b1], 1)])
    ref = reference(f, cat, (2, 3), 0.25).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, m(f, [b0, b1]))


def test_boxes_per_image_promise_and_fullgraph_compile():
    g = torch.Generator().manual_seed(17)
    f = torch.randn(3, 4, 14, 14, generator=g, requires_grad=True)
    boxes = random_boxes(3, 12, 14, 14, scale=1 / 16, gen=g, dtype=torch.float32)
    boxes[:, 0] = torch.arange(3).repeat_interleave(4)
    ref = reference(f, boxes, 1, 1 / 16).float()
    out = prroi_pool(f, boxes, 1, 1 / 16, boxes_per_image=4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"boxes_per_image=5 with N = 3 images needs R = 15"):
        prroi_pool(f, boxes, 1, 1 / 16, boxes_per_image=5)
    # no host-device synchronisation left: traces as one graph, forward and backward
    step = torch.compile(
        lambda x, b: prroi_pool(x, b, 1, 1 / 16, boxes_per_image=4),
        fullgraph=True,
        backend="aot_eager",
    )
    out = step(f, boxes)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), f)
    assert grad.shape == f.shape and grad.abs().sum() > 0


_TRITON_SCRIPT = """
import importlib, sys, torch
from resim_d2.layers import prroi_pool
module = importlib.import_module("resim_d2.layers.prroi_pool")  # the module, not the function
calls = []
orig = module.bin_weights_triton
def counted(*a, **k):
    calls.append(1)
    return orig(*a, **k)
module.bin_weights_triton = counted
data = torch.load(sys.argv[1])
outs = []
for f, boxes, size, scale, aligned in data:
    out = prroi_pool(f.requires_grad_(True), boxes, size, scale, aligned=aligned)
    (grad,) = torch.autograd.grad(out.square().sum(), f)
    outs.append((out.detach(), grad))
torch.save({"outs": outs, "calls": len(calls)}, sys.argv[2])
"""


def test_triton_weight_kernel_matches_brute_force(tmp_path):
    """The fused Triton weight kernel (CUDA fast path), run by Triton's CPU interpreter."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    g = torch.Generator().manual_seed(23)
    cases = []
    for size, scale, aligned, dtype in [
        (1, 1 / 16, False, torch.float32),
        ((2, 3), 1.0, True, torch.float64),
        ((7, 5), 0.5, False, torch.float64),
    ]:
        f = torch.randn(3, 4, 9, 11, generator=g, dtype=dtype)
        boxes = random_boxes(3, 20, 9, 11, scale=scale, gen=g, dtype=dtype)
        boxes[0, 3] = boxes[0, 1]  # zero width
        boxes[1, [1, 3]] = boxes[1, [3, 1]]  # x1 < x0: empty
        cases.append((f, boxes, size, scale, aligned))
    f = torch.randn(2, 5, 14, 14, generator=g)  # (N, M, 4) boxes: the kernel's 4-column layout
    boxes = random_boxes(2, 14, 14, 14, scale=1 / 16, gen=g, dtype=torch.float32)[:, 1:]
    cases.append((f, boxes.view(2, 7, 4), 1, 1 / 16, False))
    torch.save(cases, tmp_path / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", RESIM_D2_PRROI_TRITON="1")
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["calls"] == len(cases)  # the kernel really ran
    for (f, boxes, size, scale, aligned), (out, grad) in zip(cases, result["outs"]):
        planted_empty = boxes.dim() == 2  # rows 0 and 1 were made empty above
        if boxes.dim() == 3:
            index = torch.arange(boxes.shape[0]).repeat_interleave(boxes.shape[1])
            boxes = torch.cat([index[:, None].to(boxes), boxes.reshape(-1, 4)], dim=1)
        ref = reference(f, boxes, size, scale, aligned)
        tol = 1e-9 if f.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)
        if planted_empty:
            assert out[0].abs().max() == 0 and out[1].abs().max() == 0
        # gradient to the features: against the PyTorch path (itself checked against the brute
        # force and gradcheck above), float64
        ff = f.detach().double().requires_grad_(True)
        ref_t = prroi_pool(ff, boxes.double(), size, scale, aligned=aligned, method="sep_h")
        (ref_grad,) = torch.autograd.grad(ref_t.square().sum(), ff)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=tol * 10)


def test_chunked_contraction_with_checkpointing(monkeypatch):
    g = torch.Generator().manual_seed(14)
    f = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = random_boxes(2, 11, 6, 7, gen=g).requires_grad_(True)
    grads = []
    for chunk in (prroi_module._CHUNK_ELEMENTS, 50):
        monkeypatch.setattr(prroi_module, "_CHUNK_ELEMENTS", chunk)
        for method in METHODS:
            out = prroi_pool(f, boxes, (2, 3), method=method)
            torch.testing.assert_close(out, reference(f, boxes, (2, 3)), rtol=0, atol=1e-9)
            grads.append(torch.autograd.grad(out.square().sum(), (f, boxes)))
    for gf, gb in grads[1:]:
        torch.testing.assert_close(gf, grads[0][0])
        torch.testing.assert_close(gb, grads[0][1])


def test_method_choice():
    choose = prroi_module._choose_method
    assert choose(1, 1, 14, 14) == "outer"
    assert choose(7, 7, 50, 60) == "sep_w"  # the longer axis first, the shorter second
    assert choose(7, 7, 60, 50) == "sep_h"


@pytest.mark.parametrize(
    "features,boxes,kwargs,match",
    [
        (
            torch.zeros(2, 3, 4),
            torch.zeros(1, 5),
            {},
            r"features must be a \(N, C, H, W\).*\(2, 3, 4\)",
        ),
        (torch.zeros(1, 3, 4, 4), torch.zeros(2, 4), {}, r"boxes must be a \(R, 5\).*\(2, 4\)"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(5), {}, r"boxes must be a \(R, 5\).*\(5,\)"),
        (
            torch.zeros(2, 3, 4, 4),
            torch.tensor([[2.0, 0, 0, 1, 1]]),
            {},
            r"batch index.*\[0, 1\].*\[2, 2\]",
        ),
        (torch.zeros(2, 3, 4, 4), torch.tensor([[-1.0, 0, 0, 1, 1]]), {}, r"batch index"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), {"output_size": 0}, r"output_size"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), {"output_size": (1, 2, 3)}, r"output_size"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), {"spatial_scale": 0.0}, r"spatial_scale"),
        (torch.zeros(1, 3, 4, 4), [torch.zeros(2, 5)], {}, r"boxes\[0\] must be a \(R_0, 4\)"),
    ],
)
def test_bad_arguments_name_argument_and_shape(features, boxes, kwargs, match):
    kwargs = {"output_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        prroi_pool(features, boxes, **kwargs)


def test_integer_inputs_rejected():
    with pytest.raises(TypeError, match="features must be floating point"):
        prroi_pool(torch.zeros(1, 1, 2, 2, dtype=torch.int64), torch.zeros(1, 5), 1)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_cuda_matches_cpu_float64(method):
    g = torch.Generator().manual_seed(15)
    f = torch.randn(3, 8, 11, 13, generator=g, dtype=torch.float64)
    boxes = random_boxes(3, 40, 11, 13, scale=0.25, gen=g)
    go = torch.randn(40, 8, 3, 2, generator=g, dtype=torch.float64)
    res = {}
    for dev, dt in (("cpu", torch.float64), ("cuda", torch.float32), ("cuda", torch.float64)):
        ff = f.to(dev, dt).requires_grad_(True)
        bb = boxes.to(dev, dt).requires_grad_(True)
        out = prroi_pool(ff, bb, (3, 2), 0.25, method=method)
        gf, gb = torch.autograd.grad(out, (ff, bb), go.to(dev, dt))
        res[(dev, dt)] = [x.detach().cpu().double() for x in (out, gf, gb)]
    for got, want in zip(res[("cuda", torch.float64)], res[("cpu", torch.float64)]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for got, want in zip(res[("cuda", torch.float32)], res[("cpu", torch.float64)]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda])])
def test_runs_under_deterministic_algorithms(device):
    g = torch.Generator().manual_seed(18)
    f = torch.randn(3, 4, 9, 9, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    boxes = random_boxes(3, 10, 9, 9, gen=g).to(device).requires_grad_(True)  # unsorted, uneven
    ref = reference(f, boxes, (2, 2))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = prroi_pool(f, boxes, (2, 2))
            runs.append((out, *torch.autograd.grad(out.square().sum(), (f, boxes))))
    finally:
        torch.use_deterministic_algorithms(previous)
    torch.testing.assert_close(runs[0][0].cpu(), ref, rtol=0, atol=1e-9)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_and_determinism(dtype):
    g = torch.Generator().manual_seed(16)
    f = torch.randn(4, 16, 14, 14, generator=g).to("cuda", dtype).requires_grad_(True)
    boxes = random_boxes(4, 64, 14, 14, scale=1 / 16, gen=g, dtype=torch.float32).cuda()
    out = prroi_pool(f, boxes, 1, 1 / 16)
    assert out.dtype == dtype
    ref = reference(f.detach().cpu(), boxes.cpu(), 1, 1 / 16)
    eps = torch.finfo(dtype).eps
    assert ((out.detach().cpu().double() - ref).abs() <= eps * ref.abs() + 1e-5).all()
    (g1,) = torch.autograd.grad(out.float().sum(), f)
    (g2,) = torch.autograd.grad(prroi_pool(f, boxes, 1, 1 / 16).float().sum(), f)
    assert torch.equal(g1, g2)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_n_m_4_boxes_without_box_grad_match_cpu_float64(dtype):
    """The form ReSim calls on the GPU (per-image (N, M, 4) boxes that need no gradient: the
    Triton weight kernel where Triton runs) against the brute-force integral on the CPU."""
    g = torch.Generator().manual_seed(36)
    f = torch.randn(3, 8, 14, 14, generator=g, dtype=torch.float64)
    xyxy = random_boxes(3, 36, 14, 14, scale=1 / 16, gen=g)[:, 1:].view(3, 12, 4)
    index = torch.arange(3, dtype=torch.float64).repeat_interleave(12)[:, None]
    rows = torch.cat([index, xyxy.reshape(-1, 4)], dim=1)
    go = torch.randn(3, 12, 8, 2, 2, generator=g, dtype=torch.float64)
    ff = f.clone().requires_grad_(True)
    want = prroi_pool(ff, rows, (2, 2), 1 / 16)
    (want_grad,) = torch.autograd.grad(want, ff, go.view(36, 8, 2, 2))
    torch.testing.assert_close(want, reference(f, rows, (2, 2), 1 / 16), rtol=0, atol=1e-9)
    fc = f.to("cuda", dtype).requires_grad_(True)
    out = prroi_pool(fc, xyxy.to("cuda", dtype), (2, 2), 1 / 16)
    (grad,) = torch.autograd.grad(out, fc, go.view(36, 8, 2, 2).to("cuda", dtype))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.cpu().double(), want.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=tol, atol=tol)


def test_per_image_box_layout_n_m_4():
    """(N, M, 4) boxes = the same boxes as (R, 5) rows n * M + m with batch index n."""
    g = torch.Generator().manual_seed(29)
    f = torch.randn(3, 4, 10, 12, generator=g, dtype=torch.float64, requires_grad=True)
    xyxy = random_boxes(3, 15, 10, 12, scale=0.5, gen=g)[:, 1:].view(3, 5, 4)
    index = torch.arange(3, dtype=torch.float64).repeat_interleave(5)[:, None]
    rows = torch.cat([index, xyxy.reshape(-1, 4)], dim=1)
    out = prroi_pool(f, xyxy.requires_grad_(True), (2, 2), 0.5)
    torch.testing.assert_close(out, reference(f, rows, (2, 2), 0.5), rtol=0, atol=1e-9)
    assert torch.autograd.gradcheck(
        lambda ff, bb: prroi_pool(ff, bb, (2, 2), 0.5), (f, xyxy.detach().requires_grad_(True))
    )
    with pytest.raises(ValueError, match=r"\(N, M, 4\) = \(2, 5, 4\) need N = 3"):
        prroi_pool(f, xyxy[:2], 1)
    with pytest.raises(ValueError, match="boxes_per_image=4 contradicts boxes of shape"):
        prroi_pool(f, xyxy, 1, boxes_per_image=4)


def test_triton_path_compiles_a_bounded_number_of_shapes(monkeypatch):
    T = importlib.import_module("resim_d2.layers.prroi_weights_triton")
    if T.triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(T, "_interpreting", lambda: True)
    monkeypatch.setattr(T, "_shapes", set())
    monkeypatch.setattr(T, "MAX_SHAPES", 2)
    cpu = torch.device("cpu")
    assert T.triton_available(cpu, (1, 1, 14, 14)) and T.triton_available(cpu, (7, 7, 50, 60))
    assert not T.triton_available(cpu, (7, 7, 50, 61))  # a third shape: PyTorch path
    assert T.triton_available(cpu, (1, 1, 14, 14))  # one already compiled: still Triton
    monkeypatch.setenv("RESIM_D2_PRROI_TRITON", "0")
    assert not T.triton_available(cpu, (1, 1, 14, 14))
