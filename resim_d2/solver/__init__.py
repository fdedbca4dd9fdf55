"""Optimizer and learning-rate schedule of pre-training: detectron2's, plus fixed-lr groups."""

from .fixed_lr import FixedLRGroupsMultiplier, build_pretrain_lr_scheduler, build_pretrain_optimizer

__all__ = ["FixedLRGroupsMultiplier", "build_pretrain_lr_scheduler", "build_pretrain_optimizer"]
