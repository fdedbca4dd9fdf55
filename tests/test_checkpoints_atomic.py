"""Checkpoints are written atomically, and --resume skips a newest checkpoint that does not load."""

import multiprocessing
import os
import shutil
import signal

import pytest
import torch
from helpers.train_net_runner import DEMO_CONFIG, TINY, metrics, train_net

from resim_d2.checkpoint import CheckpointReadError, ResumableCheckpointer

from detectron2.engine import default_argument_parser


class _Counter:
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _checkpointer(folder, seed=0):
    torch.manual_seed(seed)
    counter = _Counter()
    return ResumableCheckpointer(torch.nn.Linear(64, 64), str(folder), counter=counter), counter


def _die_while_saving(folder):
    """Child process: save one checkpoint, then get SIGKILLed half-way through the next write."""
    ckpt, counter = _checkpointer(folder)
    counter.value = 1
    ckpt.save("model_0000001", iteration=1)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f, *args, **kwargs)

    torch.save = dying_save
    counter.value = 3
    ckpt.save("model_0000003", iteration=3)


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_in_charge(tmp_path, caplog):
    child = multiprocessing.get_context("fork").Process(target=_die_while_saving, args=(tmp_path,))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    names = sorted(os.listdir(tmp_path))
    # the half-written file never took the final name; the tag still names the last good one
    assert "model_0000003.pth" not in names and "model_0000001.pth" in names
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    leftovers = [n for n in names if n.startswith(".model_0000003.pth.tmp-")]
    assert len(leftovers) == 1
    ckpt, counter = _checkpointer(tmp_path, seed=1)
    with caplog.at_level("WARNING", logger="resim_d2"):
        extra = ckpt.resume_or_load("", resume=True)
    assert extra["iteration"] == 1 and counter.value == 1
    assert "incomplete write" in caplog.text and leftovers[0] in caplog.text


def test_a_failed_write_keeps_the_old_file(tmp_path):
    ckpt, _ = _checkpointer(tmp_path)
    ckpt.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()

    class _DiskFull(OSError):
        pass

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise _DiskFull("No space left on device")

    real_save, torch.save = torch.save, failing_save
    try:
        with pytest.raises(_DiskFull):
            ckpt.save("model_0000001", iteration=1)
    finally:
        torch.save = real_save
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_resume_falls_back_past_unreadable_checkpoints_and_says_why(tmp_path, caplog):
    ckpt, counter = _checkpointer(tmp_path)
    for it in (1, 3, 5):
        counter.value = it
        ckpt.save(f"model_{it:07d}", iteration=it)
    full = (tmp_path / "model_0000005.pth").read_bytes()
    (tmp_path / "model_0000005.pth").write_bytes(full[: len(full) // 2])  # a truncated copy
    (tmp_path / "model_0000003.pth").write_bytes(b"")  # a full disk
    fresh, counter = _checkpointer(tmp_path, seed=1)
    with caplog.at_level("WARNING", logger="resim_d2"):
        assert fresh.resume_or_load("", resume=True)["iteration"] == 1
    assert counter.value == 1
    assert "skipping " + str(tmp_path / "model_0000005.pth") in caplog.text
    assert "truncated or damaged" in caplog.text and "an empty file" in caplog.text
    # nothing readable: stop, naming every file, instead of starting over
    (tmp_path / "model_0000001.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointReadError, match="rather than start over") as e:
        _checkpointer(tmp_path)[0].resume_or_load("", resume=True)
    for it in (1, 3, 5):
        assert f"model_{it:07d}.pth" in str(e.value)


def test_train_net_resume_past_a_truncated_newest_checkpoint_continues_exactly(
    tmp_path, load_tool, one_thread
):
    """The uninterrupted run (in this process) against --resume through tools/train_net.py from a
    folder whose newest checkpoint is truncated: same final weights as the uninterrupted run."""
    tool = load_tool("train_net")
    full = tmp_path / "full"
    opts = [*TINY, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1"]
    args = default_argument_parser().parse_args(
        ["--config-file", DEMO_CONFIG, *opts, "OUTPUT_DIR", str(full)]
    )
    tool.main(args)
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("model_0000000.pth", "model_0000001.pth"):
        shutil.copy(full / name, cut / name)
    data = (full / "model_0000002.pth").read_bytes()
    (cut / "model_0000002.pth").write_bytes(data[: len(data) * 2 // 3])  # the copy was cut short
    (cut / "last_checkpoint").write_text("model_0000002.pth")
    run = train_net(*opts, "OUTPUT_DIR", str(cut), flags=["--resume"])
    assert run.returncode == 0, run.stderr[-3000:]
    log = (cut / "log.txt").read_text()
    assert f"--resume: skipping {cut / 'model_0000002.pth'}" in log
    assert f"continuing from {cut / 'model_0000001.pth'}" in log
    a = torch.load(full / "model_final.pth", weights_only=True)["model"]
    b = torch.load(cut / "model_final.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert metrics(cut)[-1]["iteration"] == 3
