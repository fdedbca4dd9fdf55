"""Training loaders: pre-training's resumable stream of TwoViewMapper outputs, and fine-tuning's
detectron2 loader over records whose image files were checked first."""

import logging
import os

import torch

from detectron2.data import DatasetFromList, MapDataset
from detectron2.data.build import (
    build_detection_train_loader,
    get_detection_dataset_dicts,
    trivial_batch_collator,
)
from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .skip_report import SkipReportingLoader
from .stream import build_stream_loader
from .two_view_mapper import TwoViewMapper

__all__ = [
    "build_pretrain_train_loader",
    "build_batched_test_loader",
    "build_finetune_train_loader",
    "check_image_files",
]

logger = logging.getLogger(__name__)

MISSING_IMAGE_POLICIES = ("error", "skip")


def build_pretrain_train_loader(cfg, mapper=None, dataset=None, start_iter=0, seed=None):
    """The infinite pre-training loader: lists of ``SOLVER.IMS_PER_BATCH / world_size`` mapper
    dicts.

    Args:
        cfg: a config with resim_d2's keys; uses DATASETS.TRAIN, SOLVER.IMS_PER_BATCH,
            DATALOADER.NUM_WORKERS and SEED.
        mapper: defaults to ``TwoViewMapper(cfg, is_train=True)``.
        dataset: a list of dataset dicts; defaults to the concatenation of ``cfg.DATASETS.TRAIN``.
        start_iter: iteration the stream starts at (``--resume`` passes the checkpoint's).
        seed: stream seed; defaults to ``cfg.SEED`` (a seed shared by all processes if negative).

    Returns:
        a torch DataLoader (in a :class:`SkipReportingLoader`) whose batches are ``list[dict]`` (see
        :class:`TwoViewMapper`); sample ``p`` of the stream depends only on ``(seed, p)``
        (:mod:`resim_d2.data.stream`).
    """
    if dataset is None:
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    if mapper is None:
        mapper = TwoViewMapper(cfg, is_train=True)
    if hasattr(mapper, "log_skips"):
        mapper.log_skips = False  # the files travel with the batches (SkipReportingLoader)
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    loader = build_stream_loader(
        dataset,
        mapper,
        seed=seed,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        start_iter=start_iter,
    )
    return SkipReportingLoader(loader)


def build_batched_test_loader(records, mapper, batch_size, num_workers=0):
    """Each record once across processes, ``batch_size`` mapped records (``list[dict]``) a batch.

    detectron2's ``build_detection_test_loader`` (v0.6) yields one image per batch; models that
    stack their inputs (ReSim's inference, the linear probe) want several.
    """
    dataset = MapDataset(DatasetFromList(records, copy=False), mapper)
    batches = torch.utils.data.BatchSampler(
        InferenceSampler(len(dataset)), batch_size, drop_last=False
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
    )


def _exists(path: str) -> bool:
    if "://" in path:  # a URI: ask the path manager
        return PathManager.exists(path)
    return os.path.isfile(path)


def check_image_files(records: list[dict], policy: str = "error", what: str = "the dataset"):
    """The records whose ``file_name`` exists; logs one line per record whose image is missing.

    ``policy``: ``"error"`` raises FileNotFoundError after listing them (nothing has trained yet),
    ``"skip"`` returns the others. If no image exists at all, it always raises (a wrong dataset
    root, not a few lost files), after listing the first ten.
    """
    if policy not in MISSING_IMAGE_POLICIES:
        raise ValueError(
            f"RESIM.DATA.MISSING_IMAGES must be one of {MISSING_IMAGE_POLICIES}, got {policy!r}"
        )
    found = [_exists(r["file_name"]) for r in records]
    present = [r for r, ok in zip(records, found) if ok]
    missing = [r for r, ok in zip(records, found) if not ok]
    if not missing:
        return records
    every = not present
    for r in missing[:10] if every else missing:
        logger.warning(f"missing image: {r['file_name']} (image_id {r.get('image_id', '?')})")
    if every:
        raise FileNotFoundError(
            f"none of the {len(records)} images of {what} exists (first: "
            f"{missing[0]['file_name']}); check the dataset root ($DETECTRON2_DATASETS)"
        )
    if policy == "error":
        raise FileNotFoundError(
            f"{len(missing)} of the {len(records)} images of {what} are missing (listed above, "
            f"first: {missing[0]['file_name']}); restore them, or set RESIM.DATA.MISSING_IMAGES "
            "'skip' to train without those records"
        )
    logger.warning(
        f"training without the {len(missing)} records of {what} whose image is missing "
        "(RESIM.DATA.MISSING_IMAGES 'skip')"
    )
    return present


def build_finetune_train_loader(cfg, mapper=None):
    """detectron2's ``build_detection_train_loader`` over ``DATASETS.TRAIN``, once every record's
    image file has been checked (:func:`check_image_files`, ``RESIM.DATA.MISSING_IMAGES``): a
    missing image is reported before training starts, not when it is first drawn."""
    records = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    what = "DATASETS.TRAIN " + ", ".join(cfg.DATASETS.TRAIN)
    records = check_image_files(records, cfg.RESIM.DATA.MISSING_IMAGES, what)
    return build_detection_train_loader(cfg, mapper=mapper, dataset=records)
