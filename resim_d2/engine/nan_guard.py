"""Stop a run before a non-finite value reaches the weights, and name a checkpoint that recovers.

A diverging run does not start with a NaN loss. With an absurd learning rate, SGD's weight decay
alone multiplies every weight by ``1 - lr * wd`` per step; past ``lr * wd > 2`` the weights grow
geometrically while ReSim's losses (on L2-normalised features, after batch norms) stay finite.
The first non-finite values appear in the forward pass: batch-norm running variances overflow to
inf (they are updated during the forward, before any loss is checked) and then the loss turns NaN.
detectron2 checks the loss only, on the main process only, so

* checkpoints were written with inf statistics while the loss still looked fine, and
* the checkpoint written just before the failing iteration holds the weights that produce the
  failure: resuming from it fails again at once, whatever the learning rate.

:class:`NonFiniteGuard` checks the losses, every gradient and every floating buffer (batch-norm
statistics, the MoCo queue) after the backward pass and before the optimizer step, agreeing across
processes, so no process steps and no checkpoint is written after a non-finite value. It then names
the newest checkpoint whose weights were seen to give finite values: the one written at least two
iterations before the failure (a checkpoint of iteration ``k`` holds the weights that iteration
``k + 1`` runs), checked to read and to hold finite tensors; ``last_checkpoint`` is pointed at it,
so ``--resume`` (with a lower learning rate, applied by
:class:`~resim_d2.engine.resume_schedule.ResumeScheduleHook`) continues from there.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import HookBase, hooks
from detectron2.utils import comm

from ..checkpoint.checkpointer import checkpoint_iteration
from ..checkpoint.safe_load import CheckpointReadError, load_weights_file

__all__ = ["NonFiniteGuard", "find_recovery_checkpoint", "max_abs_per_tensor"]

logger = logging.getLogger(__name__)


def max_abs_per_tensor(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(N,) float32 ``max |t|`` of each tensor: NaN if it holds a NaN, inf if an inf. One fused
    kernel per device and dtype where torch has ``_foreach_norm``."""
    if not tensors:
        return torch.zeros(0)
    if hasattr(torch, "_foreach_norm"):
        norms = torch._foreach_norm(tensors, float("inf"))
    else:
        norms = [torch.linalg.vector_norm(t, float("inf")) for t in tensors]
    device = tensors[0].device
    return torch.stack([n.float().to(device) for n in norms])


def _floating_state(model: torch.nn.Module, loss_dict: dict, grads: bool):
    """(names, tensors) the guard checks: loss terms, gradients, floating buffers."""
    names, tensors = [], []
    for k, v in loss_dict.items():
        names.append(k)  # loss_global, loss_region_res4, ...
        tensors.append(v.detach().reshape(-1))
    if grads:
        for n, p in model.named_parameters():
            if p.grad is not None:
                names.append(f"gradient of {n}")
                tensors.append(p.grad.detach())
    for n, b in model.named_buffers():
        if b.is_floating_point() and b.numel():
            names.append(f"buffer {n}")
            tensors.append(b.detach())
    return names, tensors


def find_recovery_checkpoint(save_dir: str, failed_iter: int) -> tuple[str | None, str]:
    """The newest periodic checkpoint in ``save_dir`` whose weights ran an iteration before
    ``failed_iter`` (iteration <= failed_iter - 2), that reads and holds only finite tensors.

    Returns (path or None, one line per checkpoint looked at and why it was not chosen).
    """
    files = []
    if os.path.isdir(save_dir):
        for f in os.listdir(save_dir):
            it = checkpoint_iteration(f)
            if f.endswith(".pth") and it is not None:
                files.append((it, os.path.join(save_dir, f)))
    notes = []
    for it, path in sorted(files, reverse=True):
        if it > failed_iter - 2:
            notes.append(f"{os.path.basename(path)}: its weights are the ones that failed")
            continue
        try:
            model = load_weights_file(path)["model"]
        except (CheckpointReadError, KeyError, TypeError) as e:
            notes.append(f"{os.path.basename(path)}: unreadable ({e})")
            continue
        values = [torch.as_tensor(v) for v in model.values() if hasattr(v, "dtype")]
        values = [v for v in values if v.is_floating_point() and v.numel()]
        peak = max_abs_per_tensor(values).max() if values else torch.tensor(0.0)
        if not torch.isfinite(peak):
            notes.append(f"{os.path.basename(path)}: holds non-finite values")
            continue
        return path, "\n".join(notes + [f"{os.path.basename(path)}: largest |value| {peak:.3g}"])
    return None, "\n".join(notes)


class NonFiniteGuard(HookBase):
    """Checks losses, gradients and buffers before each optimizer step (module docstring).

    Installed in ``before_train`` around the training loop's ``_write_metrics``, which detectron2's
    ``SimpleTrainer``/``AMPTrainer`` call after ``backward()`` and before ``optimizer.step()``.
    Costs one fused max-abs over the tensors and one host sync per step (plus a one-integer
    all-reduce with several processes). Gradients are not checked under ``AMPTrainer``, whose
    gradient scaler skips steps with inf gradients by design.
    """

    def before_train(self):
        loop = self.trainer._trainer
        original = loop._write_metrics

        def _write_metrics(loss_dict, data_time, prefix=""):
            self.check(loss_dict)
            return original(loss_dict, data_time, prefix)

        loop._write_metrics = _write_metrics

    def check(self, loss_dict: dict) -> None:
        loop = self.trainer._trainer
        model = loop.model.module if isinstance(loop.model, DistributedDataParallel) else loop.model
        grads = not hasattr(loop, "grad_scaler")
        names, tensors = _floating_state(model, loss_dict, grads)
        peaks = max_abs_per_tensor(tensors)
        bad = (~torch.isfinite(peaks)).any().to(torch.int32).reshape(1)
        if comm.get_world_size() > 1:  # every process stops, or none does
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bool(bad.item()):
            return
        found = [n for n, p in zip(names, peaks.tolist()) if not math.isfinite(p)]
        self._stop(found)

    def _stop(self, found: list[str]):
        trainer, it = self.trainer, self.trainer.iter
        for h in trainer._hooks:  # nothing may be saved from here on (after_train hooks run)
            if isinstance(h, hooks.PeriodicCheckpointer):
                h.checkpointer.save_to_disk = False
        if hasattr(trainer, "checkpointer"):
            trainer.checkpointer.save_to_disk = False
        what = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        here = f"non-finite values at iteration {it} on process {comm.get_rank()}: {what}"
        here = [here] if found else []
        message = None
        if comm.is_main_process():
            message = self._recovery_message(it)
        gathered = (
            comm.all_gather((here, message)) if comm.get_world_size() > 1 else [(here, message)]
        )
        lines = [line for h, _ in gathered for line in h]
        message = gathered[0][1]
        text = f"Training stopped before the optimizer step: {'; '.join(lines)}. " + message
        if comm.is_main_process():
            logger.error(text)
        raise FloatingPointError(text)

    def _recovery_message(self, it: int) -> str:
        cfg = self.trainer.cfg
        path, notes = find_recovery_checkpoint(cfg.OUTPUT_DIR, it)
        if cfg.RESIM.SCHEDULE.LR_PER_256 > 0:  # it sets SOLVER.BASE_LR (resolve_pretrain_schedule)
            lower = f"lower RESIM.SCHEDULE.LR_PER_256 (now {cfg.RESIM.SCHEDULE.LR_PER_256:g})"
        else:
            lower = f"lower SOLVER.BASE_LR (now {cfg.SOLVER.BASE_LR:g})"
        if path is None:
            return (
                "The weights were not updated with them and no checkpoint was written after them. "
                "No checkpoint whose weights gave finite values was found"
                + (f" ({notes.replace(chr(10), '; ')})" if notes else "")
                + f": start again without --resume, with a {lower}."
            )
        ckpt = self.trainer.checkpointer
        tagged = ckpt.get_checkpoint_file() if ckpt.has_checkpoint() else ""
        if os.path.abspath(tagged or "") != os.path.abspath(path):
            ckpt.tag_last_checkpoint(os.path.basename(path))
        return (
            "The weights were not updated with them and no checkpoint was written after them. "
            f"Checkpoint to continue from: {path} (its weights gave finite losses, gradients "
            f"and statistics at iteration {checkpoint_iteration(path) + 1}; newer ones hold the "
            "weights that failed, and are kept). last_checkpoint now points at it: continue with "
            f"--resume and a {lower}, or SOLVER.CLIP_GRADIENTS; --resume applies changed SOLVER "
            "keys from the resumed iteration on. "
            f"Checkpoints looked at:\n{notes}"
        )
