"""A small synthetic dataset in the Cityscapes layout, read by detectron2's own Cityscapes loader
(``cityscapes_fine_instance_seg_*``) and evaluated by the Cityscapes scripts.

Street-like images: sky, buildings and road as stuff, cars and people as instances, each a polygon
with integer vertices. The ground truth is written as Cityscapes ships it, under
``<root>/cityscapes/``:

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png      the image (8-bit RGB)
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_polygons.json      objects in drawing order
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       8-bit label ids
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png    16-bit: label id for
                                                  stuff, label id * 1000 + instance for things

The label images are the polygons rasterised in order, later ones over earlier ones, with
``PIL.ImageDraw.polygon`` (what the Cityscapes scripts' ``json2instanceImg`` does).
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["LABEL_IDS", "write_cityscapes"]

# Cityscapes label ids of the classes drawn (cityscapesscripts.helpers.labels)
LABEL_IDS = {"road": 7, "building": 11, "sky": 23, "person": 24, "car": 26}
_COLOURS = {
    "road": (128, 64, 128),
    "building": (70, 70, 70),
    "sky": (70, 130, 180),
    "person": (220, 20, 60),
    "car": (0, 0, 142),
}
CITY = "synthcity"


def _objects(rng, height, width):
    """Polygons [(label, [[x, y], ...])] in drawing order: stuff first, then instances."""
    horizon = int(height * rng.uniform(0.35, 0.5))
    objs = [
        ("sky", [[0, 0], [width - 1, 0], [width - 1, horizon], [0, horizon]]),
        ("road", [[0, horizon], [width - 1, horizon], [width - 1, height - 1], [0, height - 1]]),
    ]
    x = 0
    while x < width - 8:  # buildings along the horizon
        w = int(rng.integers(width // 8, width // 4))
        top = int(rng.integers(height // 12, horizon - 4))
        objs.append(("building", [[x, top], [x + w - 1, top], [x + w - 1, horizon], [x, horizon]]))
        x += w + int(rng.integers(0, 6))
    slots = [
        int(s) for s in rng.permutation(4)[: int(rng.integers(2, 5))]
    ]  # 2-4 things, one per slot
    slot_w = width // 4
    for s in slots:
        x0 = s * slot_w + int(rng.integers(2, 8))
        if rng.random() < 0.5:
            w, h = int(rng.integers(slot_w // 2, slot_w - 10)), int(rng.integers(16, 30))
            y1 = int(rng.integers(horizon + h, height - 2))
            poly = [[x0, y1 - h], [x0 + w, y1 - h], [x0 + w + 4, y1], [x0 - 4, y1]]
            objs.append(("car", poly))
        else:
            w, h = int(rng.integers(10, 16)), int(rng.integers(26, 40))
            y1 = int(rng.integers(horizon + 4, height - 2))
            top = max(0, y1 - h)
            poly = [[x0 + w // 2, top], [x0 + w, top + 6], [x0 + w, y1], [x0, y1], [x0, top + 6]]
            objs.append(("person", poly))
    return objs


def write_cityscapes(root, splits=None, seed=0, size=(128, 256)):
    """Write ``<root>/cityscapes/{leftImg8bit,gtFine}/<split>/...``; returns that folder.

    ``splits``: {"train": n, "val": m} images per split (one city each).
    """
    splits = splits or {"train": 8, "val": 4}
    height, width = size
    base = os.path.join(root, "cityscapes")
    for split_idx, (split, n) in enumerate(sorted(splits.items())):
        rng = np.random.default_rng(seed * 1000 + split_idx)
        img_dir = os.path.join(base, "leftImg8bit", split, CITY)
        gt_dir = os.path.join(base, "gtFine", split, CITY)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        for i in range(n):
            stem = f"{CITY}_{split_idx:06d}_{i:06d}"
            objs = _objects(rng, height, width)
            noise = rng.integers(-20, 21, size=(height, width, 3))
            image = Image.new("RGB", (width, height))
            label = Image.new("L", (width, height), 0)
            inst = np.zeros((height, width), dtype=np.int32)
            counts = {}
            draw_img, draw_label = ImageDraw.Draw(image), ImageDraw.Draw(label)
            for name, poly in objs:
                xy = [tuple(p) for p in poly]
                draw_img.polygon(xy, fill=_COLOURS[name])
                draw_label.polygon(xy, fill=LABEL_IDS[name])
                canvas = Image.new("L", (width, height), 0)
                ImageDraw.Draw(canvas).polygon(xy, fill=1)
                if name in ("car", "person"):
                    value = LABEL_IDS[name] * 1000 + counts.get(name, 0)
                    counts[name] = counts.get(name, 0) + 1
                else:
                    value = LABEL_IDS[name]
                inst[np.asarray(canvas, dtype=bool)] = value
            pixels = np.clip(np.asarray(image, dtype=np.int32) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(img_dir, stem + "_leftImg8bit.png"))
            label.save(os.path.join(gt_dir, stem + "_gtFine_labelIds.png"))
            Image.fromarray(inst.astype(np.uint16)).save(
                os.path.join(gt_dir, stem + "_gtFine_instanceIds.png")
            )
            polygons = {
                "imgHeight": height,
                "imgWidth": width,
                "objects": [{"label": name, "polygon": poly} for name, poly in objs],
            }
            with open(os.path.join(gt_dir, stem + "_gtFine_polygons.json"), "w") as f:
                json.dump(polygons, f)
    return base
