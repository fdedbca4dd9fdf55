"""SimSiam as ReSim's global objective (Chen & He 2021; the paper's Table 2 and Table 7).

One encoder for both views, the projector as global head, a predictor on both views' projections,
and the symmetric negative cosine loss with stop-gradient on the targets. Batch norms normalise the
whole batch (SimSiam converts the encoder to SyncBN; in one process plain batch norm already is
that), so there are no batch-norm groups and no shuffle. The region branches get the same
encoder's key-view maps: detached (region InfoNCE) or with gradient (SimSiam's symmetric cosine per
window, ``RESIM.SIMSIAM.REGION_LOSS "cosine"``).
"""

from __future__ import annotations

from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec

from .batch_order import BatchOrder
from .global_objective import GLOBAL_OBJECTIVE_REGISTRY, EncodedView, GlobalObjective
from .heads import SimSiamPredictor, SimSiamProjector
from .losses import simsiam_loss
from .precision import autocast

__all__ = ["SimSiam"]


@GLOBAL_OBJECTIVE_REGISTRY.register()
class SimSiam(GlobalObjective):
    """SimSiam: shared encoder, predictor, symmetric stop-gradient cosine (module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        proj_dim: int,
        proj_layers: int,
        pred_hidden_dim: int,
        norm: str,
        key_region_grad: bool,
        loss_weight: float,
    ):
        """
        Args:
            proj_dim, proj_layers: the projector's width and number of linear layers (SimSiam:
                2048, 3).
            pred_hidden_dim: the predictor's bottleneck width (SimSiam: 512).
            norm: the heads' batch norm, as the backbone's (``MODEL.RESNETS.NORM``).
            key_region_grad: whether the region branches train through the key view's maps (the
                cosine region loss is symmetric).
            loss_weight: λ, the global loss's weight.
        """
        self.proj_dim, self.proj_layers = int(proj_dim), int(proj_layers)
        self.pred_hidden_dim = int(pred_hidden_dim)
        self.norm = norm
        self.key_region_grad = bool(key_region_grad)
        self.loss_weight = float(loss_weight)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        s = cfg.RESIM.SIMSIAM
        cosine = cfg.RESIM.REGION.ENABLED and s.REGION_LOSS.lower() == "cosine"
        return dict(
            proj_dim=s.PROJ_DIM,
            proj_layers=s.PROJ_LAYERS,
            pred_hidden_dim=s.PRED_HIDDEN_DIM,
            norm=cfg.MODEL.RESNETS.NORM,
            key_region_grad=cosine,
            loss_weight=cfg.RESIM.GLOBAL.LOSS_WEIGHT,
        )

    def build_heads(self, input_shape: ShapeSpec) -> dict[str, nn.Module]:
        c = input_shape.channels
        return {
            "global_head": SimSiamProjector(c, self.proj_dim, self.norm, self.proj_layers),
            "predictor": SimSiamPredictor(self.proj_dim, self.pred_hidden_dim, self.norm),
        }

    def query_order(self, batch: int) -> BatchOrder:
        return BatchOrder()

    def encode_keys(self, model: nn.Module, x_k) -> EncodedView:
        return model.encode(x_k, BatchOrder(), region_grad=self.key_region_grad)

    def loss(self, model: nn.Module, query: EncodedView, key: EncodedView):
        z1, z2 = query.embedding, key.embedding
        with autocast(z1.device, model.amp_dtype):
            p1, p2 = model.predictor(z1), model.predictor(z2)
        loss, stats = simsiam_loss(p1.float(), p2.float(), z1.float(), z2.float())
        return loss * self.loss_weight, stats

    def fixed_lr_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.predictor]
