"""The device half of the GPU view path; the code lives in :mod:`resim_d2.data.gpu`.

This module re-exports its names (decoding, resampling, colour, :class:`GPUViews`) and the colour
parameter layout, so that ``from resim_d2.data.gpu_views import ...`` keeps working.
"""

from .color_augment import (  # noqa: F401  (re-exported, with the colour parameter layout)
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
from .gpu.colour import (  # noqa: F401  (re-exported)
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_augment_views,
    default_blur_kernel_size,
    gaussian_blur,
    rgb_to_grayscale,
)
from .gpu.decode import apply_exif_orientation, device_decodes_jpeg  # noqa: F401
from .gpu.resample import resample_views  # noqa: F401
from .gpu.views import GPUViews  # noqa: F401
from .view_params import ViewParamSampler  # noqa: F401
