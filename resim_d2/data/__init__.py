"""Pre-training data: view geometry, colour augmentation, the two-view mapper, datasets, loader.

Importing this package registers the pre-training datasets (:mod:`resim_d2.data.datasets`).
"""

from . import datasets  # noqa: F401  (registers the datasets)
from .build import build_pretrain_train_loader
from .color_augment import MoCoV2ColorAugment
from .datasets import register_image_folder, register_imagenet
from .image_io import ImageLoadError, load_rgb_image
from .two_view_mapper import TwoViewMapper, render_view
from .view_geometry import make_windows, map_boxes, sample_view_pair, windows_per_axis

__all__ = [
    "build_pretrain_train_loader",
    "MoCoV2ColorAugment",
    "register_image_folder",
    "register_imagenet",
    "ImageLoadError",
    "load_rgb_image",
    "TwoViewMapper",
    "render_view",
    "make_windows",
    "map_boxes",
    "sample_view_pair",
    "windows_per_axis",
]
