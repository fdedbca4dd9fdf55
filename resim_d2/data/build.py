"""The pre-training data loader: a resumable stream of TwoViewMapper outputs."""

import torch

from detectron2.data import DatasetFromList, MapDataset
from detectron2.data.build import get_detection_dataset_dicts, trivial_batch_collator
from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm

from .stream import build_stream_loader
from .two_view_mapper import TwoViewMapper

__all__ = ["build_pretrain_train_loader", "build_batched_test_loader"]


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
        torch DataLoader whose batches are ``list[dict]`` (see :class:`TwoViewMapper`); sample ``p``
        of the stream depends only on ``(seed, p)`` (:mod:`resim_d2.data.stream`).
    """
    if dataset is None:
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    if mapper is None:
        mapper = TwoViewMapper(cfg, is_train=True)
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    return build_stream_loader(
        dataset,
        mapper,
        seed=seed,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        start_iter=start_iter,
    )


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
