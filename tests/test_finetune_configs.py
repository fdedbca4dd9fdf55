"""configs/finetune: every config builds and runs; the frozen-backbone protocol freezes what it
says; the res5 box head has its extra norm; DensePose without its project fails clearly."""

import ast
import glob
import importlib.util
import os

import pytest
import torch

import resim_d2  # noqa: F401  (compat + registrations)
from resim_d2 import add_resim_config
from resim_d2.modeling.roi_heads import FrozenStatsBatchNorm2d, Res5ROIHeadsExtraNorm
from resim_d2.utils.projects import MissingProjectError, add_project_configs, required_projects

from detectron2.config import CfgNode, get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import SimpleTrainer
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "finetune", "*.yaml"))
)
HAS_DENSEPOSE = importlib.util.find_spec("densepose") is not None
BN_TYPES = (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def path_of(name):
    return os.path.join(REPO, "configs", "finetune", name)


def tiny_finetune_cfg(name, opts=()):
    """The config with a ResNet-18 trunk and narrow heads, on the CPU."""
    cfg = get_cfg()
    add_resim_config(cfg)
    add_project_configs(cfg, path_of(name))
    cfg.merge_from_file(path_of(name))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    if "ROI_DENSEPOSE_HEAD" in cfg.MODEL:
        head = cfg.MODEL.ROI_DENSEPOSE_HEAD
        head.CONV_HEAD_DIM = head.DECODER_CONV_DIMS = 16
        head.DECODER_NUM_CLASSES = cfg.MODEL.FPN.OUT_CHANNELS  # the decoder feeds the head
    cfg.merge_from_list(list(opts))
    return cfg


def full_cfg(name):
    cfg = get_cfg()
    add_resim_config(cfg)
    cfg.merge_from_file(path_of(name))
    return cfg


# --------------------------------------------------------------------------- every config
@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_every_config_builds_and_runs_inference(name):
    if required_projects(path_of(name)) and not HAS_DENSEPOSE:
        pytest.skip("DensePose project not installed (see the missing-project test)")
    cfg = tiny_finetune_cfg(name)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    (out,) = model([{"image": image, "height": 64, "width": 96}])
    assert "instances" in out


RECIPES = [n for n in CONFIGS if not n.startswith("demo_")]  # demo_*: shrunk for a CPU


@pytest.mark.parametrize("name", [n for n in RECIPES if not required_projects(path_of(n))])
def test_recipes_as_the_paper_states(name):
    """The numbers of the transfer recipes (DESIGN.md "Transfer recipes"), on the full configs."""
    cfg = full_cfg(name)
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.280, 103.530]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.120, 57.375]
    assert cfg.MODEL.RESNETS.DEPTH == 50 and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    if name.startswith("voc"):
        assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
        assert cfg.MODEL.RESNETS.NORM == "SyncBN"
        assert cfg.SOLVER.MAX_ITER == 24000 and tuple(cfg.SOLVER.STEPS) == (18000, 22000)
        assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 0.02
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
        assert cfg.INPUT.MIN_SIZE_TEST == 800 and cfg.DATASETS.TEST == ("voc_2007_test",)
        train = (
            ("voc_2007_trainval",)
            if name.startswith("voc07")
            else (
                "voc_2007_trainval",
                "voc_2012_trainval",
            )
        )
        assert cfg.DATASETS.TRAIN == train
        frozen = "frozen" in name
        assert cfg.MODEL.BACKBONE.FREEZE_AT == (4 if frozen else 0)
        assert cfg.TEST.PRECISE_BN.ENABLED == (not frozen)
    if name.startswith(("coco", "cityscapes")):
        assert cfg.MODEL.MASK_ON and cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
        assert cfg.MODEL.RESNETS.NORM == "SyncBN" and cfg.MODEL.FPN.NORM == "SyncBN"
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
        assert cfg.RESIM.FINETUNE.TRANSFER_FPN == name.endswith("_fpnT.yaml")
    if name.startswith("coco"):
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(640, 801, 32))
        assert cfg.SOLVER.MAX_ITER == (90000 if "_1x" in name else 180000)
    if name.startswith("cityscapes"):
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 8 and cfg.SOLVER.MAX_ITER == 24000
        assert cfg.SOLVER.IMS_PER_BATCH == 8 and cfg.SOLVER.BASE_LR == 0.01
        assert tuple(cfg.SOLVER.STEPS) == (18000,) and cfg.INPUT.MIN_SIZE_TEST == 1024
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(800, 1025, 32))


@pytest.mark.parametrize("name", [n for n in RECIPES if n.startswith("densepose")])
def test_densepose_recipe_is_detectron2s_s1x(name):
    """detectron2's DensePose s1x for the non-legacy head (lr 0.01, 2 coarse channels, decoder
    on by default), read from the YAML so it is checked without the project installed."""
    d = CfgNode.load_yaml_with_base(path_of(name), allow_unsafe=True)
    solver, model = d["SOLVER"], d["MODEL"]
    assert solver["BASE_LR"] == 0.01 and solver["IMS_PER_BATCH"] == 16
    assert solver["MAX_ITER"] == 130000 and ast.literal_eval(solver["STEPS"]) == (100000, 120000)
    assert solver["WARMUP_FACTOR"] == 0.1
    head = model["ROI_DENSEPOSE_HEAD"]
    assert head["NAME"] == "DensePoseV1ConvXHead" and head["NUM_COARSE_SEGM_CHANNELS"] == 2
    assert "DECODER_ON" not in head  # the project's default (True) for this recipe
    assert model["BACKBONE"]["FREEZE_AT"] == 0 and model["FPN"]["NORM"] == "SyncBN"
    assert "densepose_coco_2014_minival" in str(d["DATASETS"]["TEST"])


def test_full_size_voc_detector_is_r50_c4_with_syncbn():
    cfg = full_cfg("voc_R50_C4_24k.yaml")
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert len(model.backbone.res4) == 6 and len(model.roi_heads.res5) == 4  # 3 blocks + norm
    norms = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert model.roi_heads.res5.norm.num_features == 2048
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------- the res5 head
@torch.no_grad()
def test_res5_head_has_the_extra_norm():
    model = build_model(
        tiny_finetune_cfg("voc_R50_C4_24k.yaml", ["MODEL.RESNETS.NORM", "BN"])
    ).eval()
    head = model.roi_heads
    assert isinstance(head, Res5ROIHeadsExtraNorm)
    names = [n for n, _ in head.res5.named_children()]
    assert names == ["0", "1", "norm"]  # ResNet-18: two BasicBlocks, then the norm
    assert isinstance(head.res5.norm, torch.nn.BatchNorm2d) and head.res5.norm.num_features == 512
    # the box features are res5 followed by the norm
    head.res5.norm.running_mean.normal_()
    x = torch.randn(3, 256, 14, 14)
    ref = head.res5.norm(head.res5[1](head.res5[0](x)))
    torch.testing.assert_close(head.res5(x), ref)
    assert ref.shape == (3, 512, 7, 7)


# ------------------------------------------------------------------- frozen-backbone protocol
def train_two_steps(name, train_set):
    opts = [
        "DATASETS.TRAIN", f"('{train_set}',)", "MODEL.ROI_HEADS.NUM_CLASSES", 3,
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", 128,
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.BASE_LR", 0.02, "SOLVER.WARMUP_ITERS", 0,
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 32, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16, "DATALOADER.NUM_WORKERS", 0, "SEED", 0,
    ]  # fmt: skip
    cfg = tiny_finetune_cfg(name, opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = SimpleTrainer(model, build_detection_train_loader(cfg), build_optimizer(cfg, model))
    trainer.train(0, 2)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    return model, moved


def test_frozen_backbone_freezes_c1_c4_and_every_bn_statistic(synthetic_voc):
    model, moved = train_two_steps("voc_R50_C4_24k_frozen.yaml", synthetic_voc[0])
    # what the config asks detectron2 and our head for
    backbone = model.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    assert all(
        isinstance(m, FrozenBatchNorm2d)
        for n, m in backbone.named_modules()
        if n.endswith("norm") or isinstance(m, BN_TYPES)
    )
    res5_norms = [m for n, m in model.roi_heads.res5.named_modules() if n.endswith("norm")]
    assert res5_norms and all(isinstance(m, FrozenStatsBatchNorm2d) for m in res5_norms)
    assert all(not m.training for m in res5_norms)  # model.train() does not reach them
    # and what 2 SGD steps did: C1-C4 and every BN statistic unchanged ...
    assert not [k for k in moved if k.startswith("backbone.")]
    assert not [k for k in moved if k.endswith(("running_mean", "running_var"))]
    assert not [k for k in moved if k.endswith("num_batches_tracked")]
    # ... while the RPN, the res5 weights (BN scale/shift included) and the predictor trained
    assert any(k.startswith("proposal_generator.rpn_head.") for k in moved)
    assert any(k.startswith("roi_heads.res5.0.conv1.weight") for k in moved)
    assert any(k.startswith("roi_heads.res5.0.conv1.norm.weight") for k in moved)
    assert any(k.startswith("roi_heads.box_predictor.") for k in moved)


def test_full_finetuning_moves_backbone_and_bn_statistics(synthetic_voc):
    """The control: the same two steps in the full protocol change what the frozen one keeps."""
    _, moved = train_two_steps("voc_R50_C4_24k.yaml", synthetic_voc[0])
    assert any(k.startswith("backbone.stem.conv1.weight") for k in moved)
    assert any(k.startswith("backbone.res4.") and k.endswith("running_mean") for k in moved)
    assert any(k.startswith("roi_heads.res5.norm.running_var") for k in moved)


# ------------------------------------------------------------------------------- DensePose
@pytest.mark.skipif(HAS_DENSEPOSE, reason="DensePose is installed here")
@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("densepose")])
def test_densepose_config_without_the_project_says_how_to_install_it(name):
    assert required_projects(path_of(name)) == ["DensePose"]
    cfg = get_cfg()
    add_resim_config(cfg)
    with pytest.raises(MissingProjectError) as e:
        add_project_configs(cfg, path_of(name))
    msg = str(e.value)
    assert name in msg and "DensePose" in msg and "densepose" in msg
    assert "pip install" in msg and "projects/DensePose" in msg
    assert "run.sh setup --densepose" in msg and ".pth" in msg  # the local-path route


def test_other_configs_need_no_project():
    assert not any(required_projects(path_of(n)) for n in CONFIGS if "densepose" not in n)


# ------------------------------------------------------------------ synthetic fine-tuning data
def test_synthetic_coco_rle_masks_are_the_drawn_shapes(tmp_path):
    """datasets/make_synthetic_detection.py: RLE masks equal the polygons rasterised, and load
    through detectron2's COCO loader and mapper (INPUT.MASK_FORMAT bitmask)."""
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json
    from detectron2.structures import BitMasks, polygons_to_bitmask
    from pycocotools import mask as mask_util

    spec = importlib.util.spec_from_file_location(
        "make_synth", os.path.join(REPO, "datasets", "make_synthetic_detection.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for masks in ("polygon", "rle"):
        cli.main(["coco", str(tmp_path / masks), "--train", "3", "--val", "1", "--masks", masks])
    cli.main(["voc", str(tmp_path / "voc"), "--trainval", "2", "--test", "1"])
    assert (tmp_path / "voc" / "ImageSets" / "Main" / "test.txt").is_file()

    poly = load_coco_json(str(tmp_path / "polygon/annotations/instances_train.json"), "")
    rle = load_coco_json(str(tmp_path / "rle/annotations/instances_train.json"), "")
    for p_rec, r_rec in zip(poly, rle):
        h, w = p_rec["height"], p_rec["width"]
        for pa, ra in zip(p_rec["annotations"], r_rec["annotations"]):
            assert pa["bbox"] == ra["bbox"] and pa["category_id"] == ra["category_id"]
            drawn = mask_util.decode(ra["segmentation"]).astype(bool)
            ref = polygons_to_bitmask(pa["segmentation"], h, w)
            iou = (drawn & ref).sum() / (drawn | ref).sum()
            assert iou > 0.85, iou
    cfg = tiny_finetune_cfg("Base-RCNN-FPN-BN.yaml", ["INPUT.MASK_FORMAT", "bitmask"])
    rec = dict(rle[0], file_name=str(tmp_path / "rle" / "train" / rle[0]["file_name"]))
    out = DatasetMapper(cfg, is_train=True)(rec)
    assert isinstance(out["instances"].gt_masks, BitMasks)
    assert out["instances"].gt_masks.tensor.any(dim=(1, 2)).all()
