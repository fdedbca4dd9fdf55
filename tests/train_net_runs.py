"""Running tools/train_net.py as a user does, on tiny CPU pre-training configs (shared by tests)."""

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
DEMO_CONFIG = os.path.join(REPO, "configs", "pretrain", "demo_resim_c4_cpu.yaml")

# The CPU demo shrunk to seconds: ResNet-18, 64-px views with 32-px windows (2x2 per view pair at
# most), batch 4, narrow heads, no evaluation, no dataloader workers, a fixed learning rate.
TINY = [
    "SOLVER.IMS_PER_BATCH", "4",
    "RESIM.VIEWS.SIZE", "64",
    "RESIM.REGION.WINDOW_SIZES", "[32]",
    "RESIM.REGION.WINDOW_STRIDES", "[16]",
    "RESIM.REGION.HEAD_DIM", "16",
    "RESIM.MOCO.MLP_DIM", "32",
    "RESIM.MOCO.DIM", "16",
    "RESIM.MOCO.QUEUE_SIZE", "16",
    "RESIM.SCHEDULE.LR_PER_256", "0.0",
    "SOLVER.BASE_LR", "0.05",
    "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TEST", "()",
    "TEST.EVAL_PERIOD", "0",
    "SEED", "3",
]  # fmt: skip
# GroupNorm couples no samples: 2 processes x 2 images compute what 1 process x 4 images does
GROUP_NORM = ["MODEL.RESNETS.NORM", "GN", "RESIM.REGION.GATHER_NEGATIVES", "[True]"]


def train_net(*args, env=None, timeout=600, background=False):
    """``python tools/train_net.py --config-file <demo> ARGS`` (opts after the flags); returns the
    CompletedProcess (or the Popen with ``background``), output captured as text."""
    cmd = [sys.executable, TRAIN_NET, "--config-file", DEMO_CONFIG, *args]
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    kw = dict(cwd=REPO, env=full_env, text=True)
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    return subprocess.run(cmd, capture_output=True, timeout=timeout, **kw)


def metrics(out_dir) -> list[dict]:
    """metrics.json of a run: one dict per line written."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
