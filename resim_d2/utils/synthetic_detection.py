"""A small synthetic detection dataset written in the real PASCAL VOC (XML) and COCO (JSON) formats.

Each image is a textured background with a few filled shapes (axis-aligned rectangles and ellipses
of per-class colours). Annotations carry boxes and, for COCO, masks: polygons that trace the shapes
exactly (rectangles) or to within a pixel (ellipses, 32-gon), or RLE of the shapes as drawn. It
exists so that tests and the demo can run detectron2's real loaders and evaluators with no download.
"""

import json
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASS_NAMES", "make_images", "write_voc", "write_coco"]

CLASS_NAMES = ("box", "disc", "bar")
_COLOURS = {"box": (220, 40, 40), "disc": (40, 200, 60), "bar": (40, 80, 230)}


def _polygon(kind, x0, y0, x1, y1):
    if kind == "disc":
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        pts = []
        for i in range(32):
            a = 2 * math.pi * i / 32
            pts += [cx + rx * math.cos(a), cy + ry * math.sin(a)]
        return pts
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _polygon_area(poly):
    xs, ys = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def make_images(num_images, size=(160, 200), max_objects=3, seed=0):
    """Draw ``num_images`` images. Returns a list of (PIL image, [annotation dicts]).

    Each annotation: {"category": name, "bbox": [x0, y0, x1, y1] (pixels, exclusive right/bottom
    edge as in the drawn area), "polygon": [x, y, ...]}.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(num_images):
        bg = rng.integers(90, 160, size=(h, w, 3), dtype=np.uint8)
        img = Image.fromarray(bg)
        draw = ImageDraw.Draw(img)
        annos = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            kind = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
            bw, bh = int(rng.integers(w // 6, w // 2)), int(rng.integers(h // 6, h // 2))
            if kind == "bar":
                bh = max(8, bh // 3)
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            x1, y1 = x0 + bw, y0 + bh
            poly = _polygon(kind, x0, y0, x1, y1)
            draw.polygon(poly, fill=_COLOURS[kind])
            annos.append({"category": kind, "bbox": [x0, y0, x1, y1], "polygon": poly})
        out.append((img, annos))
    return out


def write_voc(root, splits, seed=0, size=(160, 200), class_names=CLASS_NAMES):
    """Write a VOC-layout dataset under ``root`` (JPEGImages/, Annotations/, ImageSets/Main/).

    ``splits``: {"trainval": n, "test": m}. VOC boxes are 1-based inclusive pixel indices, so a
    shape covering pixels [x0, x1) is written as xmin = x0 + 1, xmax = x1 (detectron2's loader
    subtracts 1 from xmin/ymin). ``class_names``: the names the three shapes are written as (for
    the layout of detectron2's builtin ``voc_*`` datasets, three of VOC's classes). Returns
    ``root``.
    """
    names = dict(zip(CLASS_NAMES, class_names))
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for split_idx, (split, n) in enumerate(sorted(splits.items())):
        ids = []
        for i, (img, annos) in enumerate(make_images(n, size=size, seed=seed * 1000 + split_idx)):
            fid = f"{split}_{i:05d}"
            ids.append(fid)
            img.save(os.path.join(root, "JPEGImages", fid + ".jpg"), quality=95)
            ann = ET.Element("annotation")
            ET.SubElement(ann, "filename").text = fid + ".jpg"
            sz = ET.SubElement(ann, "size")
            for k, v in (("width", img.width), ("height", img.height), ("depth", 3)):
                ET.SubElement(sz, k).text = str(v)
            for a in annos:
                obj = ET.SubElement(ann, "object")
                ET.SubElement(obj, "name").text = names[a["category"]]
                ET.SubElement(obj, "pose").text = "Unspecified"
                ET.SubElement(obj, "truncated").text = "0"
                ET.SubElement(obj, "difficult").text = "0"
                bb = ET.SubElement(obj, "bndbox")
                x0, y0, x1, y1 = a["bbox"]
                for k, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
                    ET.SubElement(bb, k).text = str(v)
            ET.ElementTree(ann).write(os.path.join(root, "Annotations", fid + ".xml"))
        with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return root


def _rle(poly, height, width):
    """Compressed COCO RLE ({"size": [h, w], "counts": str}) of the polygon drawn as in the image,
    and its area in pixels."""
    from pycocotools import mask as mask_util

    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(poly, fill=1)
    mask = np.asfortranarray(np.asarray(canvas, dtype=np.uint8))
    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle, float(mask.sum())


def write_coco(
    image_dir,
    json_path,
    num_images,
    seed=0,
    size=(160, 200),
    mask_format="polygon",
    categories=None,
    file_prefix="",
):
    """Write images into ``image_dir`` and a COCO instances JSON to ``json_path``.

    ``mask_format``: "polygon" (``segmentation`` is ``[[x, y, ...]]``, area the polygon's) or
    "rle" (compressed RLE ``{"size": [h, w], "counts": str}`` of the drawn shape, area its pixel
    count; detectron2 reads it with ``INPUT.MASK_FORMAT "bitmask"``). ``categories``: the JSON's
    category list (``[{"id", "name"}, ...]``), the three shapes written as its first three
    (default: ids 1-3 named after the shapes; for the layout of detectron2's builtin ``coco_*``
    datasets, COCO's 80 categories). Image files are ``<file_prefix><index:05d>.jpg``. Returns
    ``json_path``.
    """
    if mask_format not in ("polygon", "rle"):
        raise ValueError(f"mask_format must be 'polygon' or 'rle', got {mask_format!r}")
    cats = categories or [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
    category_id = {kind: c["id"] for kind, c in zip(CLASS_NAMES, cats)}
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i, (img, annos) in enumerate(make_images(num_images, size=size, seed=seed)):
        name = f"{file_prefix}{i:05d}.jpg"
        img.save(os.path.join(image_dir, name), quality=95)
        images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
        for a in annos:
            x0, y0, x1, y1 = a["bbox"]
            if mask_format == "rle":
                segmentation, area = _rle(a["polygon"], img.height, img.width)
            else:
                segmentation, area = [a["polygon"]], _polygon_area(a["polygon"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": category_id[a["category"]],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": area,
                    "segmentation": segmentation,
                    "iscrowd": 0,
                }
            )
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
    return json_path


def default_root(name):
    """Where a generated dataset lives: $DETECTRON2_DATASETS/<name> if that folder exists or can be
    made, else ~/.cache/resim_d2/<name>."""
    base = os.environ.get("DETECTRON2_DATASETS", "datasets")
    root = os.path.join(base, name)
    if os.path.isdir(root) or os.access(base if os.path.isdir(base) else ".", os.W_OK):
        return root
    return os.path.join(os.path.expanduser("~/.cache/resim_d2"), name)


def register_synthetic_voc(prefix="resim_synthetic_voc", root=None, splits=None):
    """Register ``<prefix>_trainval`` and ``<prefix>_test``, VOC2007-style with CLASS_NAMES.

    The images are generated (deterministically) on first use if ``root`` holds none.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    splits = splits or {"trainval": 64, "test": 32}
    root = root or default_root(prefix)

    def load(split):
        if not os.path.isfile(os.path.join(root, "ImageSets", "Main", split + ".txt")):
            write_voc(root, splits)
        return load_voc_instances(root, split, CLASS_NAMES)

    for split in splits:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda s=split: load(s))
        MetadataCatalog.get(name).set(
            thing_classes=list(CLASS_NAMES),
            dirname=root,
            year=2007,
            split=split,
            evaluator_type="pascal_voc",
        )
