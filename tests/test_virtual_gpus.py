"""One process emulating several GPUs' batch norms (RESIM.BN_GROUP_IMAGES) trains what that many
gloo processes with plain per-process BatchNorm and shuffle-BN train; the key encoder normalises
the shuffled images per group; the batch-norm leak is warned about exactly when it happens."""

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers.processes import run_gloo_workers
from helpers.resim_model import build, make_batch, tiny_resim_cfg, total_loss

from resim_d2.layers.group_batch_norm import GroupBatchNorm2d
from resim_d2.modeling import distributed as dist_utils

# the fixed shuffle-BN permutation of the 4 images of the step (global indices, rank-major)
PERM = torch.tensor([3, 0, 2, 1])


def _cfg(group_images):
    """ReSim-FPN, plain BN; P3 negatives per BN group (per process in the 2-process run), P4
    negatives and the queue over the whole step."""
    cfg = tiny_resim_cfg("fpn")
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.RESIM.MOCO.BN = "shuffle"
    cfg.RESIM.BN_GROUP_IMAGES = group_images
    cfg.RESIM.REGION.GATHER_NEGATIVES = [False, True]
    cfg.RESIM.REGION.NEG_GROUP_IMAGES = [-1, 0]
    return cfg


def _fixed_permutation(total, device):
    assert total == len(PERM)
    return PERM.to(device)


def _step(model, batch):
    """Losses and gradients of one training step (nothing updated)."""
    out = model(batch)
    model.zero_grad(set_to_none=True)
    total_loss(out).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _gloo_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from resim_d2.modeling import distributed as du

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        du.shuffle_permutation = _fixed_permutation  # rank 0's is broadcast anyway
        cfg = _cfg(0)  # one group per process: the model has plain nn.BatchNorm2d
        model = build(cfg)
        model.train()
        assert not any(isinstance(m, GroupBatchNorm2d) for m in model.modules())
        assert any(type(m) is torch.nn.BatchNorm2d for m in model.backbone.modules())
        batch = make_batch(cfg, B=4, seed=3)[2 * rank : 2 * rank + 2]
        losses, grads = _step(DDP(model), batch)  # DDP averages the gradients over the ranks
        grads = {n.removeprefix("module."): g for n, g in grads.items()}
        torch.save({"losses": losses, "grads": grads}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_one_process_with_two_groups_equals_two_processes(monkeypatch):
    world = 2
    outs = run_gloo_workers(_gloo_worker, world)
    ddp_losses = {k: sum(o["losses"][k] for o in outs) / world for k in outs[0]["losses"]}
    ddp_grads = outs[0]["grads"]
    for name, g in outs[1]["grads"].items():  # DDP: every rank holds the averaged gradient
        torch.testing.assert_close(g, ddp_grads[name])

    monkeypatch.setattr(dist_utils, "shuffle_permutation", _fixed_permutation)
    batch = make_batch(_cfg(2), B=4, seed=3)
    results = {}
    for group_images in (2, 0):  # two groups of 2 images; one group of 4
        model = build(_cfg(group_images))
        model.train()
        assert any(isinstance(m, GroupBatchNorm2d) for m in model.modules()) == (group_images > 0)
        results[group_images] = _step(model, batch)

    losses, grads = results[2]
    assert losses.keys() == ddp_losses.keys() and grads.keys() == ddp_grads.keys()
    for k, v in losses.items():
        torch.testing.assert_close(v, ddp_losses[k], rtol=1e-5, atol=1e-6)
    worst = 0.0
    for name, g in grads.items():
        # float32 sums in another order (4 images vs 2 + 2 averaged): relative to each tensor's
        # largest gradient
        scale = float(ddp_grads[name].abs().max())
        worst = max(worst, float((g - ddp_grads[name]).abs().max()) / max(scale, 1e-12))
    print("worst gradient difference / largest gradient of its tensor:", worst)
    assert worst < 1e-4
    # one group (all 4 images in every batch norm, keys unshuffled) is another model
    one_losses, one_grads = results[0]
    assert any(
        not torch.allclose(one_losses[k], ddp_losses[k], rtol=1e-3, atol=1e-4) for k in ddp_losses
    )
    name = "backbone.bottom_up.stem.conv1.weight"
    scale = float(ddp_grads[name].abs().max())
    assert float((one_grads[name] - ddp_grads[name]).abs().max()) > 1e-2 * scale


def test_key_encoder_normalises_each_group_of_the_shuffled_images(monkeypatch):
    monkeypatch.setattr(dist_utils, "shuffle_permutation", _fixed_permutation)
    cfg = _cfg(2)
    model = build(cfg)
    model.train()
    batch = make_batch(cfg, B=4, seed=5)
    stem = model.backbone_k.bottom_up.stem.conv1
    seen = {}
    # clones: the stem applies an in-place ReLU to the norm's output
    stem.norm.register_forward_hook(
        lambda m, inp, out: seen.update(inp=inp[0].clone(), out=out.clone())
    )
    with torch.no_grad():
        x_k = model.preprocess_image(batch, "image_k")
        model(batch)
        # independent reference: the stem conv of the images of each key group, in group order
        # (rows of group g at k % 2 == g), normalised with that group's own statistics
        conv = F.conv2d(x_k, stem.weight, stem.bias, stem.stride, stem.padding)
        norm = stem.norm
        for g in range(2):
            images = PERM[2 * g : 2 * g + 2]  # the shuffled images group g normalises
            torch.testing.assert_close(seen["inp"][g::2], conv[images], rtol=1e-5, atol=1e-5)
            ref = F.batch_norm(conv[images], None, None, norm.weight, norm.bias, True, 0.0, 1e-5)
            torch.testing.assert_close(seen["out"][g::2], ref, rtol=1e-4, atol=1e-4)
        # not the statistics of the whole batch
        whole = F.batch_norm(conv[PERM[:2]], None, None, norm.weight, norm.bias, True, 0.0, 1e-5)
        mixed = F.batch_norm(conv, None, None, norm.weight, norm.bias, True, 0.0, 1e-5)
        assert not torch.allclose(whole, mixed[PERM[:2]], atol=1e-3)


def _warnings(caplog, cfg, batch=4, steps=2):
    model = build(cfg)
    model.train()
    with caplog.at_level(logging.WARNING, logger="resim_d2.modeling.moco"):
        caplog.clear()
        for _ in range(steps):
            model(make_batch(cfg, B=batch, seed=1))
    return [r for r in caplog.records if "BN_GROUP_IMAGES" in r.getMessage()]


@pytest.mark.parametrize(
    "framework, norm, moco_bn, group_images, region, leak",
    [
        ("moco", "BN", "shuffle", 2, True, False),  # 2 groups: keys shuffled across them
        ("moco", "BN", "shuffle", 1, False, False),  # 4 groups, baseline MoCo-v2
        ("moco", "BN", "shuffle", 0, True, True),  # one group per process, one process
        ("moco", "BN", "shuffle", 4, True, True),  # the batch is one group
        ("moco", "BN", "shuffle", 32, False, True),  # the default at a small batch; MoCo-v2
        ("moco", "naiveSyncBN", "shuffle", 2, True, True),  # synchronised: one set of statistics
        ("moco", "naiveSyncBN", "sync", 0, True, False),  # SyncBN by choice (RESIM.MOCO.BN)
        ("moco", "GN", "shuffle", 0, True, False),  # no batch statistics
        ("simsiam", "BN", "shuffle", 0, True, False),  # no key encoder
    ],
)
def test_leak_warning_exactly_when_one_group_normalises_the_step(
    caplog, framework, norm, moco_bn, group_images, region, leak
):
    cfg = tiny_resim_cfg("c4", framework=framework, region=region)
    cfg.MODEL.RESNETS.NORM = norm
    cfg.RESIM.MOCO.BN = moco_bn
    cfg.RESIM.BN_GROUP_IMAGES = group_images
    cfg.RESIM.REGION.HEAD_DIM = 32  # GroupNorm's 32 groups
    records = _warnings(caplog, cfg)
    assert len(records) == (1 if leak else 0)  # once, at the first step
    if leak:
        message = records[0].getMessage()
        assert "all 4 images as one group" in message and "RESIM.MOCO.BN 'sync'" in message


def test_leak_depends_on_the_number_of_processes():
    cfg = tiny_resim_cfg("c4")
    cfg.RESIM.BN_GROUP_IMAGES = 0
    model = build(cfg)
    assert model.leaks_batch_statistics(4, world=1)
    assert not model.leaks_batch_statistics(4, world=2)  # shuffled across two processes' norms
    cfg.RESIM.BN_GROUP_IMAGES = 2
    model = build(cfg)
    assert not model.leaks_batch_statistics(4, world=1)
    assert model.leaks_batch_statistics(2, world=1)
