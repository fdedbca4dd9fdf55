"""VOC AP at each IoU threshold (closed-form references on the synthetic VOC fixture); plot tool."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from resim_d2.evaluation.voc_ap_iou import JSON_NAME, PascalVOCDetectionEvaluatorAllIoU

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, Instances

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THRESHOLDS = [0.5 + 0.05 * i for i in range(10)]


def _scaled(box, s):
    """``box`` (x0, y0, x1, y1) scaled about its centre by ``s`` per side: IoU with it is s**2."""
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, s * (x1 - x0) / 2, s * (y1 - y0) / 2
    return [cx - hw, cy - hh, cx + hw, cy + hh]


def _evaluate(test_name, out_dir, iou_per_class, ev=None):
    """Run the evaluator on the ground truth boxes, each scaled to IoU ``iou_per_class[class]``."""
    ev = ev or PascalVOCDetectionEvaluatorAllIoU(test_name, output_dir=out_dir)
    ev.reset()
    for record in DatasetCatalog.get(test_name):
        annos = record["annotations"]
        boxes = [_scaled(a["bbox"], math.sqrt(iou_per_class[a["category_id"]])) for a in annos]
        inst = Instances((record["height"], record["width"]))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(annos))
        inst.pred_classes = torch.tensor([a["category_id"] for a in annos], dtype=torch.int64)
        ev.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    return ev.evaluate()["bbox"]


def test_perfect_predictions_give_100_at_every_iou(synthetic_voc, tmp_path):
    _, test_name, _ = synthetic_voc
    bbox = _evaluate(test_name, str(tmp_path), {0: 1.0, 1: 1.0, 2: 1.0})
    names = ["AP", "AP50", "AP75"] + [f"AP{t}" for t in range(55, 100, 5) if t != 75]
    assert list(bbox)[:3] == ["AP", "AP50", "AP75"]
    assert sorted(bbox) == sorted(names)
    for k, v in bbox.items():
        assert v == pytest.approx(100.0), k


def test_shrunk_boxes_give_ap_from_closed_form_iou(synthetic_voc, tmp_path):
    """A box scaled about its centre by s lies inside the original: IoU = s^2 exactly.

    Predictions are written with 0.1 px precision, which moves the IoU of the smallest box (16 px)
    by < 0.01; the chosen IoUs are 0.025 away from every threshold. A detection counts when
    IoU > threshold, so class c scores 100 at thresholds below its IoU and 0 above.
    """
    _, test_name, _ = synthetic_voc
    classes = MetadataCatalog.get(test_name).thing_classes
    iou = {0: 0.525, 1: 0.725, 2: 0.925}
    bbox = _evaluate(test_name, str(tmp_path), iou)

    expected_per_class = {c: [100.0 if t < iou[c] else 0.0 for t in THRESHOLDS] for c in iou}
    expected = [sum(expected_per_class[c][i] for c in iou) / 3 for i in range(10)]
    got = [bbox[f"AP{round(t * 100)}"] for t in THRESHOLDS]
    assert got == pytest.approx(expected)
    assert bbox["AP"] == pytest.approx(sum(expected) / 10)  # 100 * (1 + 5 + 9) / 30 = 50
    # detectron2's own evaluator agrees on the three numbers it reports
    d2 = _evaluate(test_name, None, iou, ev=PascalVOCDetectionEvaluator(test_name))
    assert {k: bbox[k] for k in d2} == pytest.approx(d2)

    with open(os.path.join(tmp_path, JSON_NAME)) as f:
        record = json.load(f)
    assert record["thresholds"] == pytest.approx(THRESHOLDS)
    assert record["ap"] == pytest.approx(expected)
    assert list(record["per_class"]) == list(classes)
    for c, name in enumerate(classes):
        assert record["per_class"][name] == pytest.approx(expected_per_class[c]), name


def test_registered_for_pascal_voc(synthetic_voc, tmp_path):
    from resim_d2.config import add_resim_config
    from resim_d2.evaluation import build_evaluator

    from detectron2.config import get_cfg

    cfg = add_resim_config(get_cfg())
    cfg.RESIM.EVALUATOR = "pascal_voc"  # register_pascal_voc sets no evaluator_type
    ev = build_evaluator(cfg, synthetic_voc[1], str(tmp_path))
    assert isinstance(ev, PascalVOCDetectionEvaluatorAllIoU)
    assert ev._output_dir == str(tmp_path)


def _write_run(path, thresholds, ap):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, JSON_NAME), "w") as f:
        json.dump({"thresholds": thresholds, "ap": ap, "per_class": {}}, f)


def test_plot_tool_writes_png(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import plot_ap_iou
    finally:
        sys.path.pop(0)
    base = [80.0 - 8 * i for i in range(10)]
    _write_run(tmp_path / "moco", THRESHOLDS, base)
    _write_run(tmp_path / "resim", THRESHOLDS, [a + 0.5 * i for i, a in enumerate(base)])
    runs = {"moco": plot_ap_iou.load_run(str(tmp_path / "moco"))}
    runs["resim"] = plot_ap_iou.load_run(str(tmp_path / "resim" / JSON_NAME))
    t, deltas = plot_ap_iou.delta_ap(runs, "moco", max_iou=0.9)
    assert t == pytest.approx(THRESHOLDS[:9])
    assert deltas["resim"] == pytest.approx([0.5 * i for i in range(9)])

    out = tmp_path / "fig" / "ap_iou.png"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "plot_ap_iou.py")]
        + [f"moco={tmp_path / 'moco'}", f"resim={tmp_path / 'resim'}", "-o", str(out)]
        + ["--baseline", "moco"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
