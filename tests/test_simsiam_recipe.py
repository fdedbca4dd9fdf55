"""SimSiam as SimSiam trains: whole-batch (Sync)BN in its configs, predictors at a fixed learning
rate while the rest follows the cosine schedule (through the Trainer), synchronised masked batch
norm equal to one process's over all rows; and the MoCo configs' grouped batch norm."""

import glob
import math
import os

import pytest
import torch
from helpers.processes import run_gloo_workers
from torch import nn

from resim_d2 import add_resim_config, get_config_file
from resim_d2.layers.group_batch_norm import GroupBatchNorm2d
from resim_d2.modeling.heads import MaskedBatchNorm1d
from resim_d2.solver import FixedLRGroupsMultiplier, build_pretrain_lr_scheduler

from detectron2.config import get_cfg
from detectron2.engine import HookBase
from detectron2.modeling import build_model

CONFIG_DIR = os.path.dirname(get_config_file("pretrain/Base-ReSim.yaml"))


def _config(path):
    cfg = add_resim_config(get_cfg())
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.RESIM.MOCO.QUEUE_SIZE = 256
    return cfg


def _configs(framework):
    paths = glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
    paths = [p for p in paths if not os.path.basename(p).startswith("Base-")]
    return sorted(p for p in paths if _config(p).RESIM.GLOBAL.FRAMEWORK == framework)


def _batch_norms(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("path", _configs("simsiam"), ids=os.path.basename)
def test_simsiam_configs_build_with_whole_batch_sync_bn_and_fixed_predictor_lr(path):
    cfg = _config(path)
    assert cfg.MODEL.RESNETS.NORM == "SyncBN" and cfg.RESIM.SIMSIAM.FIX_PRED_LR
    model = build_model(cfg)
    norms = _batch_norms(model.backbone) + _batch_norms(model.global_head)
    norms += _batch_norms(model.predictor)
    assert norms and all(type(m) is nn.SyncBatchNorm for m in norms)
    masked = [m for m in model.region_mlps.modules() if isinstance(m, MaskedBatchNorm1d)]
    assert all(m.sync for m in masked) and (bool(masked) == cfg.RESIM.REGION.ENABLED)
    assert not any(isinstance(m, GroupBatchNorm2d) for m in model.modules())
    fixed = set(model.fixed_lr_parameters())
    expected = set(model.predictor.parameters())
    for mlps in model.region_mlps.values():
        expected |= set(mlps["pred"].parameters())
    assert fixed == expected


@pytest.mark.parametrize("path", _configs("moco"), ids=os.path.basename)
def test_moco_configs_group_their_batch_norms_per_32_images(path):
    cfg = _config(path)
    model = build_model(cfg)
    for encoder in (model.backbone, model.backbone_k, model.region_heads, model.region_heads_k):
        norms = _batch_norms(encoder)
        assert all(type(m) is GroupBatchNorm2d for m in norms)
        assert all(m.group_size == cfg.RESIM.BN_GROUP_IMAGES for m in norms)
    assert _batch_norms(model.backbone)
    expected = 8 if "demo" in os.path.basename(path) else 32  # the demo: 4 groups of 8 at 32
    assert cfg.RESIM.BN_GROUP_IMAGES == expected
    if "p3" in cfg.RESIM.REGION.IN_FEATURES and cfg.RESIM.REGION.ENABLED:
        assert model.region_branches["p3"].neg_group_images == 32  # P3 negatives per emulated GPU


def test_fixed_groups_keep_their_lr_while_the_others_follow_warmup_and_cosine():
    cfg = add_resim_config(get_cfg())
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    cfg.SOLVER.MAX_ITER = 100
    cfg.SOLVER.WARMUP_ITERS = 10
    cfg.SOLVER.WARMUP_FACTOR = 0.1
    cfg.SOLVER.WARMUP_METHOD = "linear"
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD(
        [{"params": [a], "lr": 0.5}, {"params": [b], "lr": 0.2, "fixed_lr": True}]
    )
    sched = build_pretrain_lr_scheduler(cfg, opt)
    assert isinstance(sched, FixedLRGroupsMultiplier)

    def cosine(it):
        return 0.5 * (1 + math.cos(math.pi * it / 100))

    for it in range(cfg.SOLVER.MAX_ITER):
        # detectron2's warmup: linear from 0.1 x the schedule's start to its value at the end
        factor = 0.1 + (cosine(10) - 0.1) * it / 10 if it < 10 else cosine(it)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * factor, rel=1e-9)
        assert opt.param_groups[1]["lr"] == 0.2
        opt.step()
        sched.step()
    # and the state round-trips as detectron2's
    state = sched.state_dict()
    assert state["last_epoch"] == 100 and state["base_lrs"] == [0.5, 0.2]


class _RecordLR(HookBase):
    def __init__(self):
        self.rows = []

    def before_step(self):
        self.rows.append([g["lr"] for g in self.trainer.optimizer.param_groups])


def test_trainer_keeps_simsiam_predictors_at_the_initial_lr(tmp_path):
    """Through tools/train_net.py's Trainer, on the embedded photographs: a tiny ReSim-C4 on
    SimSiam, 4 cosine iterations; every predictor parameter sits in a group whose lr stays at
    SOLVER.BASE_LR, every other group decays as the cosine."""
    from resim_d2.engine import Trainer, resolve_pretrain_schedule

    cfg = _config(get_config_file("pretrain/resim_c4_simsiam_in100_500ep.yaml"))
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.DATASETS.TRAIN = ("resim_demo_images",)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.RESIM.VIEWS.SIZE = 64
    cfg.RESIM.REGION.WINDOW_SIZES = [32]
    cfg.RESIM.REGION.WINDOW_STRIDES = [16]
    cfg.RESIM.REGION.NEG_POOL_KERNELS = [2]
    cfg.RESIM.SIMSIAM.PROJ_DIM = 64
    cfg.RESIM.SIMSIAM.PRED_HIDDEN_DIM = 16
    cfg.RESIM.SCHEDULE.EPOCHS = 0
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.MAX_ITER = 4
    cfg.SOLVER.CHECKPOINT_PERIOD = 100
    cfg.OUTPUT_DIR = str(tmp_path)
    resolve_pretrain_schedule(cfg)
    base = cfg.SOLVER.BASE_LR
    assert base == pytest.approx(0.1 * 4 / 256)
    trainer = Trainer(cfg)
    recorder = _RecordLR()
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=False)
    trainer.train()
    fixed = set(trainer.model.fixed_lr_parameters())
    assert fixed
    groups = trainer.optimizer.param_groups
    for i, g in enumerate(groups):
        is_fixed = g.get("fixed_lr", False)
        assert all((p in fixed) == is_fixed for p in g["params"])  # groups are pure
        lrs = [row[i] for row in recorder.rows]
        if is_fixed:
            assert lrs == [base] * 4
        else:
            cosine = [base * 0.5 * (1 + math.cos(math.pi * it / 4)) for it in range(4)]
            assert lrs == pytest.approx(cosine, rel=1e-9)
    assert sum(len(g["params"]) for g in groups if g.get("fixed_lr")) == len(fixed)


def _sync_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, mask, grad = _sync_data()
        rows = slice(5 * rank, 5 * rank + 5)
        bn = MaskedBatchNorm1d(3, sync=True)
        xr = x[rows].clone().requires_grad_(True)
        y = bn(xr, mask[rows])
        # the loss ignores padded rows, as the model's does
        (y * grad[rows] * mask[rows, None]).sum().backward()
        torch.save({"y": y.detach(), "dx": xr.grad, "rv": bn.running_var}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def _sync_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64).float() * 2 + 1
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)  # 4 + 4 valid rows
    return x, mask, torch.randn(10, 3, generator=g)


def test_synchronised_masked_batch_norm_equals_one_process_over_all_rows():
    outs = run_gloo_workers(_sync_worker, 2)
    x, mask, grad = _sync_data()
    # independent reference: plain BatchNorm1d on the valid rows of both processes together
    ref = nn.BatchNorm1d(3)
    xv = x[mask].clone().requires_grad_(True)
    yv = ref(xv)
    (yv * grad[mask]).sum().backward()
    y = torch.cat([o["y"] for o in outs])
    dx = torch.cat([o["dx"] for o in outs])
    torch.testing.assert_close(y[mask], yv.detach(), rtol=1e-5, atol=1e-5)
    # DDP would average the two processes' gradients; each rank's is its share of the whole
    torch.testing.assert_close(dx[mask], xv.grad, rtol=1e-4, atol=1e-5)
    assert (dx[~mask] == 0).all()
    for o in outs:
        torch.testing.assert_close(o["rv"], ref.running_var, rtol=1e-5, atol=1e-6)
