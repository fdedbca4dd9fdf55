"""The global (image-level) objective of ReSim: a registry, so that a new one is one new file.

ReSim (paper §3, Figure 2) adds region-level objectives to an image-level instance-discrimination
framework. That framework decides how the key view is encoded (a momentum copy of the query
encoder for MoCo, the same encoder for SimSiam), the global head and loss, and what happens after
the step (MoCo's queue). An objective is registered in :data:`GLOBAL_OBJECTIVE_REGISTRY` under the
name ``RESIM.GLOBAL.FRAMEWORK`` gives ("MoCo", "SimSiam"; case-insensitive) and implements
:class:`GlobalObjective`.

An objective keeps only its settings. Its modules and buffers (global head, predictor, key encoder,
queue) are registered on the :class:`~resim_d2.modeling.meta_arch.ReSim` model under fixed names
(``global_head``, ``predictor``, ``backbone_k``, ``queue``, ...; :meth:`GlobalObjective.build_heads`
and :meth:`GlobalObjective.attach`),
so that checkpoints keep their keys whichever objective built them; its methods take the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry

__all__ = ["GLOBAL_OBJECTIVE_REGISTRY", "GlobalObjective", "EncodedView", "build_global_objective"]

GLOBAL_OBJECTIVE_REGISTRY = Registry("RESIM_GLOBAL_OBJECTIVE")
GLOBAL_OBJECTIVE_REGISTRY.__doc__ = """
Image-level objectives of ReSim pre-training (``RESIM.GLOBAL.FRAMEWORK``). A registered class is
built with ``cls(cfg, input_shape)`` (``@configurable`` with ``from_config(cfg, input_shape)``),
``input_shape`` the ShapeSpec of ``RESIM.GLOBAL.IN_FEATURE``.
"""


@dataclass
class EncodedView:
    """One view after an encoder and its heads.

    ``embedding``: (B, D) the global head's output, in batch order; ``maps``: {feature: (B, C, H,
    W)} the region heads' outputs, in ``order`` (the rows the encoder saw, see
    :class:`~resim_d2.modeling.batch_order.BatchOrder`).
    """

    embedding: torch.Tensor
    maps: dict = field(default_factory=dict)
    order: object = None


class GlobalObjective:
    """Interface of a global objective; see the module docstring.

    Attributes:
        bn_group_images: images per batch-norm group of the encoders (0: the process's batch);
            the model converts its batch norms when it is set.
    """

    bn_group_images = 0

    def build_heads(self, input_shape: ShapeSpec) -> dict[str, nn.Module]:
        """The objective's trainable modules by the name the model registers them under:
        ``"global_head"`` (the query encoder's head, (B, C) pooled ``input_shape`` -> (B, D)) and
        any other (SimSiam's ``"predictor"``)."""
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        """Register what derives from the model's finished modules (MoCo's key encoder and
        queue) on ``model``; called once, at the end of the model's construction."""

    def query_order(self, batch: int):
        """The :class:`BatchOrder` of the query encoder for a process batch of ``batch``."""
        raise NotImplementedError

    def encode_keys(self, model: nn.Module, x_k: torch.Tensor) -> EncodedView:
        """The key view (B, 3, S, S), batch order, through the key encoder."""
        raise NotImplementedError

    def loss(self, model: nn.Module, query: EncodedView, key: EncodedView):
        """(0-dim weighted global loss, {metric name: 0-dim detached tensor})."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, key: EncodedView) -> None:
        """State updates after the losses (MoCo: enqueue the keys)."""

    def fixed_lr_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules kept at a fixed learning rate (SimSiam's predictor)."""
        return []

    def leaks_batch_statistics(self, model: nn.Module, batch: int, world: int) -> bool:
        """Whether a step shares batch statistics between query and key encoders (MoCo)."""
        return False


def build_global_objective(cfg, input_shape: ShapeSpec) -> GlobalObjective:
    """The objective ``RESIM.GLOBAL.FRAMEWORK`` names (case-insensitive), built from ``cfg``."""
    name = cfg.RESIM.GLOBAL.FRAMEWORK
    by_lower = {n.lower(): n for n, _ in GLOBAL_OBJECTIVE_REGISTRY}
    if name.lower() not in by_lower:
        raise ValueError(
            f"RESIM.GLOBAL.FRAMEWORK '{name}' is not a registered global objective "
            f"({sorted(by_lower.values())})"
        )
    return GLOBAL_OBJECTIVE_REGISTRY.get(by_lower[name.lower()])(cfg, input_shape)
