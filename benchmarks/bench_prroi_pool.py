"""Time Precise RoI Pooling against torchvision's roi_align on ReSim's two region-pooling shapes.

Shapes (output 1x1, forward + backward to the features, boxes as constants as in ReSim):

* C4/P4: 1,152 boxes (36 per image) on a 32x256x14x14 map, spatial scale 1/16;
* P3:    2,048 boxes (64 per image) on a 32x256x28x28 map, spatial scale 1/8.

Boxes are sorted by image (as the meta-architecture produces them); their centres are uniform over
the 224x224 view and their sides are the window size (48 px on C4/P4, 32 px on P3) times a random
factor in [0.5, 2], as mapped key-view windows are. The baseline is
``torchvision.ops.roi_align`` with ``aligned=False`` at ``sampling_ratio`` 0 (adaptive,
detectron2's default ``POOLER_SAMPLING_RATIO``) and 2, timed in the same process on the same
inputs.

``prroi_pool`` is timed as called by default with (R, 5) boxes (it checks the boxes' image layout:
one host-device sync), with ``boxes_per_image`` given (no sync), and with the boxes as a (N, M, 4)
tensor (no sync; how ReSim calls it). Ratios are against the default call. CPU timing:
``time.perf_counter`` around ``--iters`` calls after warm-up; CUDA timing: CUDA events around
``--iters`` calls after warm-up and ``torch.cuda.synchronize``. The candidates alternate within
each of ``--repeats`` rounds and the best round is reported.

    python benchmarks/bench_prroi_pool.py                      # CPU, float32
    python benchmarks/bench_prroi_pool.py --device cuda --iters 200
    python benchmarks/bench_prroi_pool.py --device cuda --check   # CUDA vs CPU float64 errors
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.ops import roi_align

from resim_d2.layers.prroi_pool import prroi_pool
from resim_d2.layers.prroi_weights_triton import triton_available

SHAPES = (
    # name, N, C, H, W, boxes per image, spatial scale, window (px)
    ("C4/P4", 32, 256, 14, 14, 36, 1 / 16, 48),
    ("P3", 32, 256, 28, 28, 64, 1 / 8, 32),
)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}  # fmt: skip


def make_boxes(n, per_image, window, image=224.0, generator=None, device="cpu", dtype=None):
    """(n * per_image, 5) boxes, sorted by image, in input pixels."""
    g = generator
    r = n * per_image
    centre = torch.rand(r, 2, generator=g) * image
    side = window * (0.5 + 1.5 * torch.rand(r, 2, generator=g))
    idx = torch.arange(n).repeat_interleave(per_image)[:, None].float()
    boxes = torch.cat([idx, centre - side / 2, centre + side / 2], dim=1)
    return boxes.to(device=device, dtype=dtype or torch.float32)


def _time_once(fn, device, iters):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def time_fns(fns, device, iters, warmup, repeats):
    """{name: best-of-``repeats`` mean ms per call}; the candidates are interleaved per repeat so
    that a busy machine slows them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], _time_once(fn, device, iters))
    return best


def _prroi_step(feat, boxes, scale, grad_out, box_grad, boxes_per_image=None):
    inputs = (feat, boxes) if box_grad else (feat,)

    def step():
        out = prroi_pool(feat, boxes, 1, scale, boxes_per_image=boxes_per_image)
        return torch.autograd.grad(out, inputs, grad_out)

    return step


def _roi_align_step(feat, boxes, scale, grad_out, sampling_ratio):
    def step():
        out = roi_align(feat, boxes, 1, scale, sampling_ratio, aligned=False)
        return torch.autograd.grad(out, feat, grad_out)

    return step


def bench(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={device} ({dev_name})"
        f" dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}"
        f" iters={args.iters} repeats={args.repeats} box_grad={args.box_grad}"
        f" triton_weights={triton_available(device) and not args.box_grad}"
    )
    grads = "features and boxes (prroi_pool), features (roi_align)" if args.box_grad else "features"
    print(f"forward+backward (grad to {grads}), output 1x1, ms per call; ratio = roi_align / prroi")
    for name, n, c, h, w, per, scale, window in SHAPES:
        feat = torch.randn(n, c, h, w, generator=g).to(device=device, dtype=dtype)
        feat.requires_grad_(True)
        boxes = make_boxes(n, per, window, generator=g, device=device, dtype=dtype)
        boxes.requires_grad_(args.box_grad)
        grad_out = torch.randn(n * per, c, 1, 1, generator=g).to(device=device, dtype=dtype)
        boxes_nm4 = boxes.detach()[:, 1:].reshape(n, per, 4).requires_grad_(args.box_grad)
        fns = {
            "prroi": _prroi_step(feat, boxes, scale, grad_out, args.box_grad),
            "prroi_bpi": _prroi_step(feat, boxes, scale, grad_out, args.box_grad, per),
            "prroi_nm4": _prroi_step(feat, boxes_nm4, scale, grad_out, args.box_grad),
        }
        for ratio in (0, 2):
            try:
                step = _roi_align_step(feat, boxes.detach(), scale, grad_out, ratio)
                step()
                fns[ratio] = step
            except (RuntimeError, NotImplementedError) as e:  # e.g. no bfloat16 roi_align on CPU
                print(f"  roi_align(sr={ratio}) unavailable: {str(e).splitlines()[0][-80:]}")
        ms = time_fns(fns, device, args.iters, args.warmup, args.repeats)
        line = f"{name:6s} {n * per:5d} boxes on {n}x{c}x{h}x{w} scale 1/{round(1 / scale)}: "
        line += f"prroi_pool {ms['prroi']:8.3f} ms (boxes_per_image given: {ms['prroi_bpi']:.3f}"
        line += f", (N, M, 4) boxes: {ms['prroi_nm4']:.3f})"
        for ratio in (0, 2):
            if ratio in ms:
                line += f" | roi_align(sr={ratio}) {ms[ratio]:8.3f} ms"
                line += f", ratio {ms[ratio] / ms['prroi']:5.2f}x"
        print(line)


def check(args):
    """Max abs error of forward and gradients on ``--device`` (``--dtype``) vs CPU float64."""
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    dtypes = [args.dtype] if args.dtype != "all" else ["float32", "float64", "float16", "bfloat16"]
    print(
        f"check: {device} vs cpu float64 on the same (rounded) inputs; max abs error, values and "
        "grads are O(1)"
    )
    worst = 0.0
    for dname in dtypes:
        dtype = DTYPES[dname]
        for n, c, h, w, r, size, scale, aligned in [
            (2, 8, 9, 11, 40, (1, 1), 1.0, False),
            (3, 16, 14, 14, 60, (2, 3), 1 / 16, False),
            (4, 32, 28, 28, 100, (7, 7), 1 / 8, True),
            (2, 8, 13, 17, 50, (14, 5), 0.5, False),
        ]:
            feat = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
            lo = torch.tensor([-0.3 * w, -0.3 * h]) / scale
            hi = torch.tensor([1.3 * w, 1.3 * h]) / scale
            p = lo + (hi - lo) * torch.rand(r, 2, 2, generator=g, dtype=torch.float64)
            xy0, xy1 = torch.minimum(p[:, 0], p[:, 1]), torch.maximum(p[:, 0], p[:, 1])
            idx = torch.randint(0, n, (r, 1), generator=g).double()  # unsorted, uneven
            boxes = torch.cat([idx, xy0, xy1], dim=1)
            grad_out = torch.randn(r, c, *size, generator=g, dtype=torch.float64)
            box_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
            feat = feat.to(dtype).double()  # round the inputs once: measure the op's own error
            boxes = boxes.to(box_dtype).double()
            results = []
            for dev, dt in ((torch.device("cpu"), torch.float64), (device, dtype)):
                f = feat.to(dev, dt).requires_grad_(True)
                b = boxes.to(dev, dt if dt == torch.float64 else box_dtype)
                b.requires_grad_(True)
                out = prroi_pool(f, b, size, scale, aligned=aligned)
                gf, gb = torch.autograd.grad(out, (f, b), grad_out.to(dev, out.dtype))
                results.append([x.detach().double().cpu() for x in (out, gf, gb[:, 1:])])
            errs = [(a - b).abs().max().item() for a, b in zip(*results)]
            worst = max(worst, errs[0]) if dname in ("float32", "float64") else worst
            print(
                f"  {dname:8s} N={n} C={c} {h}x{w} R={r} out={size} scale={scale:.4g} "
                f"aligned={aligned}: forward {errs[0]:.2e}  grad features {errs[1]:.2e}  "
                f"grad boxes {errs[2]:.2e}"
            )
    print(f"worst float32/float64 forward error: {worst:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:k] (default cpu)")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=[*DTYPES, "all"],
        help="input dtype (half types accumulate in float32); 'all' only with --check",
    )
    ap.add_argument("--iters", type=int, default=None, help="timed calls per repeat")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first")
    ap.add_argument("--repeats", type=int, default=5, help="report the best of this many")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument(
        "--box-grad",
        action="store_true",
        help="also differentiate prroi_pool w.r.t. the boxes (roi_align cannot)",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="instead of timing, print max abs errors vs CPU float64",
    )
    args = ap.parse_args()  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.iters is None:
        args.iters = 200 if cuda else 10
    if args.warmup is None:
        args.warmup = 20 if cuda else 3
    if args.check:
        check(args)
    else:
        if args.dtype == "all":
            raise SystemExit("--dtype all only makes sense with --check")
        bench(args)


if __name__ == "__main__":
    main()
