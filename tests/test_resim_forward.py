"""The ReSim meta-architecture's forward pass and losses on tiny ResNet-18 encoders and synthetic
two-view batches (CPU): outputs and metrics, gradients, baselines, FPN features, training steps,
evaluation outputs, bf16, config errors."""

import pytest
import torch
from helpers.resim_model import (
    S,
    build,
    make_batch,
    tiny_resim_cfg,
    total_loss,
)

import resim_d2  # noqa: F401  (compat + registers ReSim)
from resim_d2.modeling import ReSim, backbone_features

from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage


def test_c4_moco_outputs_and_no_gradient_to_keys():
    cfg = tiny_resim_cfg("c4")
    model = build(cfg)
    model.train()
    assert isinstance(model, ReSim)
    out = model(make_batch(cfg))
    metrics = model.last_metrics
    assert set(out) == {"loss_global", "loss_region_res4"}
    for name in (
        "global/acc_top1",
        "global/pos_sim",
        "global/neg_sim",
        "region_res4/acc_top1",
        "region_res4/pos_sim",
        "region_res4/neg_sim",
        "region_res4/valid_per_image",
    ):
        assert name in metrics and not metrics[name].requires_grad and torch.isfinite(metrics[name])
    assert float(metrics["region_res4/valid_per_image"]) > 0
    with EventStorage() as storage:
        written = model.put_metrics()
    assert set(written) == set(metrics)  # skipped files: the training loader and its hook
    assert storage.latest()["region_res4/acc_top1"][0] == written["region_res4/acc_top1"]
    assert model.put_metrics() == {}  # outside an EventStorage: nothing to write to
    total_loss(out).backward()
    for module in (model.backbone_k, model.global_head_k, model.region_heads_k):
        for p in module.parameters():
            assert not p.requires_grad and p.grad is None
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.region_heads.parameters())


def test_no_valid_windows_gives_finite_loss_and_grads():
    cfg = tiny_resim_cfg("c4")
    model = build(cfg)
    model.train()
    out = model(make_batch(cfg, valid=False))
    assert float(out["loss_region_res4"].detach()) == 0.0
    assert float(model.last_metrics["region_res4/valid_per_image"]) == 0.0
    loss = total_loss(out)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for p in model.region_heads.parameters():  # reached by the graph (DDP), with zero gradient
        assert torch.all(p.grad == 0)


@pytest.mark.parametrize("framework", ["moco", "simsiam"])
def test_baselines_have_no_region_branch(framework):
    cfg = tiny_resim_cfg("c4", framework=framework, region=False)
    model = build(cfg)
    model.train()
    out = model(make_batch(cfg))
    assert set(out) == {"loss_global"}
    assert not any(k.startswith("region") for k in model.last_metrics)
    assert len(model.region_heads) == 0
    total_loss(out).backward()
    model.eval()  # the correspondence evaluator still scores the baseline's raw res4 windows
    assert model(make_batch(cfg, B=2))["region_q"]["res4"].shape == (2, 9, 256)


def test_fpn_features_equal_detectron2_fpn_and_state_dict_keys():
    cfg = tiny_resim_cfg("fpn")
    torch.manual_seed(0)
    fpn = build_backbone(cfg).eval()
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        ref = fpn(x)
        ref_bottom = fpn.bottom_up(x)
        got = backbone_features(fpn, x, ["p3", "p4", "res5"])
    torch.testing.assert_close(got["p3"], ref["p3"])
    torch.testing.assert_close(got["p4"], ref["p4"])
    torch.testing.assert_close(got["res5"], ref_bottom["res5"])
    assert "p5" not in got  # only the requested levels are computed
    model = build(cfg)
    keys = {k[len("backbone.") :] for k in model.state_dict() if k.startswith("backbone.")}
    assert keys == set(fpn.state_dict().keys())
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"fpn_output5.weight", "fpn_output5.bias"}


@pytest.mark.parametrize("arch", ["c4", "fpn"])
def test_loss_decreases_on_a_fixed_batch(arch):
    """A few SGD steps on one batch lower the region and the global loss.

    The queue is reset before each step: otherwise it fills with this very batch's keys, which then
    act as negatives identical to the positives and the global loss rises by construction.
    """
    cfg = tiny_resim_cfg(arch)
    cfg.RESIM.MOCO.MOMENTUM = 0.99
    model = build(cfg)
    model.train()
    batch = make_batch(cfg, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    region_keys = [f"loss_region_{f}" for f in cfg.RESIM.REGION.IN_FEATURES]
    queue0 = model.queue.clone()
    region, glob = [], []
    for _ in range(4):
        model.queue.copy_(queue0)
        model.queue_ptr.zero_()
        out = model(batch)
        region.append(sum(float(out[k].detach()) for k in region_keys))
        glob.append(float(out["loss_global"].detach()))
        opt.zero_grad()
        total_loss(out).backward()
        opt.step()
    assert all(torch.isfinite(torch.tensor(region + glob)))
    assert region[-1] < region[0], region
    assert glob[-1] < glob[0], glob


def test_simsiam_resim_fpn_trains():
    cfg = tiny_resim_cfg("fpn", framework="simsiam")
    model = build(cfg)
    model.train()
    assert not hasattr(model, "backbone_k") and not hasattr(model, "queue")
    out = model(make_batch(cfg))
    assert set(out) == {"loss_global", "loss_region_p3", "loss_region_p4"}
    assert "global/z_std" in model.last_metrics
    for name in ("pos_sim", "neg_sim", "acc_top1", "z_std", "valid_per_image"):
        assert f"region_p3/{name}" in model.last_metrics, name
    assert -1.0 <= float(out["loss_global"].detach()) <= 1.0
    total_loss(out).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_eval_returns_normalised_region_embeddings():
    cfg = tiny_resim_cfg("fpn")
    model = build(cfg)
    model.eval()
    batch = make_batch(cfg, B=3)
    out = model(batch)
    for f, channels in (("p3", 32), ("p4", 32)):
        M = batch[0]["windows"][f]["boxes_q"].shape[0]
        assert out["region_q"][f].shape == (3, M, channels) == out["region_k"][f].shape
        valid = out["valid"][f]
        assert valid.shape == (3, M) and valid.dtype == torch.bool
        expected = torch.stack([d["windows"][f]["valid"] for d in batch])
        assert torch.equal(valid, expected)
        torch.testing.assert_close(
            out["region_q"][f][valid].norm(dim=-1), torch.ones(int(valid.sum()))
        )
    assert out["global_q"].shape == (3, 512)


def test_bf16_autocast_channels_last_and_roialign_run():
    cfg = tiny_resim_cfg("c4")
    cfg.RESIM.SPEED.AMP_DTYPE = "bfloat16"
    cfg.RESIM.SPEED.CHANNELS_LAST = True
    cfg.RESIM.REGION.POOLER_TYPE = "ROIAlign"
    model = build(cfg)
    model.train()
    out = model(make_batch(cfg))
    for k in ("loss_global", "loss_region_res4"):
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k])
    total_loss(out).backward()


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("MODEL.BACKBONE.FREEZE_AT", 2, "FREEZE_AT"),
        ("MODEL.RESNETS.STRIDE_IN_1X1", True, "STRIDE_IN_1X1"),
        ("MODEL.RESNETS.NORM", "FrozenBN", "NORM"),
        ("RESIM.MOCO.BN", "sync", "SyncBN"),
        ("RESIM.REGION.LOSS_WEIGHTS", [1.0, 1.0], "LOSS_WEIGHTS"),
    ],
)
def test_config_errors_are_clear(key, value, match):
    cfg = tiny_resim_cfg("c4")
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=match):
        build_model(cfg)
