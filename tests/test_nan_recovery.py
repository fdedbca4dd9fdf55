"""A diverging run stops before bad values reach the weights, names a checkpoint that recovers, and
--resume with a lower learning rate continues from it at that rate."""

import glob
import logging
import math
import os
import re

import pytest
import torch
from helpers.train_net_runner import TINY, metrics, tiny_demo_cfg, train_net

from resim_d2.engine import Trainer

from detectron2.engine import HookBase


def _finite(path) -> bool:
    model = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_absurd_learning_rate_stops_naming_a_checkpoint_that_resumes(tmp_path):
    out = str(tmp_path / "run")
    opts = [*TINY, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "1"]
    run = train_net(*opts, "SOLVER.BASE_LR", "100000.0")
    assert run.returncode != 0
    m = re.search(r"Checkpoint to continue from: (\S+model_(\d+)\.pth)", run.stderr)
    assert m, run.stderr[-3000:]
    named, named_iter = m.group(1), int(m.group(2))
    failed_iter = int(re.search(r"non-finite values at iteration (\d+)", run.stderr).group(1))
    assert named_iter <= failed_iter - 2  # its weights ran one more iteration, with finite values
    # no checkpoint holds a non-finite value (before, the newest ones held inf BN variances)
    saved = sorted(glob.glob(os.path.join(out, "model_*.pth")))
    assert saved and all(_finite(p) for p in saved), saved
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    assert max(int(p[-11:-4]) for p in saved) == failed_iter - 1  # nothing saved after the failure
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == os.path.basename(named)

    # --resume at a lower rate (and a shorter schedule) continues from the named checkpoint to a
    # finite loss, at the config's rate from the resumed iteration on
    end = named_iter + 3
    opts[opts.index("SOLVER.MAX_ITER") + 1] = str(end)
    resumed = train_net(*opts, "SOLVER.BASE_LR", "0.001", flags=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert f"Loading from {named}" in log
    assert "--resume: SOLVER.BASE_LR 100000.0 -> 0.001; SOLVER.MAX_ITER 12 -> " in log
    last = metrics(out)[-1]
    assert last["iteration"] == end - 1 and math.isfinite(last["total_loss"])
    # WarmupCosineLR without warm-up: lr_t = base * (1 + cos(pi * t / MAX_ITER)) / 2
    expected = 0.001 * (1 + math.cos(math.pi * (end - 1) / end)) / 2
    assert last["lr"] == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------------- in-process
class _InfStatisticAt(HookBase):
    """Puts inf in one batch-norm running variance before step ``it``: the training loss stays
    finite (training uses batch statistics), so a loss-only check would save it."""

    def __init__(self, it):
        self.it = it

    def before_step(self):
        if self.trainer.iter == self.it:
            with torch.no_grad():
                self.trainer.model.backbone.res2[0].conv1.norm.running_var[0] = float("inf")


def _train(cfg, hooks=(), resume=False):
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.register_hooks(list(hooks))
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def test_non_finite_statistic_with_finite_loss_stops_before_anything_is_saved(tmp_path, one_thread):
    cfg = tiny_demo_cfg(
        "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "1"
    )
    with pytest.raises(FloatingPointError) as e:
        _train(cfg, [_InfStatisticAt(3)])
    text = str(e.value)
    assert "iteration 3" in text and "backbone.res2.0.conv1.norm.running_var" in text
    assert "loss_global" not in text.split("Checkpoint")[0]  # the losses were finite
    assert f"Checkpoint to continue from: {tmp_path / 'model_0000001.pth'}" in text
    saved = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "model_*.pth")))
    assert saved == ["model_0000000.pth", "model_0000001.pth", "model_0000002.pth"]
    assert all(_finite(tmp_path / p) for p in saved)
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000001.pth"


def test_resume_applies_changed_schedule_keys(tmp_path, caplog, one_thread):
    class _Stop(HookBase):
        def after_step(self):
            if self.trainer.iter == 1:
                raise KeyboardInterrupt  # "killed" after the checkpoint of iteration 1

    base = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.BASE_LR", "0.05"]
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_demo_cfg("OUTPUT_DIR", str(tmp_path), *base), [_Stop()])
    changed = base[:-1] + ["0.002", "SOLVER.MOMENTUM", "0.5", "SOLVER.WEIGHT_DECAY", "0.001"]
    with caplog.at_level(logging.WARNING, logger="resim_d2"):
        trainer = Trainer(tiny_demo_cfg("OUTPUT_DIR", str(tmp_path), *changed))
        trainer.resume_or_load(resume=True)
        trainer.before_train()
    assert trainer.start_iter == 2
    for group, lr in zip(trainer.optimizer.param_groups, trainer.scheduler.base_lrs):
        assert lr == 0.002 and group["initial_lr"] == 0.002 and group["momentum"] == 0.5
        assert group["lr"] == pytest.approx(0.002 * (1 + math.cos(math.pi * 2 / 4)) / 2)
        assert group["weight_decay"] in (0.001, trainer.cfg.SOLVER.WEIGHT_DECAY_NORM)
    # momentum buffers of the interrupted run are kept
    state = trainer.optimizer.state_dict()["state"]
    assert state and all("momentum_buffer" in s for s in state.values())
    for text in ("SOLVER.BASE_LR 0.05 -> 0.002", "SOLVER.MOMENTUM 0.9 -> 0.5", "iteration 2"):
        assert text in caplog.text
