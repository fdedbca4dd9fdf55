"""Layers: Precise RoI Pooling (:mod:`.prroi_pool`) and its detectron2 hook (:mod:`.poolers`)."""

from .prroi_pool import PrRoIPool, prroi_pool

__all__ = ["PrRoIPool", "prroi_pool"]
