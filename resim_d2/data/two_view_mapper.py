"""TwoViewMapper: one dataset record -> ReSim's query/key views and their matched windows."""

import logging
import os
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.utils import comm

from .image_io import ImageLoadError, load_rgb_image
from .skips import MAX_CONSECUTIVE_SKIPS, CountsSkips, SkipCounter
from .view_params import ViewParamSampler, view_params_from_config

__all__ = ["TwoViewMapper", "render_view"]

logger = logging.getLogger(__name__)

# ViewParamSampler attributes a mapper exposes as its own (tools and logs read them there)
_SAMPLER_SETTINGS = frozenset(
    {"view_size", "windows", "num_windows", "scale", "ratio", "flip_prob", "color_augment"}
    | {"placement"}
)


def render_view(image: Image.Image, crop: Sequence[float], flip: bool, size: int) -> Image.Image:
    """Resample the crop box of an image to a ``size x size`` view (bilinear, antialiased as PIL).

    ``crop`` is in the frame of the image flipped horizontally when ``flip``. Rather than flipping
    the whole image, the mirrored box is cropped from the unflipped image and the small view is
    flipped: the same pixels, at a fraction of the cost.
    """
    x0, y0, x1, y1 = (float(c) for c in crop)
    if flip:
        x0, x1 = image.width - x1, image.width - x0
    view = image.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1))
    if flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view


def stable_seed(file_name: str, index: int = 0) -> int:
    """A seed from a file's name (its folder and base name, not where the dataset root is) and an
    index: evaluation views are the same on every machine and install."""
    parent = os.path.basename(os.path.dirname(file_name))
    key = f"{parent}/{os.path.basename(file_name)}#{index}"
    return zlib.crc32(key.encode("utf-8"))


def _to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """RGB PIL image (H, W) -> torch.uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


class TwoViewMapper(CountsSkips):
    """Map a dataset record to two augmented views of its image and the windows they share.

    Input: a detectron2 dataset dict with ``"file_name"`` (and optionally ``"image_id"``).
    Output (``S`` = view size, ``M`` = ``windows_per_axis(S, w, s) ** 2`` per feature), or ``None``
    when the image cannot be used (logged and counted; detectron2's MapDataset then tries another
    record):

    * ``"image_q"``, ``"image_k"``: torch.uint8 (3, S, S), RGB, **not normalised** (the model
      normalises with ``cfg.MODEL.PIXEL_MEAN/PIXEL_STD``, detectron2's idiom; uint8 moves 4x fewer
      bytes to the device than float).
    * ``"windows"``: ``{feature: {"boxes_q": float32 (M, 4), "boxes_k": float32 (M, 4),
      "valid": bool (M,)}}`` keyed by ``cfg.RESIM.REGION.IN_FEATURES``; boxes ``(x0, y0, x1, y1)``
      in query-/key-view pixels, invalid rows zero. A pair may have no valid window at all.
    * ``"crop_q"``, ``"crop_k"``: float32 (4,) crop boxes in original pixels (in the flipped frame
      when flipped); ``"flip"``: bool, shared by both views; ``"file_name"``; ``"image_size"``:
      ``(h, w)`` of the original (after EXIF orientation); ``"image_id"`` when the record has one.
    * ``"num_skipped"``: records this mapper (in this worker) skipped since its previous output; the
      sum over all outputs is the number of skipped records, across workers. ``"skipped"``: the
      ``(file_name, reason)`` of each, for the run's log (:mod:`resim_d2.data.skip_report`).

    The random parameters of each pair come from :attr:`view_params`, a
    :class:`~.view_params.ViewParamSampler` (the GPU view path draws through the same class).

    Skipped files are logged as warnings, unless ``log_skips`` is False (the training loaders set
    it: they report the files with the batches, so that the run's log gets them once, whichever
    worker or process met them).

    Randomness: ``mapper(record, rng)`` with a ``numpy.random.Generator`` or an int seed is fully
    determined by it. Without ``rng``, each process (dataloader worker) draws from its own
    generator, seeded on first use from ``seed`` (plus rank and worker id) or else from NumPy's
    global RNG, which detectron2 seeds per worker (``worker_init_reset_seed``) and from
    ``cfg.SEED``. In inference mode (``is_train=False``) colour augmentation is off and the geometry
    is seeded by the file name, so every evaluation sees the same views.
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool = True,
        seed: int | None = None,
        max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS,
        **view_params,
    ):
        """
        Args:
            is_train: False seeds each record's geometry from its file name.
            seed: base seed of the per-process generator (None: NumPy's global RNG seeds it).
            max_consecutive_skips: this many unusable records in a row stop the run with an error
                (the dataset is probably unreadable; :mod:`~resim_d2.data.skips`).
            view_params: the settings of the :class:`~.view_params.ViewParamSampler` the mapper
                draws through: ``windows`` (feature name -> (window side, stride) in view
                pixels, e.g. ``{"res4": (48, 32)}``; required), ``view_size``, ``scale``,
                ``ratio``, ``flip_prob``, ``color_augment``, ``placement``.
        """
        self.view_params = ViewParamSampler(**view_params)
        self.is_train = bool(is_train)
        self.seed = seed
        self.skips = SkipCounter("TwoViewMapper", limit=max_consecutive_skips)  # per process
        self._rng = None
        self._rng_pid = None

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        views = cfg.RESIM.VIEWS
        return {
            **view_params_from_config(cfg, is_train),
            "is_train": is_train,
            "seed": cfg.SEED if cfg.SEED >= 0 else None,
            "max_consecutive_skips": views.get("MAX_CONSECUTIVE_SKIPS", MAX_CONSECUTIVE_SKIPS),
        }

    def __getattr__(self, name):
        """The sampler's settings (``view_size``, ``windows``, ``num_windows``, ``scale``,
        ``ratio``, ``flip_prob``, ``color_augment``, ``placement``), read through the mapper."""
        if name in _SAMPLER_SETTINGS and "view_params" in self.__dict__:
            return getattr(self.__dict__["view_params"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self):
        return f"{type(self).__name__}({self.view_params!r}, is_train={self.is_train})"

    # ------------------------------------------------------------------ randomness
    def _process_rng(self) -> np.random.Generator:
        pid = os.getpid()
        if self._rng is None or self._rng_pid != pid:
            info = torch.utils.data.get_worker_info()
            worker_id = info.id if info is not None else 0
            if self.seed is not None:
                entropy = [int(self.seed), comm.get_rank(), worker_id]
            else:
                entropy = [int(np.random.randint(0, 2**31 - 1)), comm.get_rank(), worker_id]
            self._rng = np.random.default_rng(entropy)
            self._rng_pid = pid
        return self._rng

    def _generator(self, rng, file_name: str) -> np.random.Generator:
        if isinstance(rng, np.random.Generator):
            return rng
        if rng is not None:
            return np.random.default_rng(int(rng))
        if not self.is_train:
            return np.random.default_rng(stable_seed(file_name))
        return self._process_rng()

    # ------------------------------------------------------------------ skipping
    @property
    def num_skipped(self) -> int:
        """Records this mapper skipped (in this process)."""
        return self.skips.total

    @property
    def skip_reasons(self):
        """``Counter`` of the kinds of skip: ``"unreadable"`` files, ``"error"`` in the views."""
        return self.skips.kinds

    # ------------------------------------------------------------------ mapping
    def __call__(self, dataset_dict: dict, rng: np.random.Generator | int | None = None):
        """Map one record; see the class docstring. ``rng``: a Generator or int seed (optional)."""
        file_name = dataset_dict["file_name"]
        gen = self._generator(rng, file_name)
        try:
            image = load_rgb_image(file_name)
        except ImageLoadError as e:
            self.skips.skip(file_name, str(e), "unreadable")
            return None
        try:
            out = self.make_views(image, gen)
        except Exception as e:  # noqa: BLE001  one odd image must not end a run
            logger.debug("TwoViewMapper: failure on %s", file_name, exc_info=True)
            self.skips.skip(file_name, f"{type(e).__name__}: {e}", "error")
            return None
        self.skips.used()
        out["file_name"] = file_name
        if "image_id" in dataset_dict:
            out["image_id"] = dataset_dict["image_id"]
        out["num_skipped"], out["skipped"] = self.skips.take()
        return out

    def make_views(self, image: Image.Image, rng: np.random.Generator) -> dict:
        """Views and windows of an RGB PIL image (no file-name fields); see the class docstring."""
        size = self.view_size
        p = self.view_params.sample(rng, (image.height, image.width))
        crop_q, crop_k, flip = p["crop_q"], p["crop_k"], p["flip"]
        view_q = render_view(image, crop_q, flip, size)
        view_k = render_view(image, crop_k, flip, size)
        color_augment = self.view_params.color_augment
        if color_augment is not None:
            view_q = color_augment.apply(view_q, p["color"][0])
            view_k = color_augment.apply(view_k, p["color"][1])
        windows = {}
        for name, (boxes_q, boxes_k, valid) in p["windows"].items():
            windows[name] = {
                "boxes_q": torch.from_numpy(boxes_q),
                "boxes_k": torch.from_numpy(boxes_k),
                "valid": torch.from_numpy(valid),
            }
        return {
            "image_q": _to_uint8_chw(view_q),
            "image_k": _to_uint8_chw(view_k),
            "windows": windows,
            "crop_q": torch.from_numpy(crop_q.astype(np.float32)),
            "crop_k": torch.from_numpy(crop_k.astype(np.float32)),
            "flip": flip,
            "image_size": (image.height, image.width),
        }
