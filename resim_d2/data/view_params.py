"""The random parameters of a view pair: crops, flip, per-view colour, and the matched windows.

One place draws them, in one order, for both pipelines: ``TwoViewMapper`` (PIL, in dataloader
workers) renders from them, and the GPU path ships them to the device. Pure NumPy: nothing here
touches pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .color_augment import MoCoV2ColorAugment, sample_color_params
from .view_geometry import PLACEMENTS, make_windows, sample_view_pair, windows_per_axis

__all__ = ["ViewParamSampler", "view_params_from_config"]


def view_params_from_config(cfg, is_train: bool = True) -> dict:
    """:class:`ViewParamSampler`'s keyword arguments from ``cfg.RESIM.VIEWS`` and ``.REGION``.

    Training draws colour parameters (MoCo v2's augmentation) and windows only when the region
    branch is on; evaluation (``is_train=False``) has no colour augmentation and always windows,
    so that a baseline without region branch can be scored on the same windows.
    """
    views, region = cfg.RESIM.VIEWS, cfg.RESIM.REGION
    windows = {}
    if region.ENABLED or not is_train:
        if not len(region.IN_FEATURES) == len(region.WINDOW_SIZES) == len(region.WINDOW_STRIDES):
            raise ValueError(
                "RESIM.REGION.IN_FEATURES, WINDOW_SIZES and WINDOW_STRIDES must have the same "
                f"length, got {region.IN_FEATURES}, {region.WINDOW_SIZES}, "
                f"{region.WINDOW_STRIDES}"
            )
        windows = {
            f: (w, s)
            for f, w, s in zip(region.IN_FEATURES, region.WINDOW_SIZES, region.WINDOW_STRIDES)
        }
    color = None
    if is_train:
        color = MoCoV2ColorAugment(
            jitter=views.COLOR_JITTER,
            jitter_prob=views.COLOR_JITTER_PROB,
            grayscale_prob=views.GRAYSCALE_PROB,
            blur_sigma=views.BLUR_SIGMA,
            blur_prob=views.BLUR_PROB,
        )
    return {
        "windows": windows,
        "view_size": views.SIZE,
        "scale": views.SCALE,
        "ratio": views.RATIO,
        "flip_prob": views.FLIP_PROB,
        "color_augment": color,
        "placement": views.WINDOW_PLACEMENT,
    }


class ViewParamSampler:
    """The random parameters of one view pair and its windows (both pipelines draw through this).

    ``sampler.sample(rng, (h, w))`` (or ``sampler(rng, (h, w))``) returns ``{"crop_q", "crop_k":
    float64 (4,), "flip": bool, "color": float64 (2, NUM_COLOR_PARAMS) (query, key), "windows":
    {feature: (boxes_q float32 (M, 4), boxes_k float32 (M, 4), valid bool (M,))}}``. The draws on
    ``rng``, in order: ``sample_view_pair`` (flip, crop_q, crop_k), the query view's colour, the key
    view's colour; the windows draw nothing.
    """

    def __init__(
        self,
        *,
        windows: Mapping[str, tuple[int, int]],
        view_size: int = 224,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_prob: float = 0.5,
        color_augment: MoCoV2ColorAugment | None = None,
        placement: str = "grid",
    ):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.windows = {str(k): (int(w), int(s)) for k, (w, s) in windows.items()}
        self.view_size = int(view_size)
        self.scale = tuple(float(x) for x in scale)
        self.ratio = tuple(float(x) for x in ratio)
        self.flip_prob = float(flip_prob)
        self.color_augment = color_augment
        self.placement = placement
        self.num_windows = {
            k: windows_per_axis(self.view_size, w, s) ** 2 for k, (w, s) in self.windows.items()
        }

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> ViewParamSampler:
        """The sampler of ``TwoViewMapper(cfg, is_train)`` (see :func:`view_params_from_config`)."""
        return cls(**view_params_from_config(cfg, is_train))

    def __repr__(self):
        return (
            f"{type(self).__name__}(view_size={self.view_size}, scale={self.scale}, "
            f"ratio={self.ratio}, flip_prob={self.flip_prob}, windows={self.windows}, "
            f"placement={self.placement!r}, color_augment={self.color_augment})"
        )

    def sample(self, rng: np.random.Generator, image_size: tuple[int, int]) -> dict:
        crop_q, crop_k, flip = sample_view_pair(
            rng, image_size, self.flip_prob, scale=self.scale, ratio=self.ratio
        )
        color = np.stack(
            [sample_color_params(self.color_augment, rng) for _ in range(2)]  # query, then key
        )
        windows = {
            name: make_windows(crop_q, crop_k, self.view_size, w, s, self.placement)
            for name, (w, s) in self.windows.items()
        }
        return {
            "crop_q": crop_q,
            "crop_k": crop_k,
            "flip": flip,
            "color": color,
            "windows": windows,
        }

    __call__ = sample
