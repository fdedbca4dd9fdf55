"""DensePose R-CNN through the project's own data path and evaluators, on generated DensePose-COCO
data and stand-ins of its data files: known answers of box AP and GPS / GPSm / segm AP, the class
labels the loader produces, datasets under $DETECTRON2_DATASETS, and no download ever."""

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from resim_d2 import add_resim_config
from resim_d2.utils import synthetic_densepose as sd

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.utils.file_io import PathManager

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("densepose") is None, reason="DensePose project not installed"
    ),
    pytest.mark.usefixtures("one_thread"),
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "finetune", "densepose_R50_FPN_s1x.yaml")
URL = "https://dl.fbaipublicfiles.com/densepose/data/"
THRESHOLDS = np.linspace(0.5, 0.95, 10)  # the IoU / GPS thresholds of AP (COCO's)


@pytest.fixture
def dp_root(tmp_path_factory, monkeypatch):
    """$DETECTRON2_DATASETS holding generated DensePose-COCO data and the stand-in files."""
    from resim_d2.utils.densepose_project import ensure_densepose
    from resim_d2.utils.synthetic_transfer import write_transfer_datasets

    root = str(tmp_path_factory.getbasetemp() / "dp_root")
    if not os.path.isdir(root):
        write_transfer_datasets(root, ["densepose"], train=4, test=3, seed=3)
    monkeypatch.setenv("DETECTRON2_DATASETS", root)
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path_factory.getbasetemp() / "no_cache"))
    ensure_densepose()  # registers the project's datasets under root
    yield root
    monkeypatch.undo()
    ensure_densepose()  # back under the original root


def kind_for(out_dir, opts=()):
    from resim_d2.engine import build_run_kind
    from resim_d2.utils.projects import add_project_configs

    cfg = add_resim_config(get_cfg())
    add_project_configs(cfg, CONFIG)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", out_dir])
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MIN_SIZE_TEST", 0, *opts])
    return build_run_kind(cfg)


class GroundTruthModel(torch.nn.Module):
    """Returns each test image's ground truth as its predictions (oracle DensePose output)."""

    def __init__(self, dataset, uv_shift=None):
        super().__init__()
        self.records = {r["image_id"]: r for r in DatasetCatalog.get(dataset)}
        self.uv_shift = uv_shift

    def forward(self, inputs):
        outputs = []
        for inp in inputs:
            boxes = [a["bbox"] for a in self.records[inp["image_id"]]["annotations"]]
            inst = Instances((inp["height"], inp["width"]))
            xyxy = [[x, y, x + w, y + h] for x, y, w, h in boxes]
            inst.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32))
            inst.scores = torch.linspace(0.9, 0.8, len(boxes))
            inst.pred_classes = torch.zeros(len(boxes), dtype=torch.long)
            inst.pred_densepose = sd.oracle_chart_output(len(boxes), uv_shift=self.uv_shift)
            outputs.append({"instances": inst})
        return outputs


# ------------------------------------------------------------------------------ known answers
def test_ground_truth_scores_100_and_a_perturbed_prediction_the_hand_computed_ap(dp_root, tmp_path):
    kind = kind_for(str(tmp_path))
    assert type(kind).__name__ == "DensePoseRCNN"
    res = kind.test(GroundTruthModel("densepose_coco_2014_minival"))
    assert res["bbox"]["AP"] == pytest.approx(100)
    for task in ("densepose_gps", "densepose_gpsm", "densepose_segm"):
        assert res[task]["AP"] == pytest.approx(100), (task, res[task])

    # U of the torso's right half (part 1) moved by 0.5: its points land on the neighbouring
    # vertex of the stand-in mesh, 0.5 away; the other 5 parts stay exact. GPS per instance is
    # the mean over points of exp(-d^2 / (2 k^2)), k = 0.351 the metric's mean geodesic distance
    # of the torso; GPSm = sqrt(GPS * mask IoU) with IoU 1; every instance scores the same, so AP
    # is the fraction of the thresholds 0.50..0.95 it reaches.
    gps = (5 + math.exp(-(0.5**2) / (2 * 0.351**2))) / 6
    gpsm = math.sqrt(gps * 1.0)
    res = kind.test(GroundTruthModel("densepose_coco_2014_minival", uv_shift={1: (0.5, 0.0)}))
    assert res["bbox"]["AP"] == pytest.approx(100)
    assert res["densepose_segm"]["AP"] == pytest.approx(100)
    assert res["densepose_gps"]["AP"] == pytest.approx(100 * np.mean(THRESHOLDS <= gps))
    assert res["densepose_gpsm"]["AP"] == pytest.approx(100 * np.mean(THRESHOLDS <= gpsm))
    assert res["densepose_gps"]["AP"] < res["densepose_gpsm"]["AP"] < 100  # 80 and 90 here


def test_stand_in_distances_read_back_through_the_evaluators_index_arithmetic(dp_root):
    """The evaluator finds geodesic distances with index arithmetic written for the real mesh
    (27,554 vertices); the stand-in table must give the distances the mesh defines."""
    from densepose.evaluation.densepose_coco_evaluation import DensePoseCocoEval

    ev = DensePoseCocoEval()
    ev._loadGEval()
    rng = np.random.default_rng(0)
    pairs = rng.integers(1, sd.NUM_VERTICES + 1, size=(200, 2))
    gt_rows = ev.PDIST_transform[pairs[:, 0] - 1]
    dt_rows = ev.PDIST_transform[pairs[:, 1] - 1]
    got = ev.getDistancesUV(gt_rows, dt_rows)
    want = [sd.geodesic_distance(int(a), int(b)) for a, b in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # and the vertices of each part are where SMPL_subdiv says (part, U, V)
    assert [len(p) for p in ev.Part_ClosestVertInds] == [len(sd.VERTEX_UV)] * 24


# ------------------------------------------------------------------------------ data path
def test_train_loader_maps_person_to_class_0_and_carries_densepose(dp_root, tmp_path):
    kind = kind_for(str(tmp_path), ["SOLVER.IMS_PER_BATCH", 2])
    batch = next(iter(kind.build_train_loader()))
    for item in batch:
        inst = item["instances"]
        assert len(inst) and inst.gt_classes.tolist() == [0] * len(inst)  # NUM_CLASSES 1
        assert inst.has("gt_densepose") and all(d is not None for d in inst.gt_densepose)
    meta = MetadataCatalog.get("densepose_coco_2014_train")
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0}


def test_datasets_and_data_files_resolve_under_detectron2_datasets(dp_root):
    meta = MetadataCatalog.get("densepose_coco_2014_minival")
    assert meta.json_file == os.path.join(dp_root, "coco/annotations/densepose_minival2014.json")
    assert meta.image_root == os.path.join(dp_root, "coco/val2014")
    local = PathManager.get_local_path(meta.densepose_transform_src)
    assert local == os.path.join(dp_root, "densepose/data/UV_symmetry_transforms.mat")
    assert PathManager.get_local_path(URL + "Pdist_matrix.pkl", timeout_sec=120).startswith(dp_root)


def test_a_missing_data_file_says_what_where_and_downloads_nothing(dp_root, tmp_path, monkeypatch):
    import iopath.common.download
    import iopath.common.file_io

    from resim_d2.utils.densepose_project import MissingDensePoseDataError

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(iopath.common.download, "download", no_download)
    monkeypatch.setattr(iopath.common.file_io, "download", no_download)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "empty"))
    with pytest.raises(MissingDensePoseDataError) as e:
        PathManager.get_local_path(URL + "SMPL_subdiv.mat")
    msg = str(e.value)
    assert "SMPL_subdiv.mat" in msg and URL + "SMPL_subdiv.mat" in msg
    assert os.path.join(str(tmp_path / "empty"), "densepose", "data", "SMPL_subdiv.mat") in msg
    assert "FVCORE_CACHE" in msg
    # the iopath cache layout a connected machine leaves behind is found as well
    cache = tmp_path / "cache"
    sd.write_data_files(str(cache / "densepose" / "data"))
    monkeypatch.setenv("FVCORE_CACHE", str(cache))
    got = PathManager.get_local_path(URL + "SMPL_subdiv.mat")
    assert got == str(cache / "densepose" / "data" / "SMPL_subdiv.mat")


def test_densepose_kind_loads_converted_weights_with_transfer_fpn(dp_root, tmp_path):
    from resim_d2.checkpoint import TransferCheckpointer

    kind = kind_for(str(tmp_path), ["RESIM.FINETUNE.TRANSFER_FPN", True])
    model = torch.nn.Linear(1, 1)
    ckpt = kind.build_checkpointer(model, str(tmp_path))
    assert isinstance(ckpt, TransferCheckpointer) and ckpt.transfer_fpn
    path = str(tmp_path / "resnet_only.pth")
    torch.save({"model": {"weight": torch.zeros(1, 1)}, "__author__": "resim_d2"}, path)
    with pytest.raises(ValueError, match="holds no FPN weights"):
        ckpt.load(path)
