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

__all__ = ["MoCoV2ColorAugment", "adjust_hue", "sample_color_params", "NUM_COLOR_PARAMS"]

# Layout of one view's colour parameters (float64 vector of NUM_COLOR_PARAMS), shared by the CPU
# path (MoCoV2ColorAugment.apply) and the GPU path (gpu.colour.color_augment_views):
P_JITTER = 0  # 1 if the colour jitter is applied
P_ORDER = 1  # 4 entries: the jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue) in order
P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 5, 6, 7, 8  # factors; neutral 1, 1, 1, 0
P_GRAY = 9  # 1 if converted to grayscale
P_BLUR = 10  # 1 if blurred
P_SIGMA = 11  # the blur's sigma, view pixels
NUM_COLOR_PARAMS = 12
_NEUTRAL = np.array([1.0, 1.0, 1.0, 0.0])  # brightness, contrast, saturation, hue


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

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """Draw one view's parameters: float64 (NUM_COLOR_PARAMS,), see the ``P_*`` layout.

        The draws on ``rng``, in order: jitter coin; if jittering, the op order (a permutation)
        and a factor per op that has a range, in that order; grayscale coin; blur coin; if
        blurring, sigma. Parameters not drawn stay neutral (factors 1, hue 0, identity order).
        """
        return sample_color_params(self, rng)

    def apply(self, image: Image.Image, params: np.ndarray) -> Image.Image:
        """Apply drawn parameters to an RGB PIL image (torchvision's PIL kernels)."""
        if params[P_JITTER] > 0.5:
            ranges = (self.brightness, self.contrast, self.saturation, self.hue)
            for op in params[P_ORDER : P_ORDER + 4].astype(np.int64):
                if ranges[op] is None:
                    continue
                factor = float(params[P_BRIGHTNESS + op])
                if op == 0:
                    image = ImageEnhance.Brightness(image).enhance(factor)
                elif op == 1:
                    image = ImageEnhance.Contrast(image).enhance(factor)
                elif op == 2:
                    image = ImageEnhance.Color(image).enhance(factor)
                else:
                    image = adjust_hue(image, factor)
        if params[P_GRAY] > 0.5:
            image = image.convert("L").convert("RGB")
        if params[P_BLUR] > 0.5:
            image = image.filter(ImageFilter.GaussianBlur(radius=float(params[P_SIGMA])))
        return image

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        return self.apply(image, self.sample(rng))


def sample_color_params(augment: MoCoV2ColorAugment | None, rng: np.random.Generator) -> np.ndarray:
    """One view's colour parameters as ``augment`` draws them (neutral when ``augment`` is None).

    Returns:
        float64 (NUM_COLOR_PARAMS,), see the ``P_*`` layout; no augmentation (``augment`` None or
        coins that fail) leaves neutral factors and the identity order.
    """
    p = np.zeros(NUM_COLOR_PARAMS)
    p[P_ORDER : P_ORDER + 4] = np.arange(4)
    p[P_BRIGHTNESS : P_HUE + 1] = _NEUTRAL
    if augment is None:
        return p
    if rng.random() < augment.jitter_prob:
        p[P_JITTER] = 1.0
        order = rng.permutation(4)
        p[P_ORDER : P_ORDER + 4] = order
        ranges = (augment.brightness, augment.contrast, augment.saturation, augment.hue)
        for op in order:
            if ranges[op] is not None:
                p[P_BRIGHTNESS + op] = rng.uniform(*ranges[op])
    if rng.random() < augment.grayscale_prob:
        p[P_GRAY] = 1.0
    if rng.random() < augment.blur_prob:
        p[P_BLUR] = 1.0
        p[P_SIGMA] = rng.uniform(*augment.blur_sigma)
    return p
