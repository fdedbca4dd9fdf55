#!/usr/bin/env python
"""Arithmetic of one pre-training step (forward, backward) per image, by part of the model.

Counts the floating-point operations of matrix multiplies and convolutions (torch's
``FlopCounterMode``: 2 per multiply-add, forward and backward as actually run, so the key encoder
counts forward only) for the MoCo-v2 baseline and the ReSim variants built from configs/pretrain,
in one process, and prints them per image with the ratio to MoCo-v2. A ratio here is the step-time
ratio a device would show if every part ran at the same FLOP/s. To be faster than that, ReSim's
extra work must run at a higher FLOP/s than the MoCo-v2 step does on average: that is what to hold
a "ReSim within X of MoCo-v2" target against (for X = 1.10 and ReSim's extra FLOPs E, as a fraction
of MoCo-v2's, the extra work must run E / 0.10 times as fast). Also counts aten operators per part
(a proxy for launch-bound steps). No timing: by default the step runs on PyTorch's "meta" device
(shapes only, no arithmetic, no memory), so batch 128 of ResNet-50 takes seconds anywhere;
``--device cpu`` runs it for real and gives the same FLOPs.

    python benchmarks/count_step_flops.py --batch 128           # R50, 224px
    python benchmarks/count_step_flops.py --models mocov2 resim_fpn resim_fpn_released

Parts: the ResNet of the query and of the key encoder, the FPN's lateral and output convs, the
region heads (and SimSiam's region MLPs), the global heads (MoCo MLP, SimSiam projector and
predictor) and the rest (region pooling, the losses' similarity matrices). The rest grows with the
batch (negatives are the batch's windows): give the batch you train with per process.
"""

import argparse
import re
from collections import defaultdict

import torch
from bench_pretrain_step import MODELS, make_batch, make_cfg
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import resim_d2  # noqa: F401

from detectron2.modeling import build_model

DEFAULT_MODELS = ["mocov2", "resim_c4", "resim_fpn", "resim_fpn_released"]

PARTS = (
    "ResNet, query (fwd+bwd)",
    "ResNet, key (fwd)",
    "FPN convs, query",
    "FPN convs, key",
    "region heads, query",
    "region heads, key",
    "region MLPs",
    "global heads",
    "pooling, losses, rest",
)


def part_of(name: str):
    """The part a module (by its name in the model) is charged to, or None for none of its own.

    Only modules at one depth are parts: for the encoders ``backbone[_k].<child>`` (ResNet stages,
    ``bottom_up``, ``fpn_*``), for the region heads and MLPs ``<dict>.<level>``, for the global
    heads the head itself (SimSiam's region MLPs: ``region_mlps.<level>.<proj|pred>``).
    Everything else (the meta-architecture's own functional code) is "rest".
    """
    pieces = name.split(".")
    if len(pieces) == 2 and pieces[0] in ("backbone", "backbone_k"):
        side = "query" if pieces[0] == "backbone" else "key"
        if pieces[1].startswith("fpn_"):
            return f"FPN convs, {side}"
        return "ResNet, query (fwd+bwd)" if side == "query" else "ResNet, key (fwd)"
    if len(pieces) == 2 and pieces[0] == "region_heads":
        return "region heads, query"
    if len(pieces) == 2 and pieces[0] == "region_heads_k":
        return "region heads, key"
    if len(pieces) == 3 and pieces[0] == "region_mlps":  # region_mlps.<level>.{proj,pred}
        return "region MLPs"
    if len(pieces) == 1 and re.fullmatch(r"global_head(_k)?|predictor", pieces[0]):
        return "global heads"
    return None


def _tensors(obj):
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


class PartFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that also charges every counted op to a part of ``model``.

    Forward ops go to the innermost running module that is a part (module hooks). Backward ops go
    to the part whose forward created the autograd node that runs them: each part's forward tags
    the nodes between its inputs and its outputs. (torch's own module attribution of backward ops
    is unreliable when a module's outputs feed several others, as a ResNet's do an FPN.) Op
    counts that no part claims are "rest". ``part_flops[(part, "fwd" | "bwd")]``;
    ``part_ops`` the same for the number of aten operators that are not views (each a kernel
    launch on a GPU, roughly: a proxy for launch-bound steps).
    """

    def __init__(self, model: torch.nn.Module, part_of=part_of):
        super().__init__(display=False, depth=1)
        self.module_part = {m: part_of(n) for n, m in model.named_modules() if part_of(n)}
        self.node_part = {}
        self.part_flops = defaultdict(int)
        self.part_ops = defaultdict(int)
        self._stack = []
        self._handles = []

    def _pre(self, module, inputs):
        if module in self.module_part:
            stops = {t.grad_fn for t in _tensors(inputs) if t.grad_fn is not None}
            self._stack.append((self.module_part[module], stops))

    def _post(self, module, inputs, output):
        if module not in self.module_part:
            return
        part, stops = self._stack.pop()
        todo = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        seen = set()
        while todo:
            node = todo.pop()
            if node is None or node in stops or node in seen:
                continue
            seen.add(node)
            self.node_part.setdefault(node, part)  # nodes of inner parts keep their part
            todo.extend(n for n, _ in node.next_functions)

    def __enter__(self):
        from torch.nn.modules import module as nn_module

        self._handles = [
            nn_module.register_module_forward_pre_hook(self._pre),
            nn_module.register_module_forward_hook(self._post),
        ]
        return super().__enter__()

    def __exit__(self, *args):
        for h in self._handles:
            h.remove()
        return super().__exit__(*args)

    def _count_flops(self, func_packet, out, args, kwargs):
        # called by FlopCounterMode's dispatch mode for every operator, counted or not
        node = torch._C._current_autograd_node()
        if node is not None:
            key = (self.node_part.get(node, "pooling, losses, rest"), "bwd")
        else:
            key = (self._stack[-1][0] if self._stack else "pooling, losses, rest", "fwd")
        if func_packet in self.flop_registry:
            self.part_flops[key] += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
        if not _is_view(func_packet):
            self.part_ops[key] += 1
        return super()._count_flops(func_packet, out, args, kwargs)


def _is_view(func_packet) -> bool:
    """Whether an aten operator only makes a view or reads metadata (no kernel of its own)."""
    if func_packet in (torch.ops.aten.detach, torch.ops.aten.lift_fresh):
        return True
    overloads = func_packet.overloads()
    return bool(overloads) and getattr(func_packet, overloads[0]).is_view


def count(name, args):
    """One step of model ``name``: ({part: FLOPs per image}, FLOPs per image, forward FLOPs per
    image, {part: aten operators in the step})."""
    cfg = make_cfg(name, args, args.batch)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    data = make_batch(cfg, args.batch, args.device)
    with PartFlopCounter(model) as counter:
        losses = model(data)
        sum(losses.values()).backward()
    total = counter.get_total_flops()  # = sum of part_flops: every counted op goes to a part
    parts = defaultdict(int)
    for (part, _), n in counter.part_flops.items():
        parts[part] += n
    fwd = sum(n for (_, d), n in counter.part_flops.items() if d == "fwd")
    ops = defaultdict(int)
    for (part, _), n in counter.part_ops.items():
        ops[part] += n
    b = args.batch
    return {k: v / b for k, v in parts.items()}, total / b, fwd / b, ops


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--batch", type=int, default=128, help="images per process")
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--device", default="meta", help="meta (shapes only) or a real device")
    args = p.parse_args()
    args.bf16 = args.channels_last = args.compile = False
    args.compile_mode = "default"
    results = {name: count(name, args) for name in args.models}
    names = list(results)
    print(f"GFLOP per image, one training step, R{args.depth}, 224px, batch {args.batch}")
    print(f"{'part':26s}" + "".join(f"{n:>20s}" for n in names))
    for part in PARTS:
        if any(results[n][0].get(part, 0) for n in names):
            row = "".join(f"{results[n][0].get(part, 0) / 1e9:20.3f}" for n in names)
            print(f"{part:26s}{row}")
    print(f"{'total':26s}" + "".join(f"{results[n][1] / 1e9:20.3f}" for n in names))
    print(f"{'  of which forward':26s}" + "".join(f"{results[n][2] / 1e9:20.3f}" for n in names))
    base = results.get("mocov2")
    if base:
        ratios = "".join(f"{results[n][1] / base[1]:19.3f}x" for n in names)
        print(f"{'ratio to mocov2':26s}{ratios}")
    print(
        "\naten operators per step, forward + backward (views excluded; on a GPU roughly one kernel"
    )
    print("launch each, but PrRoIPool's weights are one Triton kernel there and many ops here)")
    for part in PARTS:
        if any(results[n][3].get(part, 0) for n in names):
            print(f"{part:26s}" + "".join(f"{results[n][3].get(part, 0):20d}" for n in names))
    print(f"{'total':26s}" + "".join(f"{sum(results[n][3].values()):20d}" for n in names))


if __name__ == "__main__":
    main()
