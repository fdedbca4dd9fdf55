"""Every transfer target trains and evaluates through tools/train_net.py on generated data in its
real on-disk layout (resim_d2.utils.synthetic_transfer), found through $DETECTRON2_DATASETS by
the datasets the configs name: one CLI run per target ending with its evaluator's table, every
config under configs/finetune/ trained for an iteration, and --eval-only loading weights with the
run kind's checkpointer (RESIM.FINETUNE.TRANSFER_FPN)."""

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from resim_d2.utils.projects import required_projects

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(REPO, "configs", "finetune")
HAS_DENSEPOSE = importlib.util.find_spec("densepose") is not None

# a ResNet-18 trunk, narrow heads, 96-160 px images, batch 2, two iterations, no loader workers
SHRINK = [
    "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # untrained detectors still give evaluators boxes
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "160", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
    "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100000",
    "TEST.EVAL_PERIOD", "0", "TEST.PRECISE_BN.NUM_ITER", "2", "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
SHRINK_DENSEPOSE = [
    "MODEL.ROI_DENSEPOSE_HEAD.CONV_HEAD_DIM", "16",
    "MODEL.ROI_DENSEPOSE_HEAD.DECODER_CONV_DIMS", "16",
    "MODEL.ROI_DENSEPOSE_HEAD.NUM_STACKED_CONVS", "2",
    "MODEL.ROI_DENSEPOSE_HEAD.DECODER_NUM_CLASSES", "32",  # = FPN.OUT_CHANNELS: feeds the head
]  # fmt: skip

needs_densepose = pytest.mark.skipif(not HAS_DENSEPOSE, reason="DensePose project not installed")


def shrink(config):
    return SHRINK + (SHRINK_DENSEPOSE if "densepose" in config else [])


def env_for(root):
    return dict(os.environ, DETECTRON2_DATASETS=root, OMP_NUM_THREADS="1")


def train_net(root, config, out, *extra, cwd=None, check=True):
    """tools/train_net.py on ``config`` (shrunk) with the generated datasets; its output."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file"]
    cmd += [os.path.join(FINETUNE, config), *extra, *shrink(config), "OUTPUT_DIR", str(out)]
    run = subprocess.run(
        cmd, env=env_for(root), cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if check and run.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}")
    return run


def metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def csv_tables(log):
    """{task: [metric names]} of the evaluator tables train_net printed (copypaste lines)."""
    lines = [line.split("copypaste: ", 1)[1] for line in log.splitlines() if "copypaste: " in line]
    return {
        lines[i][len("Task: ") :]: lines[i + 1].split(",")
        for i in range(len(lines) - 1)
        if lines[i].startswith("Task: ")
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from resim_d2.utils.synthetic_transfer import write_transfer_datasets

    return write_transfer_datasets(str(tmp_path_factory.mktemp("d2datasets")), train=4, test=2)


# ---------------------------------------------------------------- one CLI run per target
def test_voc_trains_and_prints_the_voc_table(root, tmp_path):
    run = train_net(root, "voc_R50_C4_24k.yaml", tmp_path / "out")
    tables = csv_tables(run.stdout + run.stderr)
    assert tables["bbox"][:4] == ["AP", "AP50", "AP75", "AP55"]  # VOC metric at every IoU
    assert (tmp_path / "out" / "inference" / "voc_ap_per_iou.json").is_file()
    rows = metrics(tmp_path / "out")
    assert math.isfinite(rows[-2]["total_loss"]) and "bbox/AP50" in rows[-1]


def test_coco_mask_rcnn_trains_and_prints_box_and_mask_tables(root, tmp_path):
    run = train_net(root, "coco_R50_FPN_1x.yaml", tmp_path / "out")
    tables = csv_tables(run.stdout + run.stderr)
    assert tables["bbox"] == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert tables["segm"] == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    losses = metrics(tmp_path / "out")[-2]
    assert all(math.isfinite(losses[k]) for k in ("loss_cls", "loss_box_reg", "loss_mask"))


def test_cityscapes_trains_evaluates_and_keeps_matches_in_the_output_folder(root, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = train_net(root, "cityscapes_R50_FPN.yaml", tmp_path / "out", cwd=str(cwd))
    assert csv_tables(run.stdout + run.stderr)["segm"] == ["AP", "AP50"]
    assert (tmp_path / "out" / "inference" / "matches.json").is_file()
    assert not os.listdir(cwd)  # the Cityscapes scripts wrote nothing where the command ran
    assert "loss_mask" in metrics(tmp_path / "out")[-2]


@needs_densepose
def test_densepose_trains_with_every_densepose_loss_and_right_labels(root, tmp_path):
    run = train_net(root, "densepose_R50_FPN_s1x.yaml", tmp_path / "out")
    tables = csv_tables(run.stdout + run.stderr)
    assert set(tables) == {"bbox", "densepose_gps", "densepose_gpsm", "densepose_segm"}
    assert tables["densepose_gpsm"][:3] == ["AP", "AP50", "AP75"]
    for row in metrics(tmp_path / "out")[:-1]:  # the training iterations
        losses = {k: v for k, v in row.items() if k.startswith("loss_densepose_")}
        assert set(losses) == {f"loss_densepose_{t}" for t in "IUVS"}, row
        assert all(math.isfinite(v) for v in losses.values())
        # "person" is class 0 of NUM_CLASSES 1: foreground RoIs exist and the head is trained
        # (mapped to 1, the background index, there would be none)
        assert row["roi_head/num_fg_samples"] > 0


# ---------------------------------------------------------------- every config, one iteration
_EVERY = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("train_net", {train_net!r})
train_net = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_net)
from detectron2.engine import default_argument_parser
for config, opts in json.loads(sys.argv[1]):
    train_net.main(default_argument_parser().parse_args(["--config-file", config] + opts))
"""


# run through the CLI above, with their tables checked
CLI_RUNS = {
    "voc_R50_C4_24k.yaml",
    "coco_R50_FPN_1x.yaml",
    "cityscapes_R50_FPN.yaml",
    "densepose_R50_FPN_s1x.yaml",
}


def test_every_finetune_config_trains_an_iteration_and_evaluates(root, tmp_path):
    """All other configs but the bases, unchanged but for the shrinking overrides, in one process
    calling tools/train_net.py's main() per config: one iteration, then its evaluator."""
    configs = sorted(
        os.path.basename(p)
        for p in glob.glob(os.path.join(FINETUNE, "*.yaml"))
        if not os.path.basename(p).startswith("Base-") and os.path.basename(p) not in CLI_RUNS
    )
    if not HAS_DENSEPOSE:
        configs = [c for c in configs if not required_projects(os.path.join(FINETUNE, c))]
    jobs = [
        [
            os.path.join(FINETUNE, c),
            shrink(c) + ["SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path / c)],
        ]
        for c in configs
    ]
    code = _EVERY.format(train_net=os.path.join(REPO, "tools", "train_net.py"))
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), json.dumps(jobs)],
        env=env_for(root),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-6000:]
    tasks = {"bbox", "segm", "densepose_gps", "densepose_gpsm", "densepose_segm"}
    for c in configs:
        train, evaluation = metrics(tmp_path / c)
        assert train["iteration"] == 0 and math.isfinite(train["total_loss"]), (c, train)
        assert {k.split("/")[0] for k in evaluation} & tasks, (c, evaluation)
    log = run.stdout + run.stderr
    assert log.count("copypaste: Task: ") >= len(configs)  # each printed its evaluator's table
    assert len(configs) + len(CLI_RUNS) >= 17 - (0 if HAS_DENSEPOSE else 4)


# ---------------------------------------------------------------- --eval-only
def _converted(path, with_fpn):
    """A tools/convert.py-style file for the shrunk FPN detector: ResNet (and FPN) weights."""
    from resim_d2 import add_resim_config

    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = add_resim_config(get_cfg())
    cfg.merge_from_file(os.path.join(FINETUNE, "coco_R50_FPN_1x.yaml"))
    cfg.merge_from_list(SHRINK)
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    keep = ("backbone.bottom_up.", "backbone.fpn_") if with_fpn else ("backbone.bottom_up.",)
    model = {k: v for k, v in state.items() if k.startswith(keep)}
    torch.save({"model": model, "__author__": "resim_d2", "matching_heuristics": False}, path)
    return path


def test_eval_only_loads_weights_with_the_transfer_checkpointer(root, tmp_path):
    resnet_only = _converted(str(tmp_path / "resnet_only.pth"), with_fpn=False)
    # ReSim-FPN^T needs FPN weights: the same refusal as in training (the plain checkpointer
    # --eval-only used before loaded the file and evaluated a half-initialised FPN)
    run = train_net(
        root, "coco_R50_FPN_1x_fpnT.yaml", tmp_path / "a", "--eval-only",
        "MODEL.WEIGHTS", resnet_only, check=False,
    )  # fmt: skip
    assert run.returncode != 0 and "holds no FPN weights" in run.stderr
    # ReSim-FPN ignores the FPN weights a conversion carries (evaluation: the CLI tests above)
    with_fpn = _converted(str(tmp_path / "with_fpn.pth"), with_fpn=True)
    run = train_net(
        root, "coco_R50_FPN_1x.yaml", tmp_path / "b", "--eval-only", "MODEL.WEIGHTS", with_fpn,
        "DATASETS.TEST", "()",
    )  # fmt: skip
    assert "TRANSFER_FPN is False: ignoring" in run.stdout + run.stderr
