"""``--resume`` with changed optimizer/schedule keys applies the new values from there on.

A checkpoint holds the optimizer's state (learning rate, momentum, weight decay of each parameter
group) and the LR scheduler's base learning rates; loading them after the config overwrote what
the config asked for, so ``--resume SOLVER.BASE_LR 1e-6`` continued at the old rate.
:class:`ResumeScheduleHook` records the schedule keys in every checkpoint and, when a run resumes,
rebuilds the optimizer's parameter groups from the config (``Trainer.build_optimizer``), takes
their learning rate, momentum, weight decay and Nesterov flag into the live optimizer and the
scheduler's base rates, and sets the learning rate of the resumed iteration from the config's
schedule. It logs every key whose value differs from the checkpoint's. SGD's momentum buffers and
the iteration count are kept. (``SOLVER.MAX_ITER``, ``STEPS`` and the warm-up already come from the
config: detectron2's schedulers are rebuilt from it and only keep their base rates.)
"""

from __future__ import annotations

import logging

from detectron2.engine import HookBase

__all__ = ["ResumeScheduleHook", "SCHEDULE_KEYS"]

logger = logging.getLogger(__name__)

# config keys that shape the optimizer and learning-rate schedule
SCHEDULE_KEYS = (
    "SOLVER.BASE_LR",
    "SOLVER.MOMENTUM",
    "SOLVER.NESTEROV",
    "SOLVER.WEIGHT_DECAY",
    "SOLVER.WEIGHT_DECAY_NORM",
    "SOLVER.WEIGHT_DECAY_BIAS",
    "SOLVER.BIAS_LR_FACTOR",
    "SOLVER.LR_SCHEDULER_NAME",
    "SOLVER.MAX_ITER",
    "SOLVER.STEPS",
    "SOLVER.GAMMA",
    "SOLVER.WARMUP_FACTOR",
    "SOLVER.WARMUP_ITERS",
    "SOLVER.WARMUP_METHOD",
    "RESIM.SCHEDULE.EPOCHS",
    "RESIM.SCHEDULE.LR_PER_256",
)
# per-group optimizer settings the config decides (SGD's; others are left as loaded)
_GROUP_KEYS = ("lr", "momentum", "weight_decay", "nesterov", "dampening")


def _lookup(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return list(node) if isinstance(node, tuple) else node


class ResumeScheduleHook(HookBase):
    """See the module docstring. Register it on every process of a run."""

    def __init__(self):
        self._saved: dict | None = None

    def state_dict(self):
        return {"config": {k: _lookup(self.trainer.cfg, k) for k in SCHEDULE_KEYS}}

    def load_state_dict(self, state_dict):
        self._saved = dict(state_dict.get("config", {}))

    def before_train(self):
        trainer = self.trainer
        if trainer.start_iter == 0 and self._saved is None:
            return  # a fresh run: the optimizer was built from the config
        cfg = trainer.cfg
        changed = [
            f"{k} {self._saved[k]} -> {_lookup(cfg, k)}"
            for k in SCHEDULE_KEYS
            if self._saved is not None and k in self._saved and self._saved[k] != _lookup(cfg, k)
        ]
        applied = self._apply_config_groups()
        if changed or applied:
            what = "; ".join(changed) or "optimizer settings differ from the checkpoint's"
            logger.warning(
                f"--resume: {what}. Using the config's values from iteration {trainer.start_iter} "
                f"on ({'; '.join(applied) or 'no optimizer group changed'}); learning rate now "
                f"{self._lr():.6g}"
            )

    def _lr(self):
        groups = self.trainer.optimizer.param_groups
        return max(groups, key=lambda g: len(g["params"]))["lr"]

    def _apply_config_groups(self) -> list[str]:
        """Replace the optimizer's parameter groups by the config's (same parameter objects, so
        SGD's per-parameter state is kept) and the scheduler's base rates by theirs; returns one
        line per changed setting."""
        trainer = self.trainer
        optimizer, scheduler = trainer.optimizer, trainer.scheduler
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        fresh = trainer.build_optimizer(trainer.cfg, model).param_groups
        live = optimizer.param_groups
        if {id(p) for g in fresh for p in g["params"]} != {
            id(p) for g in live for p in g["params"]
        }:
            raise ValueError(
                "--resume: the config trains other parameters than the checkpoint's optimizer "
                "(a changed model?); resume with the original config, or start a new run from the "
                "weights (MODEL.WEIGHTS)"
            )
        base_lrs = list(
            getattr(scheduler, "base_lrs", [g.get("initial_lr", g["lr"]) for g in live])
        )

        def settings(groups, bases):
            out = {}
            for g, base in zip(groups, bases):
                values = {k: g.get(k) for k in _GROUP_KEYS}
                values["lr"] = base
                for p in g["params"]:
                    out[id(p)] = values
            return out

        before = settings(live, base_lrs)
        after = settings(fresh, [g["lr"] for g in fresh])
        changes = sorted(
            {
                f"{'base learning rate' if k == 'lr' else k} {before[p][k]} -> {after[p][k]}"
                for p in after
                for k in _GROUP_KEYS
                if before[p][k] != after[p][k]
            }
        )
        if not changes:
            return []
        for g in fresh:
            g["initial_lr"] = g["lr"]
        live[:] = fresh
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [g["lr"] for g in fresh]
            # the resumed iteration's rate: the config's schedule at the loaded position
            lrs = scheduler.get_lr()
            for g, lr in zip(live, lrs):
                g["lr"] = lr
            scheduler._last_lr = list(lrs)
        return changes
