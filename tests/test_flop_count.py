"""benchmarks/count_step_flops.py charges each op to the right part, forward and backward.

Reference: convolution FLOPs by hand (2 per multiply-add; the backward of a conv computes the
input gradient and the weight gradient, each as costly as the forward, the input gradient only
when the input needs one).
"""

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
count_step_flops = pytest.importorskip("count_step_flops")


def conv_flops(n, cin, cout, k, h, w):
    return 2 * n * cin * cout * k * k * h * w


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.res2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)

    def forward(self, x):
        return self.res2(self.stem(x))


class Toy(nn.Module):
    """The trunk's output feeds two consumers (an FPN conv and a region head), then a functional
    matmul: the shape that misleads torch's module tracker in backward."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.bottom_up = Trunk()
        self.backbone.fpn_output3 = nn.Conv2d(8, 4, 1, bias=False)
        self.region_heads = nn.ModuleDict({"p3": nn.Conv2d(8, 4, 3, padding=1, bias=False)})

    def forward(self, x):
        c = self.backbone.bottom_up(x)
        a = self.backbone.fpn_output3(c)
        b = self.region_heads["p3"](c)
        a, b = a.flatten(1), b.flatten(1)
        return (a @ b.t()).sum()


def test_parts_forward_and_backward_match_hand_counts():
    n, h, w = 2, 6, 5
    model = Toy()
    x = torch.randn(n, 3, h, w)
    with count_step_flops.PartFlopCounter(model) as counter:
        model(x).backward()
    got = dict(counter.part_flops)
    stem, res2 = conv_flops(n, 3, 8, 3, h, w), conv_flops(n, 8, 8, 3, h, w)
    fpn, head = conv_flops(n, 8, 4, 1, h, w), conv_flops(n, 8, 4, 3, h, w)
    mm = 2 * n * n * (4 * h * w)
    assert got[("ResNet, query (fwd+bwd)", "fwd")] == stem + res2
    # stem: weight gradient only (the image needs none); res2: input and weight gradients
    assert got[("ResNet, query (fwd+bwd)", "bwd")] == stem + 2 * res2
    assert got[("FPN convs, query", "fwd")] == fpn
    assert got[("FPN convs, query", "bwd")] == 2 * fpn
    assert got[("region heads, query", "fwd")] == head
    assert got[("region heads, query", "bwd")] == 2 * head
    # a @ b.t() forward; backward: one matmul for each operand's gradient
    assert got[("pooling, losses, rest", "fwd")] == mm
    assert got[("pooling, losses, rest", "bwd")] == 2 * mm
    assert sum(got.values()) == counter.get_total_flops()


def test_part_names_follow_the_meta_architecture():
    part_of = count_step_flops.part_of
    assert part_of("backbone.bottom_up") == "ResNet, query (fwd+bwd)"
    assert part_of("backbone.res4") == "ResNet, query (fwd+bwd)"  # ReSim-C4: the ResNet itself
    assert part_of("backbone_k.fpn_lateral3") == "FPN convs, key"
    assert part_of("region_heads_k.p3") == "region heads, key"
    assert part_of("global_head_k") == "global heads"
    assert part_of("region_mlps.p3.pred") == "region MLPs"
    assert part_of("region_mlps.p3") is None  # a ModuleDict, never called
    assert part_of("backbone.bottom_up.res2") is None  # inside a part: charged to the part
    assert part_of("") is None


def test_meta_device_counts_what_the_cpu_runs():
    """The benchmark's default "meta" device (shapes only) gives the FLOPs of a real CPU step."""
    args = type("Args", (), {})()
    args.batch, args.depth = 2, 18
    args.bf16 = args.channels_last = args.compile = False
    args.compile_mode = "default"
    got = {}
    for device in ("cpu", "meta"):
        args.device = device
        parts, total, fwd, _ = count_step_flops.count("resim_c4", args)
        got[device] = (parts, total, fwd)
    assert got["meta"] == got["cpu"]
    assert got["cpu"][0]["region heads, query"] > 0
