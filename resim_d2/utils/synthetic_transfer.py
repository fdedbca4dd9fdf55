"""Generated data for every transfer target, laid out where detectron2's builtin datasets (and
the DensePose project's) look for the real data, so the configs under ``configs/finetune/`` run on
it unchanged: point ``$DETECTRON2_DATASETS`` at the root.

    <root>/VOC2007/, VOC2012/           voc_2007_{trainval,test}, voc_2012_trainval
                                        (the three shapes written as VOC's first three classes)
    <root>/coco/{train,val}2017/,       coco_2017_{train,val} (COCO's 80 categories in the JSON;
      annotations/instances_*.json      the shapes are its first three: person, bicycle, car)
    <root>/cityscapes/                  cityscapes_fine_instance_seg_{train,val}
    <root>/coco/{train,val}2014/,       densepose_coco_2014_{train,valminusminival,minival}
      annotations/densepose_*.json
    <root>/densepose/data/              stand-ins of the DensePose project's four data files

The images are tiny and the objects toy shapes: the point is the formats, loaders and
evaluators, not what a model learns.
"""

from __future__ import annotations

import os

from .synthetic_cityscapes import write_cityscapes
from .synthetic_densepose import write_data_files, write_densepose_coco
from .synthetic_detection import write_coco, write_voc

__all__ = ["TARGETS", "write_transfer_datasets"]

TARGETS = ("voc", "coco", "cityscapes", "densepose")


def _coco_categories():
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]


def write_transfer_datasets(root, targets=TARGETS, train=8, test=4, seed=0):
    """Write the datasets of ``targets`` under ``root``: ``train`` training and ``test`` test
    images per dataset. Returns ``root``."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown targets {sorted(unknown)}; known: {list(TARGETS)}")
    if "voc" in targets:
        from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASSES

        names = VOC_CLASSES[:3]
        write_voc(
            os.path.join(root, "VOC2007"),
            {"trainval": train, "test": test},
            seed,
            (128, 160),
            names,
        )
        write_voc(os.path.join(root, "VOC2012"), {"trainval": train}, seed + 1, (128, 160), names)
    if "coco" in targets:
        cats = _coco_categories()
        for i, (split, n) in enumerate((("train2017", train), ("val2017", test))):
            write_coco(
                os.path.join(root, "coco", split),
                os.path.join(root, "coco", "annotations", f"instances_{split}.json"),
                n,
                seed=seed * 1000 + i,
                size=(128, 160),
                categories=cats,
            )
    if "cityscapes" in targets:
        write_cityscapes(root, {"train": train, "val": test}, seed=seed)
    if "densepose" in targets:
        coco = os.path.join(root, "coco")
        splits = (
            ("train2014", "densepose_train2014", train, 1),
            ("val2014", "densepose_valminusminival2014", max(1, test // 2), 100001),
            ("val2014", "densepose_minival2014", test, 200001),
        )
        for i, (images, name, n, first_id) in enumerate(splits):
            write_densepose_coco(
                os.path.join(coco, images),
                os.path.join(coco, "annotations", name + ".json"),
                n,
                seed=seed * 1000 + i,
                first_id=first_id,
                file_prefix=f"COCO_{images}_",
            )
        write_data_files(os.path.join(root, "densepose", "data"))
    return root
