#!/usr/bin/env python
"""Views per second per worker: TwoViewMapper vs. a plain two-crop MoCo-v2 torchvision pipeline.

    python benchmarks/bench_data_pipeline.py [--images N] [--rounds R] [--dataset NAME]
        [--features res4 | p3,p4]

Both pipelines run in this one process (no DataLoader workers, one torch thread), on the same image
files, and both decode every image from disk. The baseline is MoCo-v2's augmentation applied twice
(``TwoCropsTransform``): RandomResizedCrop(224, scale=(0.2, 1)), RandomApply(ColorJitter(.4, .4, .4,
.1), p=.8), RandomGrayscale(.2), RandomApply(GaussianBlur(sigma in [.1, 2]) via PIL, p=.5),
RandomHorizontalFlip, ToTensor. Rounds alternate between the two pipelines so that machine noise
hits both alike. Rates are views per CPU second of this process (what one worker delivers, little
affected by other load on the machine) and per wall-clock second; each is the median over rounds.
Target: ratio >= 0.9.
"""

import argparse
import os
import random
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageFilter

# isort: off
import resim_d2  # noqa: F401  (applies the detectron2 compat fixes first)
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

# isort: on

from resim_d2 import add_resim_config
from resim_d2.data.two_view_mapper import TwoViewMapper


class PILGaussianBlur:
    """MoCo-v2's GaussianBlur: PIL ImageFilter.GaussianBlur with a random sigma."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def moco_v2_two_crops():
    from torchvision import transforms

    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(224, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )

    def run(file_name):
        with open(file_name, "rb") as f:
            image = Image.open(f).convert("RGB")  # torchvision's pil_loader
        return augment(image), augment(image)

    return run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="resim_demo_images", help="a registered dataset")
    parser.add_argument("--images", type=int, default=60, help="images per round and pipeline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--features", default="p3,p4", help="region features: res4 or p3,p4")
    parser.add_argument(
        "--jpeg",
        action="store_true",
        help="re-encode the images as JPEG (quality 90) first, as ImageNet",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    cfg = get_cfg()
    add_resim_config(cfg)
    features = args.features.split(",")
    cfg.RESIM.REGION.IN_FEATURES = features
    cfg.RESIM.REGION.WINDOW_SIZES = [32 if f == "p3" else 48 for f in features]
    cfg.RESIM.REGION.WINDOW_STRIDES = [24 if f == "p3" else 32 for f in features]
    mapper = TwoViewMapper(cfg, is_train=True, seed=0)
    baseline = moco_v2_two_crops()
    records = DatasetCatalog.get(args.dataset)
    sources = [r["file_name"] for r in records]
    if args.jpeg:
        tmp = tempfile.mkdtemp(prefix="resim_bench_")
        for i, src in enumerate(sources):
            sources[i] = os.path.join(tmp, f"{i:03d}.jpg")
            Image.open(src).convert("RGB").save(sources[i], quality=90)
    files = [sources[i % len(sources)] for i in range(args.images)]
    print(
        f"{len(records)} images of {args.dataset}{' as JPEG' if args.jpeg else ''}, "
        f"{args.images} per round, {args.rounds} rounds"
    )
    print(f"resim mapper: {mapper}")

    def rate(fn):
        """(views per CPU second of this process, views per wall-clock second)."""
        cpu, wall = time.process_time(), time.perf_counter()
        for f in files:
            fn(f)
        views = 2 * len(files)  # two views per image
        return views / (time.process_time() - cpu), views / (time.perf_counter() - wall)

    ours_fn = lambda f: mapper({"file_name": f})  # noqa: E731
    rate(ours_fn), rate(baseline)  # warm-up (file cache, lazy imports)
    ours, base = [], []
    for _ in range(args.rounds):
        base.append(rate(baseline))
        ours.append(rate(ours_fn))
    for label, rates in (("moco-v2 two-crop torchvision", base), ("resim TwoViewMapper", ours)):
        per_round = ", ".join(f"{r[0]:.0f}" for r in rates)
        print(
            f"{label + ':':30s}{statistics.median(r[0] for r in rates):7.1f} views/CPU-s "
            f"(rounds: {per_round}); {statistics.median(r[1] for r in rates):7.1f} views/wall-s"
        )
    ours_med = statistics.median(r[0] for r in ours)
    base_med = statistics.median(r[0] for r in base)
    wall_ratio = statistics.median(o[1] / b[1] for o, b in zip(ours, base))
    print(
        f"ratio resim / moco-v2: {ours_med / base_med:.3f} per CPU-second, "
        f"{wall_ratio:.3f} wall-clock (median of per-round ratios); target >= 0.9"
    )
    valid = np.mean(
        [mapper({"file_name": f})["windows"][features[-1]]["valid"].float().mean() for f in files]
    )
    print(f"(mean valid fraction of the {features[-1]} windows: {valid:.2f})")


if __name__ == "__main__":
    main()
