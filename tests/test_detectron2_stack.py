"""detectron2 v0.6 on today's stack, through resim_d2's compat: detectors train and infer on CPU,
evaluators score known answers, checkpoints round-trip."""

import copy
import math

import numpy as np
import pytest
import torch

from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.engine import SimpleTrainer
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances, polygons_to_bitmask
from detectron2.utils.events import EventStorage


def _small_cfg(zoo_config, train_name):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(zoo_config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 160
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def _train_step_and_infer(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainer = SimpleTrainer(model, build_detection_train_loader(cfg), optimizer)
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
        losses = {k: v.latest() for k, v in storage.histories().items() if k.startswith("loss")}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    moved = [
        k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, before[k])
    ]
    assert len(moved) > 0.5 * len(before)
    model.eval()
    with torch.no_grad():
        img = torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8)
        out = model([{"image": img, "height": 128, "width": 160}])[0]["instances"]
    assert out.image_size == (128, 160)
    return losses, out


def test_faster_rcnn_r50_c4_trains_and_infers(synthetic_voc):
    cfg = _small_cfg("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", synthetic_voc[0])
    losses, out = _train_step_and_infer(cfg)
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert out.has("pred_boxes") and out.has("scores")


def test_mask_rcnn_r50_fpn_trains_and_infers(synthetic_coco):
    cfg = _small_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", synthetic_coco[0])
    losses, out = _train_step_and_infer(cfg)
    assert "loss_mask" in losses
    assert out.has("pred_masks")


def _gt_instances(record, with_masks=False):
    h, w = record["height"], record["width"]
    annos = record["annotations"]
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.ones(len(annos))
    inst.pred_classes = torch.tensor([a["category_id"] for a in annos], dtype=torch.int64)
    if with_masks:
        masks = [
            polygons_to_bitmask([np.asarray(p) for p in a["segmentation"]], h, w) for a in annos
        ]
        inst.pred_masks = torch.from_numpy(np.stack(masks))
    return inst


def _evaluate(evaluator, records, make_instances):
    evaluator.reset()
    for r in records:
        evaluator.process(
            [{"image_id": r["image_id"], "file_name": r["file_name"]}],
            [{"instances": make_instances(r)}],
        )
    return evaluator.evaluate()


def _empty(record):
    inst = Instances((record["height"], record["width"]))
    inst.pred_boxes = Boxes(torch.zeros(0, 4))
    inst.scores = torch.zeros(0)
    inst.pred_classes = torch.zeros(0, dtype=torch.int64)
    return inst


def test_voc_evaluator_known_answers(synthetic_voc):
    name = synthetic_voc[1]
    records = DatasetCatalog.get(name)
    evaluator = PascalVOCDetectionEvaluator(name)
    perfect = _evaluate(evaluator, records, _gt_instances)["bbox"]
    assert perfect["AP"] == pytest.approx(100.0)
    assert perfect["AP50"] == pytest.approx(100.0) and perfect["AP75"] == pytest.approx(100.0)
    empty = _evaluate(evaluator, records, _empty)["bbox"]
    assert empty["AP"] == 0 and empty["AP50"] == 0

    def shifted(r):  # every box moved by its own size: IoU 0 with every ground truth
        inst = _gt_instances(r)
        t = inst.pred_boxes.tensor
        inst.pred_boxes = Boxes(t + torch.cat([t[:, 2:] - t[:, :2]] * 2, dim=1) + 1)
        return inst

    assert _evaluate(evaluator, records, shifted)["bbox"]["AP50"] == 0


def test_coco_evaluator_known_answers(synthetic_coco, tmp_path):
    name = synthetic_coco[0]
    records = DatasetCatalog.get(name)
    evaluator = COCOEvaluator(
        name, tasks=("bbox", "segm"), distributed=False, output_dir=str(tmp_path)
    )
    res = _evaluate(evaluator, records, lambda r: _gt_instances(r, with_masks=True))
    for task in ("bbox", "segm"):
        assert res[task]["AP"] == pytest.approx(100.0), task
        assert res[task]["AP75"] == pytest.approx(100.0), task

    def wrong_class(r):
        inst = _gt_instances(r, with_masks=True)
        inst.pred_classes = (inst.pred_classes + 1) % 3
        return inst

    res = _evaluate(evaluator, records, wrong_class)
    assert res["bbox"]["AP"] == 0 and res["segm"]["AP"] == 0
    # detectron2's convention for no detections at all: every metric is NaN ("No predictions")
    res = _evaluate(evaluator, records, _empty)
    assert all(math.isnan(v) for v in res["bbox"].values())


def test_inference_on_dataset_with_voc_evaluator(synthetic_voc):
    """The evaluation loop tools/train_net.py uses, end to end on a (random) detector."""
    from detectron2.data import build_detection_test_loader

    cfg = _small_cfg("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", synthetic_voc[0])
    model = build_model(cfg).eval()
    loader = build_detection_test_loader(cfg, synthetic_voc[1])
    res = inference_on_dataset(model, loader, PascalVOCDetectionEvaluator(synthetic_voc[1]))
    assert 0.0 <= res["bbox"]["AP50"] <= 100.0


def test_checkpoint_round_trip(tmp_path):
    cfg = _small_cfg("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", "unused")
    torch.manual_seed(1)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer).save("ckpt", iteration=7)
    torch.manual_seed(2)
    fresh = build_model(cfg)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    assert not all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
    )
    extra = DetectionCheckpointer(fresh, str(tmp_path), optimizer=fresh_opt).resume_or_load(
        str(tmp_path / "ckpt.pth"), resume=True
    )
    assert extra["iteration"] == 7
    sd, fsd = model.state_dict(), fresh.state_dict()
    assert sd.keys() == fsd.keys() and all(torch.equal(sd[k], fsd[k]) for k in sd)
    a, b = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)
    assert (
        copy.deepcopy(fresh_opt.state_dict()["param_groups"])
        == optimizer.state_dict()["param_groups"]
    )
