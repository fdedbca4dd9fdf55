"""Cityscapes instance segmentation through detectron2's registered
cityscapes_fine_instance_seg_* datasets and the Cityscapes scripts' evaluation, on generated data
in the Cityscapes layout: ground truth as predictions scores AP 100, one instance dropped scores
the value worked out by hand, and the scripts' files stay in the output folder."""

import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image

from resim_d2 import add_resim_config
from resim_d2.engine import build_run_kind

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Instances

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "finetune", "cityscapes_R50_FPN.yaml")
VAL = "cityscapes_fine_instance_seg_val"


def _register_builtin_cityscapes(root):
    from detectron2.data.datasets.builtin import register_all_cityscapes

    for name in [n for n in DatasetCatalog.list() if n.startswith("cityscapes_fine_")]:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_all_cityscapes(root)


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory):
    """detectron2's own Cityscapes datasets, registered again with the generated data as root
    (what $DETECTRON2_DATASETS does when set before detectron2 is imported)."""
    from resim_d2.utils.synthetic_cityscapes import write_cityscapes

    root = str(tmp_path_factory.mktemp("cs"))
    write_cityscapes(root, {"train": 2, "val": 3}, seed=5)
    _register_builtin_cityscapes(root)
    yield root
    _register_builtin_cityscapes(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def _gt_file(image_file):
    gt = image_file.replace(os.sep + "leftImg8bit" + os.sep, os.sep + "gtFine" + os.sep)
    return gt.replace("_leftImg8bit.png", "_gtFine_instanceIds.png")


def _instances(image_file):
    """(instance id, mask) of every thing in the image's instanceIds ground truth."""
    ids = np.asarray(Image.open(_gt_file(image_file)))
    return [(int(i), ids == i) for i in np.unique(ids) if i >= 1000]


class GroundTruthModel(torch.nn.Module):
    """Predicts each image's ground-truth instances (masks from its instanceIds file)."""

    def __init__(self, drop=()):
        super().__init__()
        self.drop = set(drop)  # (file, instance id) left out

    def forward(self, inputs):
        from cityscapesscripts.helpers.labels import id2label

        classes = MetadataCatalog.get(VAL).thing_classes
        outputs = []
        for inp in inputs:
            things = [
                t for t in _instances(inp["file_name"]) if (inp["file_name"], t[0]) not in self.drop
            ]
            inst = Instances((inp["height"], inp["width"]))
            n = len(things)
            masks = [torch.from_numpy(m) for _, m in things]
            inst.pred_masks = (
                torch.stack(masks)
                if n
                else torch.zeros(0, inp["height"], inp["width"], dtype=torch.bool)
            )
            inst.pred_classes = torch.tensor(
                [classes.index(id2label[i // 1000].name) for i, _ in things], dtype=torch.long
            )
            inst.scores = torch.linspace(0.9, 0.5, n) if n else torch.zeros(0)
            outputs.append({"instances": inst})
        return outputs


def _kind(out_dir):
    cfg = add_resim_config(get_cfg())
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", out_dir])
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", 0])
    return build_run_kind(cfg)


def test_ground_truth_scores_100_and_one_dropped_instance_the_hand_computed_ap(
    cs_root, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    kind = _kind(str(tmp_path / "out"))
    res = kind.test(GroundTruthModel())
    assert res["segm"]["AP"] == pytest.approx(100) and res["segm"]["AP50"] == pytest.approx(100)
    assert os.path.isfile(tmp_path / "out" / "inference" / "matches.json")
    assert not os.path.exists(tmp_path / "matches.json")

    # Drop one car. Per class the scripts' AP is the area under a precision/recall curve whose
    # precision is 1 throughout (every prediction is an exact mask): its maximal recall, (n-1)/n
    # for the class with n instances that lost one, 1 for the others; AP is the mean over the
    # classes that have ground truth, the same at every overlap threshold.
    files = sorted(glob.glob(os.path.join(cs_root, "cityscapes/leftImg8bit/val/*/*.png")))
    per_class = {}
    for f in files:
        for i, _ in _instances(f):
            per_class[i // 1000] = per_class.get(i // 1000, 0) + 1
    car = 26
    victim = next((f, i) for f in files for i, _ in _instances(f) if i // 1000 == car)
    n = per_class[car]
    expected = 100 * (len(per_class) - 1 + (n - 1) / n) / len(per_class)
    res = kind.test(GroundTruthModel(drop=[victim]))
    assert res["segm"]["AP"] == pytest.approx(expected)
    assert res["segm"]["AP50"] == pytest.approx(expected)
    assert res["segm"]["AP"] < 100
