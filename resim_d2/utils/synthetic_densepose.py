"""A small synthetic DensePose-COCO dataset, and stand-ins of the DensePose project's data files.

Images hold one or two "people": axis-aligned boxes split into a 3 x 2 grid of body parts (head,
torso, upper legs; left and right), each painted in its own colour on a textured background. The
annotations are in the real DensePose-COCO format (COCO instances JSON whose person annotations
also carry ``dp_x``/``dp_y`` (0-255 in the box), ``dp_I`` (part 1-24), ``dp_U``/``dp_V`` and
``dp_masks``, 14 compressed RLEs of the coarse parts on a 256 x 256 box grid) and are read by the
project's own loader, mapper and evaluator.

The ground truth is built so that its best possible prediction is representable and scores
exactly: every part has one (U, V) (a vertex of the stand-in mesh), the parts tile the whole box
(the person mask is its box) and the annotated points sit around the centre of their part, far
from part borders. :func:`oracle_chart_output` turns an annotation into the DensePose head's
output that reproduces it.

The stand-ins (:func:`write_data_files`) have the structure the project's code reads (keys,
dtypes, array ranks), taken from that code since the real files are not at hand: a mesh of 4
vertices per part (one per (U, V) in :data:`VERTEX_UV`), an index map, a geodesic-distance table
in the evaluator's condensed order, and identity U/V symmetry maps. :func:`geodesic_distance` is
the distance the table holds, for tests to compute GPS by hand.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "DATA_FILE_NAMES",
    "NUM_VERTICES",
    "PART_GRID",
    "PART_UV",
    "VERTEX_UV",
    "geodesic_distance",
    "oracle_chart_output",
    "points_per_part",
    "write_data_files",
    "write_densepose_coco",
]

# fine part (dp_I, 1-24) of each cell of the box, rows top to bottom, columns left to right;
# DensePose numbering: 23/24 head, 1/2 torso, 7/8 upper legs (right/left)
PART_GRID = ((23, 24), (1, 2), (7, 8))
# coarse part (dp_masks index + 1, 1-14) of each fine part: 14 head, 1 torso, 6/7 upper legs
COARSE_OF = {23: 14, 24: 14, 1: 1, 2: 1, 7: 6, 8: 7}
# the (U, V) of the 4 vertices of every part of the stand-in mesh, and the one each part is drawn at
VERTEX_UV = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))
PART_UV = {part: VERTEX_UV[i % 4] for i, part in enumerate(sorted(COARSE_OF))}
NUM_VERTICES = 24 * len(VERTEX_UV)
_PART_SPACING = 3.0  # distance between parts of the stand-in mesh (U/V span 1.0 within a part)
_POINT_OFFSETS = (-0.04, 0.0, 0.04)  # annotated points around a part's centre, box fractions
_COLOURS = {23: (230, 200, 160), 24: (200, 170, 130), 1: (200, 40, 40), 2: (150, 30, 90)}
_COLOURS.update({7: (40, 60, 200), 8: (40, 150, 200)})
DATA_FILE_NAMES = (
    "UV_symmetry_transforms.mat",
    "SMPL_subdiv.mat",
    "SMPL_SUBDIV_TRANSFORM.mat",
    "Pdist_matrix.pkl",
)


# ------------------------------------------------------------------------------ the stand-in mesh
def _vertex_position(subdiv_index: int) -> np.ndarray:
    """3-D position of mesh vertex ``subdiv_index`` (1-based, SMPL_subdiv order)."""
    part, k = divmod(subdiv_index - 1, len(VERTEX_UV))
    u, v = VERTEX_UV[k]
    return np.array([_PART_SPACING * (part + 1), u, v])


def _pdist_index(subdiv_index: int) -> int:
    """The stand-in SMPL_SUBDIV_TRANSFORM: vertex (1-based) -> its row in the distance table
    (1-based), in reverse order so that code skipping the map gets wrong distances."""
    return NUM_VERTICES - subdiv_index + 1


def geodesic_distance(subdiv_a: int, subdiv_b: int) -> float:
    """Distance between two vertices (1-based) of the stand-in mesh: Euclidean in 3-D."""
    return float(np.linalg.norm(_vertex_position(subdiv_a) - _vertex_position(subdiv_b)))


def write_data_files(folder: str) -> list[str]:
    """Write stand-ins of the project's four data files into ``folder``; returns their paths.

    * ``SMPL_subdiv.mat``: ``U_subdiv``, ``V_subdiv`` (1, N) float64, ``Part_ID_subdiv`` (1, N)
      uint8 (the evaluator indexes arrays with it);
    * ``SMPL_SUBDIV_TRANSFORM.mat``: ``index``, (N, 1) float64, vertex -> distance-table row;
    * ``Pdist_matrix.pkl``: ``{"Pdist_matrix": (N (N - 1) / 2, 1) float64}``, entry of rows
      a < b (0-based) at ``b (b - 1) / 2 + a`` (where the evaluator's index arithmetic, written
      for N = 27554, lands for the first N rows);
    * ``UV_symmetry_transforms.mat``: ``U_transforms``, ``V_transforms``, (1, 24) cells of
      256 x 256 float64 maps, here the identity (a flip keeps U and V).
    """
    from scipy.io import savemat

    os.makedirs(folder, exist_ok=True)
    n = NUM_VERTICES
    verts = np.arange(1, n + 1)
    part = (verts - 1) // len(VERTEX_UV) + 1
    uv = np.array([VERTEX_UV[(i - 1) % len(VERTEX_UV)] for i in verts])
    savemat(
        os.path.join(folder, "SMPL_subdiv.mat"),
        {
            "U_subdiv": uv[:, 0][None].astype(np.float64),
            "V_subdiv": uv[:, 1][None].astype(np.float64),
            "Part_ID_subdiv": part[None].astype(np.uint8),
        },
    )
    index = np.array([_pdist_index(i) for i in verts], dtype=np.float64)[:, None]
    savemat(os.path.join(folder, "SMPL_SUBDIV_TRANSFORM.mat"), {"index": index})
    by_row = {_pdist_index(i): i for i in verts}  # distance-table row (1-based) -> vertex
    table = np.zeros((n * (n - 1) // 2, 1), dtype=np.float64)
    for b in range(n):
        for a in range(b):
            table[b * (b - 1) // 2 + a, 0] = geodesic_distance(by_row[a + 1], by_row[b + 1])
    with open(os.path.join(folder, "Pdist_matrix.pkl"), "wb") as f:
        pickle.dump({"Pdist_matrix": table}, f, protocol=2)
    grid = np.arange(256, dtype=np.float64) / 255.0
    u_map, v_map = np.meshgrid(grid, grid)  # [row = v, col = u]
    cells = {}
    for key, m in (("U_transforms", u_map), ("V_transforms", v_map)):
        cell = np.empty((1, 24), dtype=object)
        for i in range(24):
            cell[0, i] = m
        cells[key] = cell
    savemat(os.path.join(folder, "UV_symmetry_transforms.mat"), cells, do_compression=True)
    return [os.path.join(folder, name) for name in DATA_FILE_NAMES]


# ------------------------------------------------------------------------------ annotations
def _cells():
    """(fine part, (x0, y0, x1, y1) as fractions of the box) of every cell."""
    rows, cols = len(PART_GRID), len(PART_GRID[0])
    for r, row in enumerate(PART_GRID):
        for c, part in enumerate(row):
            yield part, (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)


def _dp_masks() -> list:
    """The 14 coarse-part masks on the 256 x 256 box grid, compressed RLE (or [] when absent)."""
    from pycocotools import mask as mask_util

    masks = [np.zeros((256, 256), dtype=np.uint8) for _ in range(14)]
    for part, (x0, y0, x1, y1) in _cells():
        m = masks[COARSE_OF[part] - 1]
        m[round(y0 * 256) : round(y1 * 256), round(x0 * 256) : round(x1 * 256)] = 1
    out = []
    for m in masks:
        if not m.any():
            out.append([])
            continue
        rle = mask_util.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(rle)
    return out


def _dp_points():
    """dp_x, dp_y (0-255 box coordinates), dp_I, dp_U, dp_V of the annotated points."""
    xs, ys, parts, us, vs = [], [], [], [], []
    for part, (x0, y0, x1, y1) in _cells():
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        for dy in _POINT_OFFSETS:
            for dx in _POINT_OFFSETS:
                xs.append(round((cx + dx) * 255, 3))
                ys.append(round((cy + dy) * 255, 3))
                parts.append(float(part))
                us.append(PART_UV[part][0])
                vs.append(PART_UV[part][1])
    return {"dp_x": xs, "dp_y": ys, "dp_I": parts, "dp_U": us, "dp_V": vs}


def _people(rng, height, width):
    """Boxes (x, y, w, h), integers, of one or two non-overlapping people."""
    count = int(rng.integers(1, 3))
    slot = width // count
    boxes = []
    for i in range(count):
        w = int(rng.integers(max(24, slot // 3), max(25, slot - 8)))
        h = int(rng.integers(max(36, height // 2), height - 8))
        x = i * slot + int(rng.integers(0, slot - w + 1))
        y = int(rng.integers(0, height - h + 1))
        boxes.append((x, y, w, h))
    return boxes


def write_densepose_coco(
    image_dir, json_path, num_images, seed=0, size=(128, 160), first_id=1, file_prefix=""
):
    """Write ``num_images`` images into ``image_dir`` and their DensePose-COCO JSON to
    ``json_path``; image ids from ``first_id``, file names ``<file_prefix><id:012d>.jpg``.
    Returns ``json_path``."""
    rng = np.random.default_rng(seed)
    height, width = size
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    dp_points, dp_masks = _dp_points(), _dp_masks()
    for i in range(num_images):
        image_id = first_id + i
        name = f"{file_prefix}{image_id:012d}.jpg"
        img = Image.fromarray(rng.integers(90, 160, size=(height, width, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for x, y, w, h in _people(rng, height, width):
            for part, (x0, y0, x1, y1) in _cells():
                box = [x + x0 * w, y + y0 * h, x + x1 * w - 1, y + y1 * h - 1]
                draw.rectangle(box, fill=_COLOURS[part])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [x, y, w, h],
                    "area": float(w * h),
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                    **dp_points,
                    "dp_masks": dp_masks,
                }
            )
        img.save(os.path.join(image_dir, name), quality=95)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
    categories = [{"id": 1, "name": "person", "supercategory": "person"}]
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_path


# ------------------------------------------------------------------------------ predictions
def oracle_chart_output(num: int, size: int = 112, uv_shift: dict | None = None):
    """The DensePose head's output that reproduces the ground truth for ``num`` instances.

    Returns ``DensePoseChartPredictorOutput`` (coarse_segm [num, 2, S, S]: foreground
    everywhere; fine_segm [num, 25, S, S]: the cell's part; u, v [num, 25, S, S]: each part's
    (U, V) on its own channel). ``uv_shift``: {part: (dU, dV)} added to that part's U/V, to make
    a worse prediction.
    """
    import torch
    from densepose.structures import DensePoseChartPredictorOutput

    coarse = torch.zeros(num, 2, size, size)
    coarse[:, 1] = 10.0
    fine = torch.zeros(num, 25, size, size)
    u = torch.zeros(num, 25, size, size)
    v = torch.zeros(num, 25, size, size)
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    for part, (x0, y0, x1, y1) in _cells():
        rows = (centres >= y0) & (centres < y1)
        cols = (centres >= x0) & (centres < x1)
        fine[:, part, rows[:, None] & cols[None, :]] = 10.0
        du, dv = (uv_shift or {}).get(part, (0.0, 0.0))
        u[:, part] = PART_UV[part][0] + du
        v[:, part] = PART_UV[part][1] + dv
    return DensePoseChartPredictorOutput(coarse_segm=coarse, fine_segm=fine, u=u, v=v)


def points_per_part() -> int:
    """Annotated points on every part of a person."""
    return len(_POINT_OFFSETS) ** 2
