#!/usr/bin/env python
"""Pairs per second of the CPU and the GPU view path, and end-to-end ReSim-FPN training images/s.

    python benchmarks/bench_gpu_views.py [--folder DIR] [--device cuda|cpu] [--workers N]
        [--batch 128] [--iters 20] [--warmup 5] [--train] [--depth 50] [--decode auto]

Both paths run in this one process, one after the other, on the same JPEG files and the same
stream (seed 0), with ``--workers`` dataloader workers each:

* cpu: :func:`build_pretrain_train_loader` (TwoViewMapper in the workers); each batch's views are
  stacked and copied to the device, as ``ReSim.preprocess_image`` does;
* gpu: :func:`build_gpu_pretrain_loader` (workers read files and draw parameters; decoding, crops,
  flips, colour and blur on the device, ``RESIM.GPU_VIEWS.PREFETCH`` batches ahead);
* gpu views alone: ``GPUViews`` on already-collated batches, no workers: what the device side can
  deliver when the workers keep up.

``--train`` adds training steps of ReSim-FPN (``configs/pretrain/resim_fpn_moco_in1k_200ep.yaml``,
ResNet-``--depth``, bf16 autocast via ``RESIM.SPEED.AMP_DTYPE``, channels-last, SGD) at batch
``--batch``: on one fixed batch (the model alone), and fed by each path. Rates are pairs (images)
per second of wall-clock time, timed after ``--warmup`` batches, the device synchronised at the
end. Without ``--folder`` the scikit-image demo photographs are written as ImageNet-like JPEGs
(about 500 x 375, quality 90) into a temporary folder. Results: docs/benchmarks.md.
"""

import argparse
import gc
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

# isort: off
import resim_d2  # noqa: F401  (applies the detectron2 compat fixes first)
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer

# isort: on

from resim_d2 import add_resim_config
from resim_d2.config import get_config_file
from resim_d2.data.build import build_pretrain_train_loader
from resim_d2.data.datasets import (
    DEMO_TRAIN_IMAGES,
    DEMO_VAL_IMAGES,
    load_demo_images,
    load_image_folder,
)
from resim_d2.data.gpu_loader import build_gpu_pretrain_loader, resolve_decode

IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (400, 300))


def write_demo_jpegs(folder: str, count: int, seed: int = 0) -> None:
    """``count`` JPEGs made from scikit-image's photographs: random crops at ImageNet-like sizes."""
    rng = np.random.default_rng(seed)
    sources = [
        Image.open(r["file_name"]).convert("RGB")
        for r in load_demo_images(DEMO_TRAIN_IMAGES + DEMO_VAL_IMAGES)
    ]
    for i in range(count):
        src = sources[i % len(sources)]
        w, h = IMAGENET_SIZES[int(rng.integers(len(IMAGENET_SIZES)))]
        s = rng.uniform(0.6, 1.0)  # a random crop of the photograph with the target's aspect
        cw = min(src.width, int(src.height * w / h)) * s
        ch = cw * h / w
        x0 = rng.uniform(0, src.width - cw)
        y0 = rng.uniform(0, src.height - ch)
        image = src.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def make_cfg(args):
    cfg = get_cfg()
    add_resim_config(cfg)
    cfg.merge_from_file(get_config_file("pretrain/resim_fpn_moco_in1k_200ep.yaml"))
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.RESNETS.DEPTH = args.depth
    if args.depth < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.SOLVER.IMS_PER_BATCH = args.batch
    cfg.SOLVER.BASE_LR = 0.03 * args.batch / 256
    cfg.RESIM.MOCO.QUEUE_SIZE = args.batch * max(1, 65536 // args.batch)
    cfg.DATALOADER.NUM_WORKERS = args.workers
    cfg.RESIM.VIEWS.SIZE = args.size
    cfg.RESIM.SPEED.AMP_DTYPE = "" if args.amp == "none" else args.amp
    cfg.RESIM.SPEED.CHANNELS_LAST = not args.no_channels_last
    cfg.RESIM.SPEED.COMPILE = args.compile
    cfg.RESIM.GPU_VIEWS.DECODE = args.decode
    cfg.RESIM.GPU_VIEWS.PREFETCH = args.prefetch
    cfg.SEED = 0
    return cfg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batch, device):
    """What ReSim.preprocess_image does with a CPU-path batch: stack the views, copy them over."""
    for key in ("image_q", "image_k"):
        torch.stack([d[key] for d in batch]).to(device, non_blocking=True)


def time_loader(make_loader, args, device, consume):
    """Pairs/s of a loader: warm-up batches, then ``--iters`` timed ones."""
    loader = make_loader()
    it = iter(loader)
    for _ in range(args.warmup):
        consume(next(it))
    sync(device)
    t = time.perf_counter()
    for _ in range(args.iters):
        consume(next(it))
    sync(device)
    rate = args.iters * args.batch / (time.perf_counter() - t)
    del it, loader
    gc.collect()
    return rate


def time_views_alone(cfg, records, args, device):
    """Pairs/s of GPUViews on batches the workers collated beforehand."""
    loader = build_gpu_pretrain_loader(cfg, dataset=records, seed=0)
    packed = []
    for p in loader.data_loader:
        packed.append(p)
        if len(packed) == min(args.iters, 8):
            break
    views = loader.views
    for p in packed[: min(2, len(packed))]:
        views(p)
    sync(device)
    t = time.perf_counter()
    n = 0
    while n < args.iters:
        views(packed[n % len(packed)])
        n += 1
    sync(device)
    rate = n * args.batch / (time.perf_counter() - t)
    del loader, packed
    gc.collect()
    return rate


def train_rate(cfg, batches, args, device):
    """Images/s of ReSim training steps fed by ``batches`` (an iterator of list[dict])."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)

    def step(model, optimizer):
        losses = model(next(batches))
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step(model, optimizer)
    sync(device)
    t = time.perf_counter()
    for _ in range(args.iters):
        step(model, optimizer)
    sync(device)
    rate = args.iters * args.batch / (time.perf_counter() - t)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rate


def repeat(batch):
    while True:
        yield batch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="folder of images (default: demo photographs as JPEGs)")
    parser.add_argument("--num-images", type=int, default=512, help="JPEGs written by default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--size", type=int, default=224, help="view side")
    parser.add_argument("--decode", default="auto", choices=("auto", "device", "worker"))
    parser.add_argument("--prefetch", type=int, default=1, help="RESIM.GPU_VIEWS.PREFETCH")
    parser.add_argument("--paths", default="cpu,gpu", help="which loaders to time: cpu,gpu")
    parser.add_argument("--train", action="store_true", help="also time ReSim-FPN training")
    parser.add_argument("--depth", type=int, default=50, help="ResNet depth for --train")
    parser.add_argument("--amp", default="bfloat16", choices=("bfloat16", "none"))
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="RESIM.SPEED.COMPILE")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        device = torch.device("cuda", torch.cuda.current_device())
    folder = args.folder
    if folder is None:
        folder = tempfile.mkdtemp(prefix="resim_bench_gpu_views_")
        write_demo_jpegs(folder, args.num_images)
    records = load_image_folder(folder)
    sizes = [Image.open(r["file_name"]).size for r in records[:200]]
    cfg = make_cfg(args)
    paths = args.paths.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{len(records)} images in {folder} (median {int(np.median([s[0] for s in sizes]))}x"
        f"{int(np.median([s[1] for s in sizes]))}); device {name}; {os.cpu_count()} CPUs, "
        f"{args.workers} workers; batch {args.batch}, {args.iters} timed after {args.warmup}; "
        f"torch {torch.__version__}, torchvision {__import__('torchvision').__version__}; "
        f"decode on {resolve_decode(args.decode, device)}; prefetch {args.prefetch}"
    )
    rates = {}
    if "cpu" in paths:
        rates["cpu path (TwoViewMapper, DataLoader)"] = time_loader(
            lambda: build_pretrain_train_loader(cfg, dataset=records, seed=0),
            args,
            device,
            lambda b: to_device(b, device),
        )
    if "gpu" in paths:
        rates["gpu path (build_gpu_pretrain_loader)"] = time_loader(
            lambda: build_gpu_pretrain_loader(cfg, dataset=records, seed=0),
            args,
            device,
            lambda b: None,
        )
        rates["gpu views alone (collated batches)"] = time_views_alone(cfg, records, args, device)
    for label, rate in rates.items():
        print(f"{label:42s} {rate:9.1f} pairs/s")
    if not args.train:
        return
    print(
        f"ReSim-FPN R{args.depth}, amp {args.amp}, channels_last {not args.no_channels_last}, "
        f"compile {args.compile}, batch {args.batch}:"
    )
    (fixed,) = [next(iter(build_gpu_pretrain_loader(cfg, dataset=records, seed=1)))]
    train = {"model alone (one fixed batch)": train_rate(cfg, repeat(fixed), args, device)}
    for d in fixed:  # the same batch with the windows on the host, as the cpu path gives them
        d["windows"] = {f: {k: v.cpu() for k, v in w.items()} for f, w in d["windows"].items()}
    train["model alone, windows on the host"] = train_rate(cfg, repeat(fixed), args, device)
    del fixed
    if "cpu" in paths:
        loader = build_pretrain_train_loader(cfg, dataset=records, seed=0)
        train["end-to-end, cpu path"] = train_rate(cfg, iter(loader), args, device)
        del loader
    if "gpu" in paths:
        loader = build_gpu_pretrain_loader(cfg, dataset=records, seed=0)
        train["end-to-end, gpu path"] = train_rate(cfg, iter(loader), args, device)
        del loader
    for label, rate in train.items():
        print(f"{label:42s} {rate:9.1f} images/s")


if __name__ == "__main__":
    main()
