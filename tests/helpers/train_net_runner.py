"""Running tools/train_net.py as a user does, on tiny CPU pre-training configs (the demo config
shrunk to seconds), and the same config built in this process."""

import json
import os
import socket
import subprocess
import sys

from resim_d2 import add_resim_config, get_config_file

from detectron2.config import get_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
DEMO_CONFIG = os.path.join(REPO, "configs", "pretrain", "demo_resim_c4_cpu.yaml")

# The CPU demo shrunk to seconds: a narrow ResNet-50 (16-256 channels, 0.8M parameters per
# encoder), 64-px views with 32-px windows (2x2 per view pair at most), batch 4, narrow heads, no
# evaluation, no dataloader workers, a fixed learning rate.
TINY = [
    "MODEL.RESNETS.DEPTH", "50",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
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
# (GroupNorm's 32 groups need 32-channel multiples: a wider stem and bottleneck)
GROUP_NORM = [
    "MODEL.RESNETS.NORM", "GN",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "32",
    "RESIM.REGION.HEAD_DIM", "32",
    "RESIM.REGION.GATHER_NEGATIVES", "[True]",
]  # fmt: skip
# one intra-op thread per process: tiny models on a shared 2-core machine run several times faster
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_net(*opts, flags=(), env=None, timeout=600, background=False):
    """``python tools/train_net.py --config-file <demo> FLAGS OPTS``; returns the CompletedProcess
    (or the Popen with ``background``), output captured as text."""
    cmd = [sys.executable, TRAIN_NET, "--config-file", DEMO_CONFIG, *flags, *opts]
    full_env = dict(os.environ, **ONE_THREAD, **(env or {}))
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


def tiny_demo_cfg(*opts):
    """The TINY pre-training config, in this process, with ``opts`` merged."""
    cfg = add_resim_config(get_cfg())
    cfg.merge_from_file(get_config_file("pretrain/demo_resim_c4_cpu.yaml"))
    cfg.merge_from_list([*TINY, *opts])
    return cfg
