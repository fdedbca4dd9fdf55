"""The ReSim key encoder and MoCo queue on tiny ResNet-18 encoders (CPU): the key encoder starts as
a copy and follows the momentum update; the queue enqueues and wraps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.resim_model import (
    build,
    make_batch,
    tiny_resim_cfg,
)

import resim_d2  # noqa: F401  (compat + registers ReSim)

from detectron2.modeling import build_model


def test_momentum_update_matches_hand_computation():
    cfg = tiny_resim_cfg("c4")
    cfg.RESIM.MOCO.MOMENTUM = 0.9
    model = build(cfg)
    model.train()
    with torch.no_grad():  # make query and key sides differ
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    qs = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ks = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model(make_batch(cfg))
    pairs = [
        ("backbone.", "backbone_k."),
        ("global_head.", "global_head_k."),
        ("region_heads.", "region_heads_k."),
    ]
    checked = 0
    for name, p in model.named_parameters():
        for pq, pk in pairs:
            if name.startswith(pk):
                qname = pq + name[len(pk) :]
                src = qs.get(qname)
                if src is None:  # frozen on the query side too (unused FPN convs): unchanged
                    continue
                expected = 0.9 * ks[name] + (1 - 0.9) * src
                torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
                checked += 1
    assert checked == sum(1 for n in qs if not n.startswith("predictor"))
    for n, p in model.named_parameters():  # the query side is untouched by the forward pass
        if n in qs:
            torch.testing.assert_close(p.detach(), qs[n], rtol=0, atol=0)


def test_queue_enqueue_and_wrap():
    cfg = tiny_resim_cfg("c4")
    cfg.RESIM.MOCO.QUEUE_SIZE = 8
    model = build(cfg)
    keys = [F.normalize(torch.randn(4, 16), dim=1) for _ in range(3)]
    model.objective.dequeue_and_enqueue(model, keys[0])
    assert int(model.queue_ptr) == 4
    torch.testing.assert_close(model.queue[:, :4], keys[0].t())
    model.objective.dequeue_and_enqueue(model, keys[1])
    assert int(model.queue_ptr) == 0
    model.objective.dequeue_and_enqueue(model, keys[2])
    assert int(model.queue_ptr) == 4
    torch.testing.assert_close(model.queue[:, :4], keys[2].t())
    torch.testing.assert_close(model.queue[:, 4:], keys[1].t())
    with pytest.raises(ValueError, match="divisible"):
        model.objective.dequeue_and_enqueue(model, torch.randn(3, 16))
    # a training forward enqueues this batch's keys
    model.train()
    before = model.queue.clone()
    model(make_batch(cfg))
    assert int(model.queue_ptr) == 0
    assert not torch.allclose(model.queue[:, 4:], before[:, 4:])
    torch.testing.assert_close(model.queue[:, :4], before[:, :4])
    torch.testing.assert_close(model.queue[:, 4:].norm(dim=0), torch.ones(4))
    bad = tiny_resim_cfg("c4")
    bad.RESIM.MOCO.QUEUE_SIZE = 30
    with pytest.raises(ValueError, match="IMS_PER_BATCH"):
        build_model(bad)


def test_key_encoder_starts_as_a_copy():
    cfg = tiny_resim_cfg("c4")
    model = build(cfg)
    sd = model.state_dict()
    for k in sd:
        if k.startswith("backbone_k."):
            torch.testing.assert_close(sd[k], sd["backbone." + k[len("backbone_k.") :]])
    assert model.encoder_backbone() is model.backbone
    assert copy.deepcopy(model) is not None
