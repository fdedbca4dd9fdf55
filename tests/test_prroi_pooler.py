"""PrRoIPool as a detectron2 POOLER_TYPE: ROIPooler construction, ROI heads built from configs."""

import math

import pytest
import torch

from resim_d2.layers import PrRoIPool, prroi_pool
from resim_d2.layers.poolers import register_prroi_pooler, unregister_prroi_pooler

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.layers import ROIAlign, ShapeSpec
from detectron2.modeling import build_roi_heads
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes, ImageList, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

H_IMG, W_IMG = 128, 160


@pytest.fixture(autouse=True)
def _registered():
    register_prroi_pooler()
    yield
    register_prroi_pooler()  # leave it registered, as `import resim_d2` does


def _random_boxes(n, gen, min_size=8.0):
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([W_IMG - min_size, H_IMG - min_size])
    wh = min_size + torch.rand(n, 2, generator=gen) * torch.tensor([W_IMG, H_IMG]) / 2
    return torch.cat([xy, torch.minimum(xy + wh, torch.tensor([W_IMG, H_IMG]) - 1.0)], dim=1)


def test_registration_is_idempotent_and_reversible():
    register_prroi_pooler()
    wrapped = ROIPooler.__init__
    register_prroi_pooler()
    assert ROIPooler.__init__ is wrapped
    original = wrapped._resim_prroi_original
    assert not hasattr(original, "_resim_prroi_original")  # wrapped exactly once
    unregister_prroi_pooler()
    try:
        assert ROIPooler.__init__ is original
        with pytest.raises(ValueError, match="Unknown pooler type"):
            ROIPooler(7, (1 / 16,), 0, "PrRoIPool")
    finally:
        register_prroi_pooler()


def test_other_pooler_types_pass_through():
    pooler = ROIPooler(
        output_size=7, scales=(1 / 4, 1 / 8), sampling_ratio=2, pooler_type="ROIAlignV2"
    )
    assert all(isinstance(p, ROIAlign) and p.aligned for p in pooler.level_poolers)
    assert pooler.level_poolers[1].sampling_ratio == 2
    with pytest.raises(ValueError, match="Unknown pooler type"):
        ROIPooler(7, (1 / 16,), 0, "NoSuchPooler")
    with pytest.raises(AssertionError):  # ROIPooler's own checks still run for PrRoIPool
        ROIPooler(7, (1 / 4, 1 / 16), 0, "PrRoIPool")


@pytest.mark.parametrize("pooler_type,aligned", [("PrRoIPool", False), ("PrRoIPoolV2", True)])
def test_multilevel_pooler_equals_direct_op(pooler_type, aligned):
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    pooler = ROIPooler(output_size=5, scales=scales, sampling_ratio=0, pooler_type=pooler_type)
    assert [type(p) for p in pooler.level_poolers] == [PrRoIPool] * 4
    assert [p.spatial_scale for p in pooler.level_poolers] == list(scales)
    assert all(p.output_size == (5, 5) and p.aligned == aligned for p in pooler.level_poolers)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 6, H_IMG // s, W_IMG // s, generator=g) for s in (4, 8, 16, 32)]
    box_lists = [Boxes(_random_boxes(7, g)), Boxes(_random_boxes(5, g))]
    out = pooler(feats, box_lists)
    assert out.shape == (12, 6, 5, 5)
    levels = assign_boxes_to_levels(box_lists, 2, 5, 224, 4)
    k = 0
    for n, bl in enumerate(box_lists):
        for box in bl.tensor:
            lv = int(levels[k])
            direct = prroi_pool(
                feats[lv], torch.cat([torch.tensor([float(n)]), box])[None], 5, scales[lv], aligned
            )
            torch.testing.assert_close(out[k : k + 1], direct, rtol=1e-6, atol=1e-6)
            k += 1


def _proposals_and_targets(gen, n_images=2, n_props=12, n_gt=3, masks=False):
    proposals, targets = [], []
    for _ in range(n_images):
        p = Instances((H_IMG, W_IMG))
        p.proposal_boxes = Boxes(_random_boxes(n_props, gen))
        p.objectness_logits = torch.randn(n_props, generator=gen)
        proposals.append(p)
        t = Instances((H_IMG, W_IMG))
        gt = _random_boxes(n_gt, gen)
        t.gt_boxes = Boxes(gt)
        t.gt_classes = torch.randint(0, 3, (n_gt,), generator=gen)
        if masks:
            t.gt_masks = PolygonMasks(
                [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in gt.tolist()]
            )
        targets.append(t)
    return proposals, targets


def _capture(module):
    calls = []
    module.register_forward_hook(lambda m, inp, out: calls.append((inp, out)))
    return calls


def _direct(x, box_lists, pooler):
    """The op on the pooler's own inputs, one level: (batch_index, x0, y0, x1, y1) boxes."""
    boxes = torch.cat(
        [
            torch.cat([torch.full((len(b), 1), float(i)), b.tensor], 1)
            for i, b in enumerate(box_lists)
        ]
    )
    p = pooler.level_poolers[0]
    return prroi_pool(x[0], boxes, p.output_size, p.spatial_scale, p.aligned)


def test_res5_roi_heads_from_config():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"))
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "PrRoIPool"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32  # res4 128 -> res5 256 channels: small and fast
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    heads = build_roi_heads(cfg, {"res4": ShapeSpec(channels=128, stride=16)})
    assert isinstance(heads.pooler.level_poolers[0], PrRoIPool)
    assert heads.pooler.level_poolers[0].spatial_scale == 1 / 16
    calls = _capture(heads.pooler)
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 128, H_IMG // 16, W_IMG // 16, generator=g, requires_grad=True)
    images = ImageList(torch.zeros(2, 3, H_IMG, W_IMG), [(H_IMG, W_IMG)] * 2)
    proposals, targets = _proposals_and_targets(g)
    heads.train()
    with EventStorage(0):
        _, losses = heads(images, {"res4": feat}, proposals, targets)
    assert losses and all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0
    (x, box_lists), pooled = calls[0]
    assert pooled.shape[1:] == (128, 14, 14)
    torch.testing.assert_close(pooled, _direct(x, box_lists, heads.pooler), rtol=0, atol=0)


def test_standard_roi_heads_fpn_box_and_mask_from_config():
    cfg = get_cfg()
    cfg.merge_from_file(
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    )
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "PrRoIPool"
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "PrRoIPoolV2"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 8
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    heads = build_roi_heads(cfg, {k: ShapeSpec(channels=8, stride=s) for k, s in strides.items()})
    for pooler, aligned in ((heads.box_pooler, False), (heads.mask_pooler, True)):
        assert [type(p) for p in pooler.level_poolers] == [PrRoIPool] * 4
        assert all(p.aligned == aligned for p in pooler.level_poolers)
    box_calls, mask_calls = _capture(heads.box_pooler), _capture(heads.mask_pooler)
    g = torch.Generator().manual_seed(2)
    feats = {
        k: torch.randn(2, 8, H_IMG // s, W_IMG // s, generator=g, requires_grad=True)
        for k, s in strides.items()
    }
    images = ImageList(torch.zeros(2, 3, H_IMG, W_IMG), [(H_IMG, W_IMG)] * 2)
    proposals, targets = _proposals_and_targets(g, masks=True)
    heads.train()
    with EventStorage(0):
        _, losses = heads(images, feats, proposals, targets)
    assert {"loss_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    assert all(f.grad is not None for f in feats.values())
    for calls, pooler, size in (
        (box_calls, heads.box_pooler, 7),
        (mask_calls, heads.mask_pooler, 14),
    ):
        (x, box_lists), pooled = calls[0]
        assert pooled.shape[1:] == (8, size, size)
        levels = assign_boxes_to_levels(box_lists, 2, 5, 224, 4)
        boxes = torch.cat(
            [
                torch.cat([torch.full((len(b), 1), float(i)), b.tensor], 1)
                for i, b in enumerate(box_lists)
            ]
        )
        for lv, p in enumerate(pooler.level_poolers):
            sel = levels == lv
            direct = prroi_pool(x[lv], boxes[sel], size, p.spatial_scale, p.aligned)
            torch.testing.assert_close(pooled[sel], direct, rtol=1e-6, atol=1e-6)
    heads.eval()
    with torch.no_grad():
        instances, _ = heads(images, {k: v.detach() for k, v in feats.items()}, proposals)
    assert len(instances) == 2 and all(i.has("pred_masks") for i in instances)
