"""The device half of the GPU view path: a packed batch -> ReSim's two views per image.

:class:`GPUViews` decodes (:mod:`.decode`), crops and resizes (:mod:`.resample`; the horizontal
flip is folded into the resampling weights) and colours (:mod:`.colour`) every view of a batch on
the device, and returns the ``list[dict]`` the CPU path's
:class:`~resim_d2.data.two_view_mapper.TwoViewMapper` yields:

* ``"image_q"``/``"image_k"``: uint8 (3, S, S) on the device, views of one (B, 2, 3, S, S)
  tensor, so ``ReSim`` only stacks and normalises them;
* the window tensors on the device too, rows of one (B, M, 4) / (B, M) tensor per feature and
  key, which ``ReSim`` takes as it is (``RegionWindows.from_inputs``);
* crops, flip, file name, image size, ``"num_skipped"``/``"skipped"`` and ``"stream_position"``
  as the CPU path.

For a given ``(seed, position)`` crops, flip, colour parameters and windows are identical to the
CPU path's (:class:`~resim_d2.data.view_params.ViewParamSampler` draws them in the workers); only
the pixel arithmetic differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..color_augment import P_BLUR, P_GRAY, P_JITTER
from ..skips import MAX_CONSECUTIVE_SKIPS, SkipCounter
from ..view_params import ViewParamSampler
from .colour import color_augment_views, default_blur_kernel_size
from .decode import decode_batch
from .resample import resample_views

__all__ = ["GPUViews"]


class GPUViews:
    """The device half of the GPU view path: a packed batch -> ``list[dict]`` as TwoViewMapper's.

    Input: the dict :class:`~resim_d2.data.gpu.loader.GPUViewsCollator` builds in the workers
    (file bytes or worker-decoded pixels, upright image sizes, EXIF orientations, crops, flips,
    colour parameters, windows, names). Output: one dict per image with the keys of
    :class:`TwoViewMapper`'s output (``"image_q"``/``"image_k"`` uint8 (3, S, S) and the window
    tensors on ``device``) plus ``"stream_position"``.

    A JPEG that fails to decode on the device is decoded on the host (PIL); one that fails there
    too is counted as skipped (:attr:`skips`, the give-up rule of :mod:`resim_d2.data.skips`) and
    replaced by the next image of the batch with parameters redrawn from ``(seed, 2, position)``
    (``param_sampler``). The files skipped here and in the workers reach the run's log through
    the first sample's ``"num_skipped"``/``"skipped"``. A batch with no image left is dropped
    (``__call__`` returns None; its skipped files are reported with the next batch).
    """

    def __init__(
        self,
        *,
        view_size: int,
        device: torch.device | str,
        blur_kernel_size: int = 0,
        max_sigma: float = 2.0,
        param_sampler: ViewParamSampler | None = None,
        seed: int = 0,
        max_group_elements: int = 2**26,
        max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS,
    ):
        """
        Args:
            view_size: side S of the views.
            device: where decoding and augmentation run.
            blur_kernel_size: taps of the blur; 0 picks :func:`default_blur_kernel_size`.
            max_sigma: the largest blur sigma (for the default kernel size).
            param_sampler: redraws the parameters of a replaced image (None: copy the substitute's).
            seed: stream seed, for replacement draws.
            max_group_elements: memory cap of one resampling group (see :func:`resample_views`).
            max_consecutive_skips: files in a row that failed to decode, after which the run stops.
        """
        self.view_size = int(view_size)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.blur_kernel_size = int(blur_kernel_size) or default_blur_kernel_size(
            self.view_size, max_sigma
        )
        if self.blur_kernel_size % 2 == 0:
            raise ValueError(f"the blur kernel size must be odd, got {self.blur_kernel_size}")
        self.param_sampler = param_sampler
        self.seed = int(seed)
        self.max_group_elements = int(max_group_elements)
        self.num_replaced = 0
        self.skips = SkipCounter("GPUViews", limit=max_consecutive_skips)

    @classmethod
    def from_config(cls, cfg, device=None, param_sampler=None, seed=0) -> GPUViews:
        g = cfg.RESIM.GPU_VIEWS
        return cls(
            view_size=cfg.RESIM.VIEWS.SIZE,
            device=device if device is not None else cfg.MODEL.DEVICE,
            blur_kernel_size=g.BLUR_KERNEL_SIZE,
            max_sigma=max(cfg.RESIM.VIEWS.BLUR_SIGMA),
            param_sampler=param_sampler,
            seed=seed,
            max_group_elements=g.MAX_GROUP_ELEMENTS,
            max_consecutive_skips=cfg.RESIM.VIEWS.MAX_CONSECUTIVE_SKIPS,
        )

    def __repr__(self):
        return (
            f"{type(self).__name__}(view_size={self.view_size}, device={self.device}, "
            f"blur_kernel_size={self.blur_kernel_size})"
        )

    def decode(self, packed: dict) -> tuple[list[torch.Tensor | None], dict[int, str]]:
        """Upright (3, H, W) uint8 images on the device; ``{index: reason}`` of the failed ones."""
        return decode_batch(packed, self.device)

    def _replace(self, packed: dict, images: list, failed: dict[int, str]) -> dict:
        """Fill failed images with the next good image of the batch and fresh parameters."""
        bad = set(failed)
        good = [i for i in range(len(images)) if i not in bad]
        packed = dict(packed)
        for key in ("crops", "flips", "colors", "image_sizes"):
            packed[key] = packed[key].clone()
        packed["file_names"] = list(packed["file_names"])
        packed["image_ids"] = list(packed.get("image_ids") or [None] * len(images))
        packed["windows"] = {
            f: {k: v.clone() for k, v in w.items()} for f, w in packed["windows"].items()
        }
        for i in failed:
            j = min((g for g in good if g > i), default=good[0])
            images[i] = images[j]
            h, w = (int(s) for s in images[j].shape[-2:])
            packed["file_names"][i] = packed["file_names"][j]
            packed["image_ids"][i] = packed["image_ids"][j]
            packed["image_sizes"][i] = torch.tensor([h, w])
            if self.param_sampler is not None:
                position = int(packed["stream_positions"][i])
                p = self.param_sampler(np.random.default_rng([self.seed, 2, position]), (h, w))
                packed["crops"][i] = torch.from_numpy(np.stack([p["crop_q"], p["crop_k"]]))
                packed["flips"][i] = bool(p["flip"])
                packed["colors"][i] = torch.from_numpy(p["color"])
                for f, (bq, bk, valid) in p["windows"].items():
                    packed["windows"][f]["boxes_q"][i] = torch.from_numpy(bq)
                    packed["windows"][f]["boxes_k"][i] = torch.from_numpy(bk)
                    packed["windows"][f]["valid"][i] = torch.from_numpy(valid)
            else:
                for key in ("crops", "flips", "colors"):
                    packed[key][i] = packed[key][j]
                for w in packed["windows"].values():
                    for v in w.values():
                        v[i] = v[j]
            self.num_replaced += 1
        return packed

    # ------------------------------------------------------------------ views
    def render(
        self,
        images: Sequence[torch.Tensor],
        crops: np.ndarray,
        flips: np.ndarray,
        colors: np.ndarray | None,
    ) -> torch.Tensor:
        """uint8 (B, 2, 3, S, S) views of upright images.

        Args:
            images: B uint8 (3, H_i, W_i) on the device.
            crops: float64 (B, 2, 4) query/key crop boxes in the (flipped when ``flips``) frame.
            flips: bool (B,).
            colors: float64 (B, 2, NUM_COLOR_PARAMS), or None for no colour augmentation.
        """
        crops = np.asarray(crops, dtype=np.float64)
        flips = np.asarray(flips, dtype=bool)
        widths = np.array([float(im.shape[-1]) for im in images])
        boxes = crops.copy()
        # a flipped image's crop is the mirrored box of the unflipped one, its view mirrored back
        boxes[flips, :, 0] = widths[flips, None] - crops[flips, :, 2]
        boxes[flips, :, 2] = widths[flips, None] - crops[flips, :, 0]
        mirror = np.repeat(flips[:, None], 2, 1)
        S = self.view_size
        views = resample_views(
            images, boxes, S, mirror, max_group_elements=self.max_group_elements
        )  # (B, 2, 3, S, S) in 0..255
        B = views.shape[0]
        if colors is not None and np.asarray(colors).any():
            x = views.view(2 * B, 3, S, S).div_(255.0)
            color_augment_views(x, np.asarray(colors).reshape(2 * B, -1), self.blur_kernel_size)
            views = x.mul_(255.0).view(B, 2, 3, S, S)
        return views.round_().clamp_(0.0, 255.0).to(torch.uint8)

    def __call__(self, packed: dict) -> list[dict] | None:
        images, failed = self.decode(packed)
        names = packed["file_names"]
        for i, name in enumerate(names):
            if i in failed:
                self.skips.skip(name, failed[i])
            else:
                self.skips.used()
        if len(failed) == len(names):  # nothing to fill the batch with
            self.skips.carry([r for rs in packed.get("skipped") or () for r in rs])
            return None
        if failed:
            packed = self._replace(packed, images, failed)
        colors = packed["colors"].numpy()
        has_color = bool((colors[..., P_JITTER] + colors[..., P_GRAY] + colors[..., P_BLUR]).any())
        views = self.render(
            images,
            packed["crops"].numpy(),
            packed["flips"].numpy(),
            colors if has_color else None,
        )
        return self._outputs(packed, views)

    def _outputs(self, packed: dict, views: torch.Tensor) -> list[dict]:
        crops = packed["crops"].float()
        flips = packed["flips"].tolist()
        sizes = packed["image_sizes"].tolist()
        skipped = packed["num_skipped"].tolist()
        records = [list(r) for r in packed.get("skipped") or [[] for _ in skipped]]
        count, mine = self.skips.take()  # skipped here (and dropped batches' files): with sample 0
        skipped[0] += count
        records[0] += mine
        positions = packed["stream_positions"].tolist()
        ids = packed.get("image_ids")
        # windows on the device, each image's being rows of one (B, M, ...) tensor that the model
        # takes as it is (RegionWindows.from_inputs): no stacking again, and no host-to-device
        # copy from pageable memory in the training step (which would wait for the GPU)
        windows = {
            f: {k: v.to(self.device, non_blocking=True) for k, v in w.items()}
            for f, w in packed["windows"].items()
        }
        out = []
        for i, name in enumerate(packed["file_names"]):
            d = {
                "image_q": views[i, 0],
                "image_k": views[i, 1],
                "windows": {
                    f: {
                        "boxes_q": w["boxes_q"][i],
                        "boxes_k": w["boxes_k"][i],
                        "valid": w["valid"][i],
                    }
                    for f, w in windows.items()
                },
                "crop_q": crops[i, 0],
                "crop_k": crops[i, 1],
                "flip": bool(flips[i]),
                "file_name": name,
                "image_size": tuple(sizes[i]),
                "num_skipped": int(skipped[i]),
                "skipped": records[i],
                "stream_position": int(positions[i]),
            }
            if ids is not None and ids[i] is not None:
                d["image_id"] = ids[i]
            out.append(d)
        return out
