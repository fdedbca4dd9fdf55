"""Image classification data for the linear probe: labels, MoCo lincls augmentation, loaders.

Records are the ImageNet-folder dicts of :mod:`resim_d2.data.datasets` (``"file_name"``,
``"image_id"``, ``"class_id"`` = WordNet id). A record's integer ``"label"`` is the index of its
class in the sorted class list of its dataset(s), as torchvision's ``ImageFolder`` (hence MoCo's
``main_lincls.py``) numbers them; a record without ``"class_id"`` takes its parent folder's name.
Records that already carry ``"label"`` keep it.
"""

import logging
import os

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from detectron2.data.build import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler

from .build import build_batched_test_loader
from .image_io import ImageLoadError, load_rgb_image

__all__ = [
    "ClassificationMapper",
    "class_of",
    "classification_dataset_dicts",
    "build_classification_train_loader",
    "build_classification_test_loader",
]

logger = logging.getLogger(__name__)


def class_of(record: dict) -> str:
    """The class name of a record: its ``"class_id"``, else its parent folder's name."""
    if "class_id" in record:
        return str(record["class_id"])
    return os.path.basename(os.path.dirname(record["file_name"]))


def classification_dataset_dicts(dataset_names, num_classes=None):
    """Records of the concatenated datasets, each with an integer ``"label"``.

    Args:
        dataset_names (str or list[str]): names in DatasetCatalog.
        num_classes (int or None): if given, the number of classes found must equal it. This guards
            against a split that lacks class folders (its labels would be shifted) and against a
            flat folder (one pseudo-class).
    Returns:
        (records, classes): new dicts with ``"label"``; the sorted class names (None when every
        record came with its own ``"label"``).
    """
    if isinstance(dataset_names, str):
        dataset_names = [dataset_names]
    records = [dict(r) for name in dataset_names for r in DatasetCatalog.get(name)]
    if not records:
        raise ValueError(f"datasets {list(dataset_names)} are empty")
    if all("label" in r for r in records):
        return records, None
    classes = sorted({class_of(r) for r in records})
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(
            f"datasets {list(dataset_names)} have {len(classes)} classes (e.g. {classes[:3]}), "
            f"RESIM.LINEAR_PROBE.NUM_CLASSES is {num_classes}. Each split needs one sub-folder per "
            "class (<split>/<wnid>/*.JPEG); the ImageNet val images must be sorted into them."
        )
    index = {c: i for i, c in enumerate(classes)}
    for r in records:
        r.setdefault("label", index[class_of(r)])
    return records, classes


class ClassificationMapper:
    """A record → ``{"image": uint8 (3, S, S), "label": int, "image_id", "file_name"}``.

    MoCo lincls augmentation (torchvision, bilinear): training ``RandomResizedCrop(S, scale)`` and a
    horizontal flip with probability 1/2; inference ``Resize(R)`` (short side) and
    ``CenterCrop(S)``. ``S`` = RESIM.LINEAR_PROBE.CROP_SIZE (224), ``R`` = RESIZE_SIZE (256). The
    image is RGB (or BGR if ``image_format`` says so) and not normalised: the model does that.
    Training randomness comes from torch's RNG, which detectron2 seeds in each worker.
    An unreadable image is skipped in training (None: detectron2's MapDataset takes another record)
    and raises in inference, where every image must count.
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        crop_size: int = 224,
        resize_size: int = 256,
        scale: tuple[float, float] = (0.08, 1.0),
        image_format: str = "RGB",
    ):
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be RGB or BGR, got {image_format}")
        self.is_train = is_train
        self.image_format = image_format
        bilinear = T.InterpolationMode.BILINEAR
        if is_train:
            self.transform = T.Compose(
                [
                    T.RandomResizedCrop(crop_size, scale=tuple(scale), interpolation=bilinear),
                    T.RandomHorizontalFlip(),
                ]
            )
        else:
            self.transform = T.Compose(
                [T.Resize(resize_size, interpolation=bilinear), T.CenterCrop(crop_size)]
            )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        lp = cfg.RESIM.LINEAR_PROBE
        return {
            "is_train": is_train,
            "crop_size": lp.CROP_SIZE,
            "resize_size": lp.RESIZE_SIZE,
            "scale": tuple(lp.CROP_SCALE),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, record: dict):
        try:
            image = load_rgb_image(record["file_name"])
        except ImageLoadError as e:
            if not self.is_train:
                raise
            logger.warning(f"skipping unreadable image: {e}")
            return None
        image: Image.Image = self.transform(image)
        array = np.asarray(image)
        if self.image_format == "BGR":
            array = array[:, :, ::-1]
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))),
            "label": int(record["label"]),
            "file_name": record["file_name"],
        }
        if "image_id" in record:
            out["image_id"] = record["image_id"]
        return out


def build_classification_train_loader(cfg, mapper=None, dataset=None):
    """Infinite, shuffled loader of ``SOLVER.IMS_PER_BATCH / world_size`` mapped records per batch.

    Args:
        cfg: uses DATASETS.TRAIN, SOLVER.IMS_PER_BATCH, DATALOADER.NUM_WORKERS, RESIM.LINEAR_PROBE.
        mapper: defaults to ``ClassificationMapper(cfg, is_train=True)``.
        dataset: records with ``"label"``; defaults to those of DATASETS.TRAIN.
    Returns:
        detectron2's training loader (TrainingSampler seeded by cfg.SEED if >= 0); batches are
        list[dict].
    """
    if dataset is None:
        dataset, classes = classification_dataset_dicts(
            cfg.DATASETS.TRAIN, cfg.RESIM.LINEAR_PROBE.NUM_CLASSES
        )
        logger.info(f"Linear probe: {len(dataset)} training images of {len(classes or [])} classes")
    return build_detection_train_loader(
        dataset,
        mapper=mapper or ClassificationMapper(cfg, is_train=True),
        # shuffled the same way in every process; cfg.SEED < 0 draws a seed shared by all of them
        sampler=TrainingSampler(len(dataset), seed=cfg.SEED if cfg.SEED >= 0 else None),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def build_classification_test_loader(cfg, dataset_name, mapper=None):
    """Each record of ``dataset_name`` once across processes, RESIM.LINEAR_PROBE.TEST_IMS_PER_BATCH
    per batch (list[dict]), for :func:`detectron2.evaluation.inference_on_dataset`."""
    dataset, _ = classification_dataset_dicts(dataset_name, cfg.RESIM.LINEAR_PROBE.NUM_CLASSES)
    return build_batched_test_loader(
        dataset,
        mapper or ClassificationMapper(cfg, is_train=False),
        cfg.RESIM.LINEAR_PROBE.TEST_IMS_PER_BATCH,
        cfg.DATALOADER.NUM_WORKERS,
    )
