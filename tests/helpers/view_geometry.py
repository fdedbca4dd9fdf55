"""Independent references for view geometry: the released ReSim code's window mapping and grid
rule re-typed scalar by scalar, a smooth test image and bilinear sampling of it."""

import math

import numpy as np


def released_anchor_mapping(anchor, loc_q, loc_k, img_size=224.0):
    """The released ReSim code's per-box map (moco/datasets.py), re-typed scalar by scalar."""
    x0, y0, x1, y1 = anchor
    l_q, t_q, r_q, b_q = loc_q
    l_k, t_k, r_k, b_k = loc_k
    l_a = (r_q - l_q) * x0 / img_size + l_q
    r_a = (r_q - l_q) * x1 / img_size + l_q
    t_a = (b_q - t_q) * y0 / img_size + t_q
    b_a = (b_q - t_q) * y1 / img_size + t_q
    return (
        (l_a - l_k) * img_size / (r_k - l_k),
        (t_a - t_k) * img_size / (b_k - t_k),
        (r_a - l_k) * img_size / (r_k - l_k),
        (b_a - t_k) * img_size / (b_k - t_k),
    )


def smooth_image(height=360, width=480):
    """A smooth RGB uint8 image: low-frequency sinusoids, so resampling error stays small."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    r = 128 + 70 * np.sin(2 * np.pi * x / 113 + 0.3) + 40 * np.cos(2 * np.pi * y / 89)
    g = 128 + 60 * np.cos(2 * np.pi * (x + y) / 151) + 50 * np.sin(2 * np.pi * y / 127 + 1.0)
    b = 128 + 90 * np.sin(2 * np.pi * (x - 0.5 * y) / 173)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def sample_box(array, box, k=6):
    """Bilinear samples (k, k, C) of an (H, W, C) array at the centres of a k x k split of ``box``
    (pixel (i, j) covers [j, j+1) x [i, i+1), so its value sits at (j + 0.5, i + 0.5))."""
    x0, y0, x1, y1 = box
    xs = x0 + (np.arange(k) + 0.5) * (x1 - x0) / k - 0.5
    ys = y0 + (np.arange(k) + 0.5) * (y1 - y0) / k - 0.5
    h, w = array.shape[:2]
    xs = np.clip(xs, 0, w - 1)
    ys = np.clip(ys, 0, h - 1)
    xi = np.minimum(np.floor(xs).astype(int), w - 2)
    yi = np.minimum(np.floor(ys).astype(int), h - 2)
    fx = (xs - xi)[None, :, None]
    fy = (ys - yi)[:, None, None]
    a = array.astype(np.float64)
    top = a[yi][:, xi] * (1 - fx) + a[yi][:, xi + 1] * fx
    bot = a[yi + 1][:, xi] * (1 - fx) + a[yi + 1][:, xi + 1] * fx
    return top * (1 - fy) + bot * fy


def released_grid_valid(crop_q, crop_k, window, stride, img_size=224.0):
    """The released code's windows of one view pair (moco/datasets.py), re-typed: query grid
    anchored at the origin, far edge strictly inside; a window is kept when its mapped key box
    passes ``x0 < 0 or y0 < 0 or x1 >= img_size or y1 >= img_size`` -> rejected. Row-major."""
    n = int(math.ceil((img_size - window) / stride))
    valid = []
    for i in range(n):
        for j in range(n):
            y0, x0 = i * float(stride), j * float(stride)
            y1, x1 = y0 + window, x0 + window
            assert not (x1 >= img_size or y1 >= img_size)
            kx0, ky0, kx1, ky1 = released_anchor_mapping((x0, y0, x1, y1), crop_q, crop_k, img_size)
            valid.append(not (kx0 < 0 or ky0 < 0 or kx1 >= img_size or ky1 >= img_size))
    return np.array(valid)
