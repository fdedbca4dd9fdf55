"""Tiny ReSim pre-training models on the CPU: configs built in code, synthetic two-view batches
with their windows mapped query -> key, and the loss detectron2's trainer sums."""

import torch
import torch.nn.functional as F

import resim_d2  # noqa: F401  (compat + registers ReSim)
from resim_d2 import add_resim_config

from detectron2.config import get_cfg
from detectron2.modeling import build_model

S = 64  # view side used by these tests


def tiny_resim_cfg(arch="c4", framework="moco", region=True):
    """A ReSim pre-training config built in code: ResNet-18 encoders, narrow heads, batch 4, on
    the CPU, windows sized for :func:`make_batch`'s S-px views; ``arch`` "c4" (region loss on res4)
    or "fpn" (on p3 and p4)."""
    cfg = get_cfg()
    add_resim_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "ReSim"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    rn = cfg.MODEL.RESNETS
    rn.DEPTH = 18
    rn.RES2_OUT_CHANNELS = 64
    rn.STRIDE_IN_1X1 = False
    rn.NORM = "BN"
    r = cfg.RESIM
    if arch == "c4":
        cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
        rn.OUT_FEATURES = ["res4", "res5"]
        r.REGION.IN_FEATURES = ["res4"]
        r.REGION.WINDOW_SIZES = [32]
        r.REGION.WINDOW_STRIDES = [16]
        r.REGION.LOSS_WEIGHTS = [1.0]
        r.REGION.NEG_POOL_KERNELS = [2]
        r.REGION.GATHER_NEGATIVES = [True]
    else:
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        rn.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.OUT_CHANNELS = 32
        r.REGION.IN_FEATURES = ["p3", "p4"]
        r.REGION.WINDOW_SIZES = [16, 32]
        r.REGION.WINDOW_STRIDES = [12, 16]
        r.REGION.LOSS_WEIGHTS = [1.0, 0.5]
        r.REGION.NEG_POOL_KERNELS = [2, 2]
        r.REGION.GATHER_NEGATIVES = [False, True]
        r.REGION.NEG_GROUP_IMAGES = [0, 0]
    r.REGION.ENABLED = region
    r.REGION.HEAD_DIM = 16
    r.GLOBAL.FRAMEWORK = framework
    r.MOCO.MLP_DIM = 64
    r.MOCO.DIM = 16
    r.MOCO.QUEUE_SIZE = 32
    r.SIMSIAM.PROJ_DIM = 64
    r.SIMSIAM.PRED_HIDDEN_DIM = 16
    cfg.SOLVER.IMS_PER_BATCH = 4
    return cfg


def make_batch(cfg, B=4, seed=0, valid=True):
    """Two overlapping crops of a smooth random image per sample; grid windows mapped q -> k."""
    g = torch.Generator().manual_seed(seed)
    pad = 16
    big = F.interpolate(
        torch.rand(B, 3, 10, 10, generator=g),
        size=(S + pad, S + pad),
        mode="bilinear",
        align_corners=False,
    )
    big = (big * 255).round().to(torch.uint8)
    offs = torch.randint(0, pad + 1, (B, 2), generator=g)
    batch = []
    for b in range(B):
        dx, dy = int(offs[b, 0]), int(offs[b, 1])
        d = {
            "image_q": big[b, :, :S, :S].clone(),
            "image_k": big[b, :, dy : dy + S, dx : dx + S].clone(),
            "windows": {},
        }
        r = cfg.RESIM.REGION
        for f, w, s in zip(r.IN_FEATURES, r.WINDOW_SIZES, r.WINDOW_STRIDES):
            starts = list(range(0, S - w + 1, s))
            bq = torch.tensor(
                [[x, y, x + w, y + w] for y in starts for x in starts], dtype=torch.float32
            )
            bk = bq - torch.tensor([dx, dy, dx, dy], dtype=torch.float32)
            ok = (bk[:, 0] >= 0) & (bk[:, 1] >= 0) & (bk[:, 2] <= S) & (bk[:, 3] <= S)
            d["windows"][f] = {"boxes_q": bq, "boxes_k": bk, "valid": ok & valid}
        batch.append(d)
    return batch


def build(cfg, seed=0):
    """The model of ``cfg``, its initialisation seeded."""
    torch.manual_seed(seed)
    return build_model(cfg)


def total_loss(out):
    """The sum detectron2's trainer takes of a training forward's outputs (all losses)."""
    assert all(k.startswith("loss") for k in out)  # detectron2's trainer sums every value
    return sum(out.values())


def tiny_resim_gn_cfg():
    """:func:`tiny_resim_cfg` "fpn" with GroupNorm, p3's negatives per 2 images, p4's gathered.

    GroupNorm makes each key independent of which images share its batch, so shuffle-BN must
    leave every loss unchanged and a 2-process run must match one process on the gathered terms."""
    cfg = tiny_resim_cfg("fpn")
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.RESIM.REGION.HEAD_DIM = 32
    cfg.RESIM.REGION.GATHER_NEGATIVES = [False, True]  # p3 per rank, p4 gathered
    cfg.RESIM.REGION.NEG_GROUP_IMAGES = [2, 0]  # p3 negatives per 2 images: = per rank of 2
    return cfg


def loss_values(out):
    """The detached losses of a forward's outputs."""
    return {k: v.detach() for k, v in out.items() if k.startswith("loss")}


# the name tests/test_regression_pinned.py imports
tiny_cfg = tiny_resim_cfg
