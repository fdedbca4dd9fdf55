"""JPEG decoding of the GPU view path: on the device (nvJPEG) or in the dataloader workers.

``torchvision.io.decode_jpeg`` takes the batch's list of JPEG byte tensors with the device as
``device`` (nvJPEG; the hardware decoder on A100/H100/H200 for baseline JPEGs), then each image is
made upright from its EXIF orientation with flips/transposes (:func:`apply_exif_orientation`).
Files nvJPEG cannot take (PNG and other formats, CMYK JPEGs, JPEGs without an end marker, which may
be truncated: :func:`probe_jpeg` tells them apart from the header alone) arrive already decoded by
the workers with :func:`~resim_d2.data.image_io.load_rgb_image`, as in the CPU path; with
``decode="worker"`` (:func:`resolve_decode`; the default on a CPU device) all of them do.

A JPEG whose header and end marker are intact but whose scan data is corrupt is refused by PIL in
the CPU path, while nvJPEG's hardware decoder may return an image of garbage without an error (with
``decode="worker"`` it is skipped as in the CPU path). torchvision's CPU decoder refuses it; it is
then decoded by PIL on the host (:func:`decode_batch`), and failing that reported as failed
(:class:`~resim_d2.data.gpu.views.GPUViews` counts it as skipped and replaces it).
"""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
import torch
from PIL import Image

from ..image_io import ImageLoadError, load_rgb_image
from .transfer import host_image

__all__ = [
    "DECODE_MODES",
    "apply_exif_orientation",
    "device_decodes_jpeg",
    "probe_jpeg",
    "resolve_decode",
    "decode_batch",
]

logger = logging.getLogger(__name__)

DECODE_MODES = ("auto", "device", "worker")
_EXIF_ORIENTATION = 0x0112
_EOI_SEARCH = 4096  # bytes at the end of a JPEG searched for its end-of-image marker


def apply_exif_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Make an image (..., H, W) upright from its EXIF orientation (1-8), as PIL's exif_transpose.

    Orientation 5-8 swap height and width. Returns a view where possible (1, 5), else a copy.
    """
    o = int(orientation)
    if o == 2:  # FLIP_LEFT_RIGHT
        return image.flip(-1)
    if o == 3:  # ROTATE_180
        return image.flip(-2, -1)
    if o == 4:  # FLIP_TOP_BOTTOM
        return image.flip(-2)
    if o == 5:  # TRANSPOSE
        return image.transpose(-2, -1)
    if o == 6:  # ROTATE_270 (a quarter turn clockwise)
        return image.transpose(-2, -1).flip(-1)
    if o == 7:  # TRANSVERSE
        return image.transpose(-2, -1).flip(-2, -1)
    if o == 8:  # ROTATE_90 (a quarter turn counter-clockwise)
        return image.transpose(-2, -1).flip(-2)
    return image


@functools.cache
def _tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 90)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, (list, tuple)) else [out]


@functools.cache
def device_decodes_jpeg(device: str) -> bool:
    """Whether ``torchvision.io.decode_jpeg(..., device=device)`` works here (nvJPEG on CUDA)."""
    try:
        data = torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8)
        (img,) = _decode_jpegs([data], torch.device(device))
        return tuple(img.shape) == (3, 8, 16)
    except Exception as e:  # noqa: BLE001  no nvJPEG in this torchvision build, no device, ...
        logger.info("JPEG decoding on %s is not available (%s: %s)", device, type(e).__name__, e)
        return False


def probe_jpeg(data: bytes) -> tuple[int, int, int] | None:
    """Upright ``(height, width, exif_orientation)`` of a JPEG the device decoder can take.

    Reads the header only (PIL parses markers; no pixel is decoded). None for anything else:
    another format, a CMYK/YCCK JPEG, a JPEG without an end-of-image marker near its end (most
    likely truncated), an unreadable header. Those are left to PIL in the worker.
    """
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        return None
    if data.rfind(b"\xff\xd9", max(0, len(data) - _EOI_SEARCH)) < 0:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            width, height = image.size
            try:
                orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
            except Exception:  # noqa: BLE001  a broken EXIF block only loses the orientation
                orientation = 1
    except Exception:  # noqa: BLE001  PIL's loader in the worker reports what is wrong
        return None
    if not 1 <= orientation <= 8:
        orientation = 1
    if orientation >= 5:  # a quarter turn: height and width swap
        height, width = width, height
    return height, width, orientation


def resolve_decode(mode: str, device: torch.device) -> str:
    """``"device"`` or ``"worker"`` for RESIM.GPU_VIEWS.DECODE on ``device``."""
    if mode not in DECODE_MODES:
        raise ValueError(f"RESIM.GPU_VIEWS.DECODE must be one of {DECODE_MODES}, got {mode!r}")
    if mode == "worker":
        return mode
    if device.type != "cuda":
        return "device" if mode == "device" else "worker"
    if device_decodes_jpeg(str(device)):
        return "device"
    logger.warning(
        f"JPEG decoding on {device} is not available in this torchvision build; the dataloader "
        "workers decode (RESIM.GPU_VIEWS.DECODE 'worker')."
    )
    return "worker"


def decode_batch(
    packed: dict, device: torch.device
) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """The images of a packed batch (:class:`~resim_d2.data.gpu.loader.GPUViewsCollator`), upright.

    Returns:
        B uint8 (3, H_i, W_i) images on ``device`` (None where decoding failed), and
        ``{index: reason}`` of the images that failed (the device's decoder, then PIL's, refused
        them).
    """
    B = len(packed["file_names"])
    images: list[torch.Tensor | None] = [None] * B
    decoded = packed["decoded"].tolist()
    if any(decoded):
        pixels = packed["pixels"]
        if device.type == "cuda":
            pixels = pixels.to(device, non_blocking=True)
        offs = packed["pixel_offsets"].tolist()
        sizes = packed["image_sizes"].tolist()
        for i in np.flatnonzero(decoded):
            h, w = sizes[i]
            images[i] = pixels[offs[i] : offs[i + 1]].view(h, w, 3).permute(2, 0, 1)
    jpegs = [i for i in range(B) if not decoded[i]]
    if not jpegs:
        return images, {}
    offs = packed["data_offsets"].tolist()
    datas = [packed["data"][offs[i] : offs[i + 1]] for i in jpegs]
    orientations = packed["orientations"].tolist()
    try:
        out = _decode_jpegs(datas, device)
    except RuntimeError:  # one bad file fails the whole batch: decode one by one
        out = [None] * len(jpegs)
    failed = {}
    for n, i in enumerate(jpegs):
        if out[n] is not None:
            images[i] = apply_exif_orientation(out[n], orientations[i])
        else:
            name = packed["file_names"][i]
            images[i], reason = _decode_one(datas[n], name, orientations[i], device)
            if images[i] is None:
                failed[i] = reason
    return images, failed


def _decode_one(data: torch.Tensor, file_name: str, orientation: int, device: torch.device):
    """One JPEG on the device, else on the host with PIL (upright): ``(image, None)``, or
    ``(None, why PIL refused it)``."""
    try:
        return apply_exif_orientation(_decode_jpegs([data], device)[0], orientation), None
    except RuntimeError as e:
        logger.warning(f"GPUViews: {file_name} does not decode on {device} ({e})")
    try:  # PIL's decoder, as the CPU path (it applies the EXIF orientation itself)
        image = load_rgb_image(file_name)
    except ImageLoadError as e:
        return None, str(e)
    return host_image(image, device), None
