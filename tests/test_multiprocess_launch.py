"""tools/train_net.py as users run it on a cluster, on this CPU machine: 2 processes (--num-gpus 2)
and (slow) 2 "machines" on localhost (--num-machines 2, each rank started on its own).

Both must give the losses and weights of a 1-process run at the same total batch (GroupNorm, so
samples do not interact), write checkpoints, metrics and log.txt from rank 0 only, pool every
rank's skipped files into log.txt, and --resume of a 2-process run must continue exactly.
"""

import glob
import os
import re
import shutil

import pytest
import torch
from helpers.images import BAD, Spy, image_folder
from helpers.train_net_runner import (
    DEMO_CONFIG,
    GROUP_NORM,
    TINY,
    free_port,
    metrics,
    tiny_demo_cfg,
    train_net,
)

from resim_d2.data.stream import StreamDataset
from resim_d2.data.two_view_mapper import TwoViewMapper

from detectron2.engine import default_argument_parser

ITERS = 2
OPTS = [
    *TINY,
    *GROUP_NORM,
    "DATASETS.TRAIN", "('imagenet_train',)",
    "SOLVER.MAX_ITER", str(ITERS),
    "SOLVER.CHECKPOINT_PERIOD", "1",
    "SOLVER.BASE_LR", "0.01",
]  # fmt: skip


def _reference_run(load_tool, root, out):
    """The 1-process run, in this process (one thread, as the subprocesses)."""
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(root)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["--config-file", DEMO_CONFIG, *OPTS, "OUTPUT_DIR", str(out)]
        load_tool("train_net").main(default_argument_parser().parse_args(args))
    finally:
        torch.set_num_threads(before)
        if old is None:
            del os.environ["DETECTRON2_DATASETS"]
        else:
            os.environ["DETECTRON2_DATASETS"] = old


def _finish(*procs):
    for p in procs:
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0, log[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, load_tool):
    """{name: output folder} of the 1-process, 2-process and resumed 2-process runs, and the
    datasets root."""
    root = tmp_path_factory.mktemp("multiprocess")
    image_folder(str(root / "imagenet" / "train" / "n0000001"))
    env = {"DETECTRON2_DATASETS": str(root)}
    out = {k: root / k for k in ("one", "two_gpus", "resumed")}
    url = f"tcp://127.0.0.1:{free_port()}"
    flags = ["--num-gpus", "2", "--dist-url", url]
    two = train_net(
        *OPTS, "OUTPUT_DIR", str(out["two_gpus"]), flags=flags, env=env, background=True
    )
    _reference_run(load_tool, root, out["one"])  # meanwhile
    _finish(two)
    # --resume of the 2-process run from its first checkpoint, in a fresh folder
    out["resumed"].mkdir()
    shutil.copy(out["two_gpus"] / "model_0000000.pth", out["resumed"])
    (out["resumed"] / "last_checkpoint").write_text("model_0000000.pth")
    flags = ["--num-gpus", "2", "--dist-url", f"tcp://127.0.0.1:{free_port()}", "--resume"]
    _finish(
        train_net(*OPTS, "OUTPUT_DIR", str(out["resumed"]), flags=flags, env=env, background=True)
    )
    return out, root


def _weights(folder, name):
    return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)["model"]


def _close(a, b, atol, rtol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=rtol, msg=k)


def _matches_one_process(folder, one):
    last, ref = metrics(folder)[-1], metrics(one)[-1]
    assert last["iteration"] == ITERS - 1
    for key in ("loss_global", "loss_region_res4", "total_loss", "lr"):
        # metrics.json: the mean over processes of each loss, median over the iterations
        assert last[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    # weights after the first step: equal up to float32 summation order
    _close(_weights(folder, "model_0000000.pth"), _weights(one, "model_0000000.pth"), 1e-6, 1e-5)
    # after the second: this tiny model amplifies those rounding differences (~1e-4 relative in
    # the second step's gradients; docs/pretraining.md's naiveSyncBN note shows the same effect)
    _close(_weights(folder, "model_final.pth"), _weights(one, "model_final.pth"), 2e-4, 1e-3)


def test_two_processes_match_one_process(runs):
    out, _ = runs
    _matches_one_process(out["two_gpus"], out["one"])


@pytest.mark.slow
def test_two_machines_match_two_processes_and_one_process(runs, tmp_path):
    """--num-machines 2 on localhost: each machine's rank started as its own command."""
    out, root = runs
    url = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        train_net(*OPTS, "OUTPUT_DIR", str(tmp_path), background=True,
                  flags=["--num-machines", "2", "--machine-rank", str(r), "--dist-url", url],
                  env={"DETECTRON2_DATASETS": str(root)})
        for r in (0, 1)
    ]  # fmt: skip
    _finish(*procs)
    _matches_one_process(tmp_path, out["one"])
    # the same reductions as --num-gpus 2: identical weights
    _close(
        _weights(tmp_path, "model_final.pth"), _weights(out["two_gpus"], "model_final.pth"), 0, 0
    )
    _only_rank_0_writes(tmp_path)


def _only_rank_0_writes(folder):
    files = sorted(os.listdir(folder))
    events = [f for f in files if f.startswith("events.out.tfevents")]
    assert len(events) == 1, files
    expected = ["config.yaml", "last_checkpoint", "log.txt", "log.txt.rank1", "metrics.json"]
    expected += ["model_0000000.pth", "model_0000001.pth", "model_final.pth"]
    assert sorted(set(files) - set(events)) == expected, files  # no temporary file left either
    rank0 = (folder / "log.txt").read_text()
    rank1 = (folder / "log.txt.rank1").read_text()  # detectron2's log of process 1
    assert "Rank of current process: 0. World size: 2" in rank0
    assert "Rank of current process: 1. World size: 2" in rank1
    assert rank0.count("Saving checkpoint to") == 3 and "Saving checkpoint" not in rank1
    assert len(metrics(folder)) == 1  # one writer


def test_only_rank_0_writes_checkpoints_metrics_and_log(runs):
    out, _ = runs
    _only_rank_0_writes(out["two_gpus"])


def test_resume_of_two_processes_continues_exactly(runs):
    out, _ = runs
    log = (out["resumed"] / "log.txt").read_text()
    assert "Loading from " + str(out["resumed"] / "model_0000000.pth") in log
    # the same file, the same data, the same shuffle-BN permutation (torch's random state is in
    # the checkpoint): the same weights, bit for bit
    resumed_w = _weights(out["resumed"], "model_final.pth")
    _close(resumed_w, _weights(out["two_gpus"], "model_final.pth"), 0, 0)
    full, resumed = metrics(out["two_gpus"])[-1], metrics(out["resumed"])[-1]
    assert resumed["iteration"] == full["iteration"]
    # the running total of skipped files continues across --resume
    assert resumed["data/skipped_images"] == full["data/skipped_images"]


def test_every_rank_skipped_files_reach_log_txt_with_a_running_total(runs):
    out, root = runs
    # the reference: the stream's first ITERS x 4 draws, with a spy on the mapper
    records = sorted(glob.glob(str(root / "imagenet" / "train" / "n0000001" / "*")))
    records = [{"file_name": f, "image_id": i} for i, f in enumerate(records)]
    spy = Spy(TwoViewMapper(tiny_demo_cfg(*GROUP_NORM), is_train=True))
    ds = StreamDataset(records, spy, seed=3)
    rank1_skips = 0
    for p in range(4 * ITERS):
        before = len(spy.rejected)
        ds[p]
        rank1_skips += (len(spy.rejected) - before) * (p % 4 >= 2)  # positions 2, 3: rank 1's
    assert spy.rejected and {os.path.basename(f) for f in spy.rejected} == set(BAD)
    for name in ("one", "two_gpus"):
        text = (out[name] / "log.txt").read_text()
        logged = re.findall(r"WARNING: skipped (\S+?)(?: \(process \d\))?: (.+)", text)
        assert sorted(f for f, _ in logged) == sorted(spy.rejected), (name, logged)
        assert all("not a readable image" in why or "cannot decode" in why for _, why in logged)
        assert metrics(out[name])[-1]["data/skipped_images"] == len(spy.rejected)
    # rank 1's files are among them, in rank 0's log
    text = (out["two_gpus"] / "log.txt").read_text()
    assert text.count("(process 1)") == rank1_skips and rank1_skips > 0
