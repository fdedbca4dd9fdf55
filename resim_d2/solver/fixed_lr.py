"""SimSiam's predictor at a fixed learning rate while the rest follows the schedule.

SimSiam keeps its predictor's learning rate at the initial value (its ``--fix-pred-lr``, the
setting its authors recommend: the predictor must keep adapting to the latest representation)
while the encoder and projector decay with the cosine schedule. detectron2 scales every parameter
group by one multiplier (``LRMultiplier``). Here:

* :func:`build_pretrain_optimizer` is detectron2's ``build_optimizer`` (same groups, weight decay,
  momentum, clipping) with the parameters that ``RESIM.SIMSIAM.FIX_PRED_LR`` fixes put in their own
  groups, marked ``"fixed_lr": True``;
* :class:`FixedLRGroupsMultiplier` is detectron2's ``LRMultiplier`` that leaves marked groups at
  their initial learning rate (no warmup, no decay) and scales the others as before;
* :func:`build_pretrain_lr_scheduler` builds detectron2's scheduler from the config and, when the
  optimizer has marked groups, the same multiplier in that class.

Which parameters: the SimSiam predictor (``model.predictor``) and, for ReSim on SimSiam, the
per-level region predictors (``model.region_mlps[f]["pred"]``): everything the model reports in
``fixed_lr_parameters()``.
"""

from __future__ import annotations

import torch

from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.solver.build import reduce_param_groups
from detectron2.solver.lr_scheduler import LRMultiplier

__all__ = ["FixedLRGroupsMultiplier", "build_pretrain_optimizer", "build_pretrain_lr_scheduler"]


def _fixed_parameters(cfg, model: torch.nn.Module) -> set:
    """Parameters whose learning rate ``cfg`` keeps fixed (empty unless SimSiam with
    RESIM.SIMSIAM.FIX_PRED_LR)."""
    if cfg.RESIM.GLOBAL.FRAMEWORK.lower() != "simsiam" or not cfg.RESIM.SIMSIAM.FIX_PRED_LR:
        return set()
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if not hasattr(inner, "fixed_lr_parameters"):
        raise TypeError(
            f"RESIM.SIMSIAM.FIX_PRED_LR needs a model with fixed_lr_parameters(), got {type(inner)}"
        )
    return set(inner.fixed_lr_parameters())


def build_pretrain_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2's optimizer for ``cfg``, the fixed-lr parameters in groups of their own
    (``"fixed_lr": True``, otherwise the same hyper-parameters)."""
    optimizer = d2_build_optimizer(cfg, model)
    fixed = _fixed_parameters(cfg, model)
    if not fixed:
        return optimizer
    per_param = []
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            per_param.append({"params": [p], **hyper, "fixed_lr": p in fixed})
    missing = len(fixed) - sum(1 for g in per_param if g["fixed_lr"])
    if missing:
        raise ValueError(f"{missing} fixed-lr parameters are not trained by the optimizer")
    optimizer.param_groups.clear()
    for group in reduce_param_groups(per_param):
        optimizer.add_param_group(group)
    return optimizer


class FixedLRGroupsMultiplier(LRMultiplier):
    """detectron2's ``LRMultiplier``, except that groups with ``"fixed_lr": True`` keep their
    initial learning rate at every iteration."""

    def get_lr(self):
        scaled = super().get_lr()
        return [
            base if group.get("fixed_lr", False) else lr
            for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, scaled)
        ]


def build_pretrain_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """detectron2's scheduler for ``cfg``; with fixed-lr groups in ``optimizer``, the same
    multiplier as a :class:`FixedLRGroupsMultiplier`."""
    scheduler = d2_build_lr_scheduler(cfg, optimizer)
    if not any(g.get("fixed_lr", False) for g in optimizer.param_groups):
        return scheduler
    if not isinstance(scheduler, LRMultiplier):
        raise TypeError(f"fixed-lr groups need an LRMultiplier schedule, got {type(scheduler)}")
    return FixedLRGroupsMultiplier(
        optimizer, multiplier=scheduler._multiplier, max_iter=scheduler._max_iter
    )
