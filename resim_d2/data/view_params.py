"""The random parameters of a view pair: crops, flip, per-view colour, and the matched windows.

One place draws them, in one order, for both pipelines: :class:`~.two_view_mapper.TwoViewMapper`
(PIL, in dataloader workers) renders from them, and the GPU path (:mod:`.gpu_views`) ships them to
the device. Pure NumPy: nothing here touches pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .color_augment import MoCoV2ColorAugment, sample_color_params
from .view_geometry import PLACEMENTS, make_windows, sample_view_pair, windows_per_axis

__all__ = ["ViewParamSampler"]


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
    def from_config(cls, cfg) -> ViewParamSampler:
        """The training parameters of ``TwoViewMapper(cfg, is_train=True)``, read the same way."""
        from .two_view_mapper import TwoViewMapper

        kw = TwoViewMapper.from_config(cfg, is_train=True)
        keys = ("windows", "view_size", "scale", "ratio", "flip_prob", "color_augment", "placement")
        return cls(**{k: kw[k] for k in keys})

    def __repr__(self):
        return (
            f"{type(self).__name__}(view_size={self.view_size}, scale={self.scale}, "
            f"ratio={self.ratio}, flip_prob={self.flip_prob}, windows={self.windows}, "
            f"placement={self.placement!r}, color_augment={self.color_augment})"
        )

    def sample(self, rng: np.random.Generator, image_size: tuple[int, int]) -> dict:
        crop_q, crop_k, flip = sample_view_pair(
            rng, image_size, self.scale, self.ratio, self.flip_prob
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
