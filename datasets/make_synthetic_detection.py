#!/usr/bin/env python
"""Write small synthetic datasets in the real on-disk formats: PASCAL VOC (XML), COCO (JSON), and
every transfer target in the layout detectron2's builtin datasets expect.

Images are textured backgrounds with coloured rectangles, discs and bars (3 classes); see
resim_d2/utils/synthetic_detection.py. No download; deterministic for a seed.

    # VOC2007-style: ROOT/{JPEGImages,Annotations,ImageSets/Main/{trainval,test}.txt}
    python datasets/make_synthetic_detection.py voc datasets/resim_synthetic_voc --trainval 64
    # COCO instances JSON with polygon masks (or --masks rle: compressed RLE, read by detectron2
    # with INPUT.MASK_FORMAT bitmask); one JSON + image folder per split
    python datasets/make_synthetic_detection.py coco datasets/resim_synthetic_coco --masks rle

    # VOC, COCO, Cityscapes and DensePose-COCO (with stand-ins of DensePose's data files) where
    # detectron2's voc_*, coco_2017_*, cityscapes_fine_instance_seg_* and the DensePose project's
    # densepose_coco_2014_* datasets look (resim_d2/utils/synthetic_transfer.py); then
    #   DETECTRON2_DATASETS=/tmp/synth python tools/train_net.py --config-file configs/finetune/...
    python datasets/make_synthetic_detection.py transfer /tmp/synth --targets coco densepose

Register the voc/coco results with detectron2's ``register_pascal_voc(name, root, split, 2007,
resim_d2.utils.synthetic_detection.CLASS_NAMES)`` or ``register_coco_instances(name, {}, json,
image_dir)``. ``resim_synthetic_voc_{trainval,test}`` are registered by ``import resim_d2`` and
generated on first use under $DETECTRON2_DATASETS.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resim_d2.utils.synthetic_detection import CLASS_NAMES, write_coco, write_voc  # noqa: E402
from resim_d2.utils.synthetic_transfer import TARGETS, write_transfer_datasets  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("format", choices=["voc", "coco", "transfer"])
    p.add_argument("root", help="output folder")
    p.add_argument("--trainval", type=int, default=64, help="VOC trainval images")
    p.add_argument("--test", type=int, default=32, help="VOC test images")
    p.add_argument("--train", type=int, default=64, help="COCO train images")
    p.add_argument("--val", type=int, default=16, help="COCO val images")
    p.add_argument("--masks", choices=["polygon", "rle"], default="polygon", help="COCO masks")
    p.add_argument("--height", type=int, default=160)
    p.add_argument("--width", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="transfer")
    p.add_argument(
        "--images",
        type=int,
        nargs=2,
        default=(8, 4),
        metavar=("TRAIN", "TEST"),
        help="transfer: images per training and test split",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    size = (args.height, args.width)
    if args.format == "transfer":
        train, test = args.images
        write_transfer_datasets(args.root, args.targets, train=train, test=test, seed=args.seed)
        print(
            f"{', '.join(args.targets)} in {os.path.abspath(args.root)}: "
            f"export DETECTRON2_DATASETS={os.path.abspath(args.root)}"
        )
        return
    if args.format == "voc":
        write_voc(
            args.root, {"trainval": args.trainval, "test": args.test}, seed=args.seed, size=size
        )
        print(f"VOC-format dataset ({', '.join(CLASS_NAMES)}) in {os.path.abspath(args.root)}")
        return
    for i, (split, n) in enumerate((("train", args.train), ("val", args.val))):
        image_dir = os.path.join(args.root, split)
        json_path = os.path.join(args.root, "annotations", f"instances_{split}.json")
        write_coco(
            image_dir, json_path, n, seed=args.seed * 1000 + i, size=size, mask_format=args.masks
        )
        print(f"COCO {split}: {n} images in {image_dir}, annotations {json_path}")


if __name__ == "__main__":
    main()
