"""MoCo-v2's colour augmentations on PIL images, driven by an explicit NumPy generator.

Same operations and parameter semantics as the MoCo-v2 torchvision recipe
(``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``, ``RandomGrayscale(p=0.2)``,
``RandomApply([GaussianBlur([0.1, 2.0])], p=0.5)`` with MoCo's PIL ``ImageFilter.GaussianBlur``)
and the same PIL kernels torchvision runs on PIL images, but every random number comes from the
generator the caller passes, so a view is reproducible from a seed. None of these operations moves
a pixel: the view geometry recorded by :mod:`resim_d2.data.view_geometry` stays exact.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

__all__ = ["MoCoV2ColorAugment", "adjust_hue"]


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """Shift the hue of an RGB image by ``hue_factor`` turns in [-0.5, 0.5] (torchvision's op)."""
    if image.mode in {"L", "1", "I", "F"}:
        return image
    h, s, v = image.convert("HSV").split()
    shift = int(hue_factor * 255) % 256  # truncation then uint8 wrap-around, as torchvision
    if shift:
        h = h.point(lambda x: (x + shift) & 0xFF)
    return Image.merge("HSV", (h, s, v)).convert(image.mode)


def _factor_range(strength: float) -> tuple[float, float] | None:
    if strength <= 0:
        return None
    return max(0.0, 1.0 - strength), 1.0 + strength


class MoCoV2ColorAugment:
    """Colour jitter (random order), random grayscale and random Gaussian blur, in MoCo-v2's order.

    Call with an RGB PIL image and a generator; returns an RGB PIL image of the same size.
    """

    def __init__(
        self,
        jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        blur_prob: float = 0.5,
    ):
        """
        Args:
            jitter: brightness, contrast, saturation strengths (factor uniform in
                ``[max(0, 1 - x), 1 + x]``) and hue strength (shift uniform in ``[-h, h]``,
                h <= 0.5).
            jitter_prob: probability of applying the jitter.
            grayscale_prob: probability of converting to grayscale (kept 3-channel).
            blur_sigma: ``(min, max)`` of the blur's sigma, view pixels (uniform).
            blur_prob: probability of blurring.
        """
        brightness, contrast, saturation, hue = (float(x) for x in jitter)
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {hue}")
        self.brightness = _factor_range(brightness)
        self.contrast = _factor_range(contrast)
        self.saturation = _factor_range(saturation)
        self.hue = (-hue, hue) if hue > 0 else None
        self.jitter_prob = float(jitter_prob)
        self.grayscale_prob = float(grayscale_prob)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_prob = float(blur_prob)

    def __repr__(self):
        return (
            f"{type(self).__name__}(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue}, jitter_prob={self.jitter_prob}, "
            f"grayscale_prob={self.grayscale_prob}, blur_sigma={self.blur_sigma}, "
            f"blur_prob={self.blur_prob})"
        )

    def jitter(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """torchvision ColorJitter: the four adjustments in a random order, random factors."""
        for op in rng.permutation(4):
            if op == 0 and self.brightness is not None:
                image = ImageEnhance.Brightness(image).enhance(rng.uniform(*self.brightness))
            elif op == 1 and self.contrast is not None:
                image = ImageEnhance.Contrast(image).enhance(rng.uniform(*self.contrast))
            elif op == 2 and self.saturation is not None:
                image = ImageEnhance.Color(image).enhance(rng.uniform(*self.saturation))
            elif op == 3 and self.hue is not None:
                image = adjust_hue(image, rng.uniform(*self.hue))
        return image

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.jitter_prob:
            image = self.jitter(image, rng)
        if rng.random() < self.grayscale_prob:
            image = image.convert("L").convert("RGB")
        if rng.random() < self.blur_prob:
            image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_sigma)))
        return image
