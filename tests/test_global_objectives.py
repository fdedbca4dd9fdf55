"""The global-objective extension point: a new image-level objective is one registered class.

A BYOL-style objective (momentum key encoder, predictor, normalised-MSE loss; Grill et al. 2020)
written here, outside the package, trains with ReSim's region branch unchanged; its global loss is
checked against the formula computed from a copy of the model's encoders, run by hand."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.resim_model import build, make_batch, tiny_resim_cfg, total_loss
from torch import nn

from resim_d2.modeling import GLOBAL_OBJECTIVE_REGISTRY, GlobalObjective
from resim_d2.modeling.batch_order import BatchOrder
from resim_d2.modeling.encoder import backbone_features
from resim_d2.modeling.momentum_encoder import add_momentum_encoder, momentum_update

from detectron2.config import configurable


class ToyBYOL(GlobalObjective):
    """BYOL's global term: 2 - 2 cos(predictor(q), k), k from the momentum encoder."""

    @configurable
    def __init__(self, *, dim, momentum):
        self.dim, self.momentum = dim, momentum

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {"dim": 16, "momentum": 0.99}

    def build_heads(self, input_shape):
        head = nn.Sequential(nn.Linear(input_shape.channels, 32), nn.ReLU(), nn.Linear(32, 16))
        return {"global_head": head, "predictor": nn.Linear(self.dim, self.dim)}

    def attach(self, model):
        add_momentum_encoder(model)

    def query_order(self, batch):
        return BatchOrder()

    @torch.no_grad()
    def encode_keys(self, model, x_k):
        momentum_update(model, self.momentum)
        return model.encode(x_k, BatchOrder(), key_encoder=True)

    def loss(self, model, query, key):
        p = F.normalize(model.predictor(query.embedding), dim=1)
        k = F.normalize(key.embedding, dim=1)
        return (2 - 2 * (p * k).sum(dim=1)).mean(), {"pos_sim": (p * k).sum(dim=1).mean()}


@pytest.fixture
def toy_byol():
    GLOBAL_OBJECTIVE_REGISTRY.register(ToyBYOL)
    yield
    GLOBAL_OBJECTIVE_REGISTRY._obj_map.pop("ToyBYOL")


def _images(model, batch, key):
    x = torch.stack([torch.as_tensor(d[key]) for d in batch]).float()
    return (x - model.pixel_mean) / model.pixel_std


def test_a_registered_objective_trains_with_the_region_branch(toy_byol):
    cfg = tiny_resim_cfg("c4")
    cfg.RESIM.GLOBAL.FRAMEWORK = "toybyol"  # case-insensitive, as the built-in ones
    model = build(cfg)
    assert isinstance(model.objective, ToyBYOL)
    assert {"predictor", "backbone_k", "global_head_k", "region_heads_k"} <= set(
        dict(model.named_children())
    )
    model.train()
    batch = make_batch(cfg, seed=2)
    reference = copy.deepcopy(model)  # before the step: key encoder == query encoder
    out = model(batch)
    assert set(out) == {"loss_global", "loss_region_res4"}
    assert torch.isfinite(out["loss_region_res4"]) and float(out["loss_region_res4"].detach()) > 0

    # the global term by hand: query encoder + head + predictor on the query view, the key
    # encoder (one momentum step of an identical copy: unchanged) on the key view
    with torch.no_grad():
        r = reference

        def embedding(backbone, head, key):
            res5 = backbone_features(backbone, _images(r, batch, key), ["res5"])["res5"]
            return head(res5.mean(dim=(2, 3)))

        q = embedding(r.backbone, r.global_head, "image_q")
        k = embedding(r.backbone_k, r.global_head_k, "image_k")
        cos = F.cosine_similarity(r.predictor(q), k, dim=1)
        expected = (2 - 2 * cos).mean()
    torch.testing.assert_close(out["loss_global"].detach(), expected, rtol=1e-4, atol=1e-5)
    total_loss(out).backward()
    assert (
        model.predictor.weight.grad is not None and model.backbone_k.stem.conv1.weight.grad is None
    )


def test_an_unknown_objective_names_the_registered_ones():
    cfg = tiny_resim_cfg("c4")
    cfg.RESIM.GLOBAL.FRAMEWORK = "byol"
    with pytest.raises(ValueError, match=r"RESIM.GLOBAL.FRAMEWORK 'byol'.*MoCo.*SimSiam"):
        build(cfg)
