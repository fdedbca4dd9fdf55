#!/usr/bin/env python
"""Full pre-training step (forward, backward, SGD update, momentum/queue) on synthetic two-view
batches: the MoCo-v2 baseline, ReSim-C4 and ReSim-FPN built from configs/pretrain, one process.

Prints images/s per model and the ratio to the MoCo-v2 step measured in the same process, at the
same settings (median over --repeats). Models are timed one after another, each alone on the
device; ``--order round-robin`` times them in turn within each repeat instead (robust to machine
drift, but the models then share the device's memory). Inputs are random uint8 views already on
the device with windows from the real view geometry (ImageNet-like 500x375 originals), so the
data pipeline is not measured here.

``--bn-group-images 0 32`` times every model with plain batch norm (0: one group per process, the
default) and with batch norm per group of 32 images (RESIM.BN_GROUP_IMAGES; MoCo models, SimSiam
ignores it), and prints the cost of the groups as a ratio of step times to the first value.

    python benchmarks/bench_pretrain_step.py --device cuda --batch 64 128 --bf16 --channels-last
    python benchmarks/bench_pretrain_step.py --device cpu --batch 8 --depth 18 --iters 3
    python benchmarks/bench_pretrain_step.py --device cuda --batch 128 --bf16 --channels-last \
        --bn-group-images 0 32
"""

import argparse
import statistics
import time

import numpy as np
import torch

import resim_d2  # noqa: F401
from resim_d2 import add_resim_config, get_config_file
from resim_d2.data.view_geometry import make_windows, sample_view_pair
from resim_d2.modeling.precision import CUDAGRAPH_MODES

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer

MODELS = {
    "mocov2": "pretrain/mocov2_in1k_200ep.yaml",
    "resim_c4": "pretrain/resim_c4_moco_in1k_200ep.yaml",
    "resim_fpn": "pretrain/resim_fpn_moco_in1k_200ep.yaml",
    # raw 256-channel FPN maps, no region head (the released code): what the heads cost
    "resim_fpn_released": "pretrain/resim_fpn_released_in1k_200ep.yaml",
    "simsiam": "pretrain/simsiam_in100_500ep.yaml",
    "resim_fpn_simsiam": "pretrain/resim_fpn_simsiam_in100_500ep.yaml",
}
DEFAULT_MODELS = ["mocov2", "resim_c4", "resim_fpn"]


def make_cfg(name, args, batch, bn_group_images=0):
    cfg = add_resim_config(get_cfg())
    cfg.merge_from_file(get_config_file(MODELS[name]))
    cfg.MODEL.DEVICE = args.device
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.RESIM.BN_GROUP_IMAGES = bn_group_images
    cfg.RESIM.MOCO.QUEUE_SIZE = batch * (65536 // batch)
    cfg.RESIM.SPEED.AMP_DTYPE = "bfloat16" if args.bf16 else ""
    cfg.RESIM.SPEED.CHANNELS_LAST = args.channels_last
    cfg.RESIM.SPEED.COMPILE = args.compile
    cfg.RESIM.SPEED.COMPILE_MODE = args.compile_mode
    if getattr(args, "view_size", None):  # count_step_flops.py has no --view-size: the config's
        cfg.RESIM.VIEWS.SIZE = args.view_size
    if args.depth != 50:
        cfg.MODEL.RESNETS.DEPTH = args.depth
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if args.depth < 50 else 256
    return cfg


def make_batch(cfg, batch, device, seed=0):
    rng = np.random.default_rng(seed)
    s = cfg.RESIM.VIEWS.SIZE
    region = cfg.RESIM.REGION
    out = []
    for _ in range(batch):
        crop_q, crop_k, flip = sample_view_pair(rng, (375, 500))
        windows = {}
        for f, w, st in zip(region.IN_FEATURES, region.WINDOW_SIZES, region.WINDOW_STRIDES):
            bq, bk, valid = make_windows(crop_q, crop_k, s, w, st)
            windows[f] = {
                "boxes_q": torch.from_numpy(bq).to(device),
                "boxes_k": torch.from_numpy(bk).to(device),
                "valid": torch.from_numpy(valid).to(device),
            }
        out.append(
            {
                "image_q": torch.randint(0, 256, (3, s, s), dtype=torch.uint8, device=device),
                "image_k": torch.randint(0, 256, (3, s, s), dtype=torch.uint8, device=device),
                "windows": windows if region.ENABLED else {},
            }
        )
    return out


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepTimer:
    """One model, its optimizer and a fixed batch; ``run(n)`` times n training steps."""

    def __init__(self, cfg, batch, args):
        torch.manual_seed(0)
        self.cfg, self.batch, self.args = cfg, batch, args
        self.model = build_model(cfg)
        self.model.train()
        self.opt = build_optimizer(cfg, self.model)
        self.data = make_batch(cfg, batch, args.device)

    def step(self):
        losses = self.model(self.data)
        loss = sum(losses.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def run(self, n):
        """Images/s over n steps (device synchronised before and after)."""
        sync(self.args.device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        sync(self.args.device)
        return self.batch * n / (time.perf_counter() - t0)

    def report(self):
        if self.args.compile:
            from torch._dynamo.utils import counters

            breaks = sum(counters["graph_break"].values())
            graphs = counters["stats"].get("unique_graphs", 0)
            print(f"  torch.compile: {graphs} graphs so far, {breaks} graph breaks", end="")
            if self.args.compile_mode in CUDAGRAPH_MODES:
                # inductor counts each graph it could not capture as a CUDA graph (the reason
                # is logged)
                print(f", {counters['inductor']['cudagraph_skips']} CUDA-graph skips", end="")
            print("".join(f"\n    break: {r[:150]}" for r in list(counters["graph_break"])[:5]))
        if self.args.profile:
            profile_steps(self.step, self.cfg, self.args)


def time_models(cfgs, batch, args):
    """{name: median images/s over the repeats}.

    ``--order sequential`` (default, and always under --compile): one model at a time, alone on
    the device, as a training process runs it. ``--order round-robin``: all models built
    together, every repeat timing each once in turn, so that drift of the machine cannot favour
    one of them (but they share the device's memory and caching allocator while timed).
    """
    names = list(cfgs)
    rates = {n: [] for n in names}
    one_at_a_time = args.compile or args.order == "sequential"
    for group in [[n] for n in names] if one_at_a_time else [names]:
        timers = {n: StepTimer(cfgs[n], batch, args) for n in group}
        for t in timers.values():
            t.run(args.warmup)
        for _ in range(args.repeats):
            for n in group:
                rates[n].append(timers[n].run(args.iters))
        for t in timers.values():
            t.report()
        del timers
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {n: statistics.median(r) for n, r in rates.items()}


def profile_steps(step, cfg, args, steps=3):
    """Print the operators that took the most device (or CPU) time over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(args.device)
    avg = prof.key_averages()
    keys = ["self_device_time_total", "self_cuda_time_total"] if cuda else ["self_cpu_time_total"]
    for key in keys:
        try:
            table = avg.table(sort_by=key, row_limit=args.profile)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    region = cfg.RESIM.REGION.IN_FEATURES if cfg.RESIM.REGION.ENABLED else "none"
    print(f"--- profile of {steps} steps, region features {region}")
    print(table)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--bf16", action="store_true", help="RESIM.SPEED.AMP_DTYPE bfloat16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument("--compile-mode", default="default", help="RESIM.SPEED.COMPILE_MODE")
    p.add_argument(
        "--order",
        default="sequential",
        choices=["sequential", "round-robin"],
        help="time the models one after another (alone on the device) or in turn per repeat",
    )
    p.add_argument(
        "--bn-group-images",
        type=int,
        nargs="+",
        default=[0],
        metavar="N",
        help="RESIM.BN_GROUP_IMAGES values to time each model with (0: plain batch norm, one group "
        "per process); ratios to the first value are printed",
    )
    p.add_argument("--view-size", type=int, default=224, help="RESIM.VIEWS.SIZE (pixels)")
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--profile", type=int, default=0, metavar="ROWS", help="print the top ROWS operators"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    mode = "bf16" if args.bf16 else "fp32"
    mode += "+channels_last" if args.channels_last else ""
    mode += f"+compile({args.compile_mode})" if args.compile else ""
    mode += " order=round-robin" if args.order == "round-robin" and not args.compile else ""
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device={dev} torch={torch.__version__} R{args.depth} {args.view_size}px mode={mode}")
    groups = args.bn_group_images
    for batch in args.batch:
        cfgs = {(n, g): make_cfg(n, args, batch, g) for g in groups for n in args.models}
        rates = time_models(cfgs, batch, args)
        for name, g in cfgs:
            # the baseline: MoCo-v2 if timed, else the first model (e.g. simsiam)
            ref = "mocov2" if "mocov2" in args.models else args.models[0]
            r, base = rates[(name, g)], rates[(ref, g)]
            ratio = f"  {r / base:.3f}x of {ref} ({base / r:.3f}x its step time)"
            label = name if len(groups) == 1 else f"{name} bn/{g}"
            if (name, g) != (name, groups[0]):  # the groups' cost against the first setting
                plain = rates[(name, groups[0])]
                ratio += f"; {plain / r:.3f}x the step time of bn/{groups[0]}"
            print(f"batch {batch:4d} {label:24s} {r:9.1f} img/s{ratio}")


if __name__ == "__main__":
    main()
