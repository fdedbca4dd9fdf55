"""ImageNet linear probe: frozen backbone, classification data path, top-k evaluator."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from resim_d2.config import add_resim_config, get_config_file
from resim_d2.data.classification import (
    ClassificationMapper,
    build_classification_test_loader,
    build_classification_train_loader,
    classification_dataset_dicts,
)
from resim_d2.data.datasets import load_imagenet
from resim_d2.evaluation.classification import ClassificationEvaluator
from resim_d2.modeling.linear_probe import LinearProbe

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer

# Two classes of flat colours (noise added): folder names sort red first, so red = 0, green = 1.
COLOURS = {"n00000001_red": (200, 30, 30), "n00000002_green": (30, 190, 40)}


@pytest.fixture(scope="module")
def colour_imagenet(tmp_path_factory):
    """(train_name, val_name) of a two-class ImageNet-layout dataset, registered."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for wnid, rgb in COLOURS.items():
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(70, 100)), int(rng.integers(70, 100))
                noise = rng.integers(-20, 21, size=(h, w, 3))
                pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=95)
    names = ("test_lp_colours_train", "test_lp_colours_val")
    for name, split in zip(names, ("train", "val")):
        if name not in DatasetCatalog.list():
            path = str(root / split)
            DatasetCatalog.register(name, lambda path=path: load_imagenet(path))
    return names


def _cfg(train="", test=""):
    cfg = add_resim_config(get_cfg())
    cfg.merge_from_file(get_config_file("linear_probe/Base-LinearProbe.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.RESIM.LINEAR_PROBE.NUM_CLASSES = 2
    cfg.RESIM.LINEAR_PROBE.CROP_SIZE = 64
    cfg.RESIM.LINEAR_PROBE.RESIZE_SIZE = 72
    cfg.RESIM.LINEAR_PROBE.TEST_IMS_PER_BATCH = 4
    cfg.DATASETS.TRAIN = (train,) if train else ()
    cfg.DATASETS.TEST = (test,) if test else ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 8
    cfg.SEED = 0
    return cfg


def _backbone_state(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def test_backbone_gets_no_gradient_and_bn_stats_stay(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg)
    assert isinstance(model, LinearProbe)
    assert model.fc.in_features == 512  # R18 C5
    assert not model.fc.bias.detach().any()
    assert 0.005 < float(model.fc.weight.detach().std()) < 0.015
    model.train()
    assert model.training and model.fc.training
    assert not any(m.training for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    params = [n for g in build_optimizer(cfg, model).param_groups for n in g["params"]]
    assert {id(p) for p in params} == {id(model.fc.weight), id(model.fc.bias)}

    before = _backbone_state(model)
    fc_before = model.fc.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        batch = [
            {
                "image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=gen),
                "label": i % 2,
            }
            for i in range(4)
        ]
        losses = model(batch)
        assert set(losses) == {"loss_cls"}
        opt.zero_grad()
        losses["loss_cls"].backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        opt.step()
    after = model.backbone.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert not torch.equal(fc_before, model.fc.weight)

    # the check above can fail: a backbone in train mode does move its BN statistics
    model.backbone.train()
    model.backbone(torch.randn(2, 3, 64, 64))
    after = model.backbone.state_dict()
    moved = [k for k, v in before.items() if "running_mean" in k and not torch.equal(v, after[k])]
    assert moved


def test_mapper_and_labels(colour_imagenet):
    train, val = colour_imagenet
    records, classes = classification_dataset_dicts(train, num_classes=2)
    assert classes == sorted(COLOURS)
    assert {(r["class_id"], r["label"]) for r in records} == {(c, i) for i, c in enumerate(classes)}
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        classification_dataset_dicts(train, num_classes=1000)

    cfg = _cfg(train, val)
    for is_train in (True, False):
        out = ClassificationMapper(cfg, is_train=is_train)(records[0])
        assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 64, 64)
        assert out["label"] == records[0]["label"]
        # RGB order: the red class is red
        mean = out["image"].float().mean(dim=(1, 2))
        assert mean[0] > 150 and mean[1] < 80
    # test-time crop is deterministic
    test_mapper = ClassificationMapper(cfg, is_train=False)
    assert torch.equal(test_mapper(records[1])["image"], test_mapper(records[1])["image"])


def test_classifier_learns_separable_colours(colour_imagenet):
    torch.manual_seed(0)
    train, val = colour_imagenet
    cfg = _cfg(train, val)
    # Random-init R18 pooled features have norm ~20 and cosine ~0.95 between the two colours: the
    # problem is separable but ill-conditioned, so plain SGD (no momentum) at a small rate.
    cfg.SOLVER.BASE_LR = 0.05
    cfg.SOLVER.MOMENTUM = 0.0
    model = build_model(cfg)
    model.train()
    opt = build_optimizer(cfg, model)
    loader = iter(build_classification_train_loader(cfg))
    for _ in range(20):
        batch = next(loader)
        assert len(batch) == 8
        loss = model(batch)["loss_cls"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    res = inference_on_dataset(
        model, build_classification_test_loader(cfg, val), ClassificationEvaluator(val)
    )
    assert res["classification"]["num_images"] == 6
    assert res["classification"]["top1"] == 100.0


def test_evaluator_matches_hand_count():
    # 5 images, 6 classes. Rank of the label's logit (0 = best), counted by hand:
    logits = torch.tensor(
        [
            [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 0: rank 0 -> top1, top5
            [9.0, 8.0, 2.0, 3.0, 4.0, 5.0],  # label 1: rank 1 -> top5
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 0: rank 5 -> neither
            [0.0, 0.0, 7.0, 1.0, 6.0, 5.0],  # label 3: rank 3 -> top5
            [3.0, 2.0, 1.0, 0.5, 0.0, 4.0],  # label 4: rank 5 -> neither
        ]
    )
    labels = [0, 1, 0, 3, 4]
    ev = ClassificationEvaluator("hand")
    ev.reset()
    for lo, hi in ((0, 2), (2, 5)):  # two batches
        ev.process(
            [{"label": labels[i]} for i in range(lo, hi)],
            [{"logits": logits[i]} for i in range(lo, hi)],
        )
    res = ev.evaluate()["classification"]
    assert res["top1"] == pytest.approx(100.0 * 1 / 5)
    assert res["top5"] == pytest.approx(100.0 * 3 / 5)
    assert res["num_images"] == 5


def test_configs_build():
    for name in ("linear_probe/Base-LinearProbe.yaml", "linear_probe/imagenet_R50_lincls.yaml"):
        cfg = add_resim_config(get_cfg())
        cfg.merge_from_file(get_config_file(name))
        assert cfg.MODEL.META_ARCHITECTURE == "LinearProbe"
        assert cfg.SOLVER.BASE_LR == 30.0 and cfg.SOLVER.WEIGHT_DECAY == 0.0
    assert cfg.SOLVER.STEPS == (300274, 400365) and cfg.SOLVER.MAX_ITER == 500456
    assert os.path.basename(cfg.MODEL.WEIGHTS)
    cfg.MODEL.DEVICE = "cpu"
    fc = build_model(cfg).fc
    assert (fc.in_features, fc.out_features) == (2048, 1000)


@pytest.mark.parametrize("layout", ["probe", "c4", "fpn"])
def test_loads_converted_detector_weights(tmp_path, layout):
    """tools/convert.py layouts (C4: res5 in roi_heads; FPN: backbone.bottom_up) load fully."""
    from detectron2.checkpoint import DetectionCheckpointer

    torch.manual_seed(1)
    source = build_model(_cfg())
    for m in source.backbone.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    expected = source.backbone.state_dict()

    def name(k):
        if layout == "c4" and k.startswith("res5."):
            return "roi_heads." + k
        return ("backbone.bottom_up." if layout == "fpn" else "backbone.") + k

    weights = {name(k): v for k, v in expected.items()}
    weights["proposal_generator.rpn_head.conv.weight"] = torch.zeros(1)  # detector-only key
    path = str(tmp_path / "d2.pth")
    torch.save({"model": weights, "__author__": "test", "matching_heuristics": False}, path)

    torch.manual_seed(2)
    model = build_model(_cfg())
    DetectionCheckpointer(model).load(path)
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
