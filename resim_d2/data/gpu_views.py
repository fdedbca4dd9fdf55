"""The device half of the GPU view path; the code lives in :mod:`resim_d2.data.gpu`.

This module re-exports its names (decoding, resampling, colour, :class:`GPUViews`) and the colour
parameter layout, so that ``from resim_d2.data.gpu_views import ...`` keeps working.
"""

from .color_augment import (  # noqa: F401  (re-exported: the colour parameter layout)
    NUM_COLOR_PARAMS,
    P_BLUR,
    P_BRIGHTNESS,
    P_CONTRAST,
    P_GRAY,
    P_HUE,
    P_JITTER,
    P_ORDER,
    P_SATURATION,
    P_SIGMA,
    sample_color_params,
)
from .gpu.colour import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_augment_views,
    default_blur_kernel_size,
    gaussian_blur,
    rgb_to_grayscale,
)
from .gpu.decode import apply_exif_orientation, device_decodes_jpeg
from .gpu.resample import resample_views
from .gpu.views import GPUViews
from .view_params import ViewParamSampler

__all__ = [
    "NUM_COLOR_PARAMS",
    "sample_color_params",
    "ViewParamSampler",
    "apply_exif_orientation",
    "device_decodes_jpeg",
    "resample_views",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "gaussian_blur",
    "color_augment_views",
    "default_blur_kernel_size",
    "GPUViews",
]
