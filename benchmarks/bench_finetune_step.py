#!/usr/bin/env python
"""Fine-tuning step rate of Faster R-CNN R50-C4 (the VOC detector), fp32 vs mixed precision.

One process, one device, detectron2's own training loops on synthetic data:

* ``fp32``: :class:`detectron2.engine.SimpleTrainer` (detectron2's default);
* ``amp_fp16``: :class:`detectron2.engine.AMPTrainer`, i.e. ``SOLVER.AMP.ENABLED: True`` (float16
  autocast + GradScaler; CUDA only, as detectron2 asserts);
* ``bf16``: the same loop under ``torch.autocast(dtype=torch.bfloat16)``, no scaler.

Each mode builds the model afresh from the same seed and config and trains on the same batch of
``--batch`` random uint8 images of ``--size`` H W with 2-5 random boxes each (already on the device,
so the data loader is not measured; the RPN/ROI sampling, losses, backward, SGD update and
detectron2's per-step metric sync are). Prints images/s per mode and the ratio to fp32.

    python benchmarks/bench_finetune_step.py --device cuda                 # 600x800, batch 4
    # CPU smoke run: the res5 head on 512 RoIs/image dominates (~1 min/step at 320x416, 2 cores)
    python benchmarks/bench_finetune_step.py --device cpu --size 256 320 --batch 2 --iters 2 \
        MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 32
"""

import argparse
import itertools
import os
import statistics
import time

import torch

import resim_d2  # noqa: F401  (first: adapts detectron2, registers resim_d2's heads)
from resim_d2 import add_resim_config, get_config_file

from detectron2.config import get_cfg
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

DEFAULT_CONFIG = "finetune/voc_R50_C4_24k.yaml"
FALLBACK_CONFIG = "finetune/Base-RCNN-C4.yaml"
MODES = ("fp32", "amp_fp16", "bf16")


class BF16Trainer(SimpleTrainer):
    """SimpleTrainer whose forward (and loss) runs under bfloat16 autocast; fp32 master weights."""

    def run_step(self):
        assert self.model.training, "[BF16Trainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def make_cfg(args):
    cfg = add_resim_config(get_cfg())
    try:
        path = get_config_file(args.config)
    except FileNotFoundError:
        if args.config != DEFAULT_CONFIG:
            raise
        path = get_config_file(FALLBACK_CONFIG)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = args.num_classes
    cfg.SOLVER.IMS_PER_BATCH = args.batch
    # speed does not depend on the rate; a small one keeps random-init training finite
    cfg.SOLVER.BASE_LR = args.lr
    if args.depth != 50:
        cfg.MODEL.RESNETS.DEPTH = args.depth
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if args.depth < 50 else 256
    cfg.merge_from_list(args.opts)
    return cfg, path


def make_batch(batch, size, num_classes, device, seed=0):
    """``batch`` detectron2 training dicts: uint8 image (3, H, W) and 2-5 random gt boxes."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    out = []
    for _ in range(batch):
        n = int(torch.randint(2, 6, (1,), generator=g))
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5]) + 16
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        out.append(
            {"image": image.to(device), "instances": inst.to(device), "height": h, "width": w}
        )
    return out


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_mode(mode, cfg, data, args):
    """Median images/s of ``args.repeats`` runs of ``args.iters`` steps, after warm-up."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    loader = itertools.repeat(data)
    if mode == "fp32":
        trainer = SimpleTrainer(model, loader, optimizer)
    elif mode == "amp_fp16":
        trainer = AMPTrainer(model, loader, optimizer)
    else:
        trainer = BF16Trainer(model, loader, optimizer)
    rates = []
    with EventStorage(0) as storage:
        for _ in range(args.warmup):
            trainer.run_step()
            storage.step()
        sync(args.device)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.iters):
                trainer.run_step()
                storage.step()
            sync(args.device)
            rates.append(len(data) * args.iters / (time.perf_counter() - t0))
        loss = storage.history("total_loss").latest()
    del trainer, model, optimizer
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return statistics.median(rates), loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, nargs=2, default=[600, 800], metavar=("H", "W"))
    p.add_argument("--iters", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="under configs/ (fallback: Base C4)")
    p.add_argument("--num-classes", type=int, default=20, help="VOC: 20")
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = True
    cfg, path = make_cfg(args)
    dev = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device={dev} torch={torch.__version__} config={os.path.relpath(path)} "
        f"R{cfg.MODEL.RESNETS.DEPTH} norm={cfg.MODEL.RESNETS.NORM} "
        f"roi_heads={cfg.MODEL.ROI_HEADS.NAME} "
        f"({cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE} RoIs/img) "
        f"{args.size[0]}x{args.size[1]} batch={args.batch} iters={args.iters}x{args.repeats} "
        f"warmup={args.warmup} cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} "
        f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}"
    )
    data = make_batch(args.batch, tuple(args.size), args.num_classes, args.device)
    rates = {}
    for mode in args.modes:
        if mode == "amp_fp16" and not cuda:
            print(f"{mode:9s}       n/a  (detectron2's AMPTrainer requires CUDA)")
            continue
        rate, loss = time_mode(mode, cfg, data, args)
        rates[mode] = rate
        base = rates.get("fp32")
        ratio = f"  {rate / base:.3f}x fp32" if base else ""
        print(
            f"{mode:9s} {rate:9.2f} img/s  ({1000 * args.batch / rate:8.1f} ms/step){ratio}  "
            f"last total_loss {loss:.3f}"
        )


if __name__ == "__main__":
    main()
