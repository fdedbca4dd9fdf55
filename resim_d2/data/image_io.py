"""Robust image loading for pre-training: any readable file becomes an upright 8-bit RGB PIL image.

:func:`load_rgb_image` applies the EXIF orientation and converts every mode PIL can open (grayscale,
palette, CMYK, RGBA/LA, 16-bit and float grayscale, ...) to RGB; anything else (empty, corrupt or
truncated files, decompression bombs, unknown formats) raises :class:`ImageLoadError` with the file
name, for the caller to skip and count. It never returns a partially decoded image.
"""

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from detectron2.utils.file_io import PathManager

__all__ = ["ImageLoadError", "load_rgb_image", "IMAGE_EXTENSIONS", "is_image_file"]

# Extensions (lower case) that dataset listing treats as images.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)


def is_image_file(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


class ImageLoadError(Exception):
    """An image file that cannot be turned into an RGB image; the message names the file."""


def _to_uint8_gray(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float single-channel image -> 8-bit grayscale (mode "L")."""
    array = np.asarray(image)
    if array.dtype.kind == "f":
        finite = array[np.isfinite(array)]
        peak = float(finite.max()) if finite.size else 0.0
        scale = 255.0 if peak <= 1.0 else 1.0  # [0, 1] floats vs. already 0..255
        array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0) * scale
    elif array.max(initial=0) > 255:
        array = array / 257.0  # 16-bit range 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _to_uint8_gray(image).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    # RGBA, LA, PA: alpha dropped, as torchvision's default loader does. CMYK, YCbCr, L, 1, P: PIL.
    return image.convert("RGB")


def load_rgb_image(file_name: str) -> Image.Image:
    """Read an image file as an upright, fully decoded 8-bit RGB PIL image.

    Args:
        file_name: a path (or any URI detectron2's PathManager opens).

    Returns:
        PIL.Image in mode "RGB", EXIF orientation applied.

    Raises:
        ImageLoadError: the file is missing, empty, truncated, corrupt, too large for PIL's
            decompression-bomb guard, or of a mode that cannot be converted.
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now, while the file is open: truncation fails here
    except FileNotFoundError as e:
        raise ImageLoadError(f"{file_name}: no such file") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{file_name}: not a readable image (empty or corrupt file)") from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{file_name}: too large ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageLoadError(f"{file_name}: cannot decode ({type(e).__name__}: {e})") from e
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when already upright
    except Exception:  # noqa: BLE001  a broken EXIF block only loses the orientation
        pass
    try:
        image = _to_rgb(image)
    except (OSError, ValueError) as e:
        raise ImageLoadError(f"{file_name}: cannot convert mode {image.mode} to RGB ({e})") from e
    if image.width < 1 or image.height < 1:
        raise ImageLoadError(f"{file_name}: empty image ({image.width}x{image.height})")
    return image
