#!/usr/bin/env python
"""Draw what ReSim matches for one image: the two crops, and the valid windows in both views.

    python tools/visualize_views.py --image photo.jpg --out views.png [--config-file cfg.yaml]
        [--seed N] [--no-color] [KEY VALUE ...]

The PNG shows, on top, the original image (mirrored when the pair is flipped, since crops live in
the flipped frame) with the query crop (red), the key crop (blue) and their overlap (yellow); below,
one row per feature level of ``cfg.RESIM.REGION.IN_FEATURES`` with the query view and the key view
side by side and every valid window drawn and numbered: window ``m`` in the query view is the box
``m`` in the key view.
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

# isort: off
import resim_d2  # noqa: F401  (applies the detectron2 compat fixes first)
from detectron2.config import get_cfg

# isort: on

from resim_d2 import add_resim_config
from resim_d2.data.image_io import ImageLoadError, load_rgb_image
from resim_d2.data.two_view_mapper import TwoViewMapper
from resim_d2.data.view_geometry import box_intersection

ZOOM = 2  # views are drawn at this magnification
FEATURE_COLORS = ["#00e000", "#ff8c00", "#ff00ff", "#00ffff"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--config-file", default="", help="a resim_d2 config (defaults otherwise)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the view pair")
    parser.add_argument("--no-color", action="store_true", help="show views without colour aug")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _rect(draw, box, color, width=2, scale=1.0, offset=(0, 0)):
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    ox, oy = offset
    draw.rectangle([x0 + ox, y0 + oy, x1 + ox - 1, y1 + oy - 1], outline=color, width=width)


def render(image: Image.Image, out: dict, title: str) -> Image.Image:
    """The figure for one mapper output ``out`` of ``image`` (RGB PIL)."""
    size = out["image_q"].shape[-1]
    view_w = size * ZOOM
    gap, header = 16, 28
    width = 2 * view_w + 3 * gap
    frame = ImageOps.mirror(image) if out["flip"] else image
    scale = min((width - 2 * gap) / frame.width, 2 * view_w / frame.height)
    shown = frame.resize((max(1, round(frame.width * scale)), max(1, round(frame.height * scale))))
    features = list(out["windows"]) or [None]
    height = header + shown.height + gap + len(features) * (view_w + header + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(11)
    draw.text((gap, 6), title, fill="black", font=font)
    top = (gap + (width - 2 * gap - shown.width) // 2, header)
    canvas.paste(shown, top)
    crop_q, crop_k = out["crop_q"].numpy(), out["crop_k"].numpy()
    _rect(draw, crop_q, "red", 3, scale, top)
    _rect(draw, crop_k, "blue", 3, scale, top)
    overlap = box_intersection(crop_q, crop_k)
    if overlap is not None:
        _rect(draw, overlap, "yellow", 2, scale, top)
    y = header + shown.height + gap
    views = [Image.fromarray(out[k].permute(1, 2, 0).numpy()) for k in ("image_q", "image_k")]
    views = [v.resize((view_w, view_w), Image.Resampling.NEAREST) for v in views]
    for f_index, name in enumerate(features):
        color = FEATURE_COLORS[f_index % len(FEATURE_COLORS)]
        label = "no region features"
        if name is not None:
            w = out["windows"][name]
            n_valid, n_all = int(w["valid"].sum()), w["valid"].numel()
            label = f"{name}: {n_valid}/{n_all} valid windows"
        draw.text((gap, y + 4), f"query view (red crop)    {label}", fill="black", font=font)
        draw.text((2 * gap + view_w, y + 4), "key view (blue crop)", fill="black", font=font)
        y += header
        for v_index, (view, side) in enumerate(zip(views, ("boxes_q", "boxes_k"))):
            x = gap + v_index * (view_w + gap)
            canvas.paste(view, (x, y))
            _rect(draw, (0, 0, size, size), "red" if v_index == 0 else "blue", 2, ZOOM, (x, y))
            if name is None:
                continue
            w = out["windows"][name]
            for m in w["valid"].nonzero().flatten().tolist():
                box = w[side][m].tolist()
                _rect(draw, box, color, 2, ZOOM, (x, y))
                draw.text(
                    (x + box[0] * ZOOM + 3, y + box[1] * ZOOM + 2),
                    str(m),
                    fill=color,
                    font=small,
                    stroke_width=2,
                    stroke_fill="black",
                )
        y += view_w + gap
    return canvas


def main(argv=None):
    args = parse_args(argv)
    cfg = get_cfg()
    add_resim_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    mapper = TwoViewMapper(cfg, is_train=True)
    if args.no_color:
        mapper.view_params.color_augment = None
    try:
        image = load_rgb_image(args.image)
    except ImageLoadError as e:
        sys.exit(f"cannot read the image: {e}")
    out = mapper.make_views(image, np.random.default_rng(args.seed))  # = mapper(record, rng=seed)
    title = (
        f"{os.path.basename(args.image)}  seed {args.seed}  flip {out['flip']}  "
        f"placement {mapper.placement}  crops q {[int(v) for v in out['crop_q']]} "
        f"k {[int(v) for v in out['crop_k']]}"
    )
    render(image, out, title).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
