"""The ReSim pre-training run: a resumable view-pair stream, held-out correspondence, metrics."""

from __future__ import annotations

import logging
import math

from detectron2.data import DatasetCatalog
from detectron2.data.build import get_detection_dataset_dicts

from ..evaluation.region_correspondence import RegionCorrespondenceEvaluator, held_out_pairs
from ..solver import build_pretrain_lr_scheduler, build_pretrain_optimizer
from .hooks import ReSimMetricsHook
from .run_kind import RUN_KIND_REGISTRY, RunKind

__all__ = ["ReSimPretraining", "is_pretraining", "resolve_pretrain_schedule"]

logger = logging.getLogger(__name__)


def is_pretraining(cfg) -> bool:
    """Whether ``cfg`` describes ReSim pre-training (as opposed to a detectron2 detector)."""
    return cfg.MODEL.META_ARCHITECTURE == "ReSim"


def resolve_pretrain_schedule(cfg):
    """Turn RESIM.SCHEDULE (epochs, lr per 256 images) into SOLVER.MAX_ITER and SOLVER.BASE_LR.

    ``cfg`` must be mutable; returns it. Epochs count images of DATASETS.TRAIN; the learning rate
    scales linearly with the total batch (SOLVER.IMS_PER_BATCH, over all processes).
    """
    sched, solver = cfg.RESIM.SCHEDULE, cfg.SOLVER
    if sched.LR_PER_256 > 0:
        solver.BASE_LR = sched.LR_PER_256 * solver.IMS_PER_BATCH / 256.0
    if sched.EPOCHS > 0:
        images = sum(len(DatasetCatalog.get(name)) for name in cfg.DATASETS.TRAIN)
        solver.MAX_ITER = max(1, math.ceil(sched.EPOCHS * images / solver.IMS_PER_BATCH))
        logger.info(
            f"{sched.EPOCHS} epochs of {images} images at batch {solver.IMS_PER_BATCH}: "
            f"SOLVER.MAX_ITER = {solver.MAX_ITER}, SOLVER.BASE_LR = {solver.BASE_LR:g}"
        )
    return cfg


@RUN_KIND_REGISTRY.register()
class ReSimPretraining(RunKind):
    """ReSim (and MoCo-v2/SimSiam baseline) pre-training.

    * The schedule may be given in epochs and lr per 256 images (:func:`resolve_pretrain_schedule`).
    * Training data is a resumable stream (:mod:`resim_d2.data.stream`): ``--resume`` continues
      with exactly the batches the uninterrupted run would have seen; views are made by CPU
      workers or batched on the model's device (``RESIM.VIEWS.BACKEND``).
    * Evaluation is the region-correspondence score on held-out two-view pairs.
    * The model's metrics reach the event writers after every step (:class:`ReSimMetricsHook`).
    * The optimizer and schedule are detectron2's, with SimSiam's predictor at a fixed learning
      rate when ``RESIM.SIMSIAM.FIX_PRED_LR`` (:mod:`resim_d2.solver`).
    """

    def prepare_config(self):
        resolve_pretrain_schedule(self.cfg)

    def build_optimizer(self, model):
        return build_pretrain_optimizer(self.cfg, model)

    def build_lr_scheduler(self, optimizer):
        return build_pretrain_lr_scheduler(self.cfg, optimizer)

    def build_train_loader(self, start_iter=0, seed=None):
        cfg = self.cfg
        backend = cfg.RESIM.VIEWS.BACKEND
        if backend == "gpu":  # workers read files; views are made batched on the model's device
            from ..data.gpu_loader import build_gpu_pretrain_loader

            return build_gpu_pretrain_loader(cfg, start_iter=start_iter, seed=seed)
        if backend != "cpu":
            raise ValueError(f"RESIM.VIEWS.BACKEND must be 'cpu' or 'gpu', got {backend!r}")
        from ..data.build import build_pretrain_train_loader

        return build_pretrain_train_loader(cfg, start_iter=start_iter, seed=seed)

    def resumed_train_loader(self, start_iter, seed):
        # the loader built first starts the stream of cfg.SEED at iteration 0
        if start_iter > 0 or seed != self.cfg.SEED:
            return self.build_train_loader(start_iter, seed=seed)
        return None

    def build_hooks(self, trainer, hooks):
        # before the writers (last in the list), so each step's metrics reach them
        hooks.insert(len(hooks) - 1, ReSimMetricsHook())
        return hooks

    def build_test_loader(self, dataset_name):
        from ..data.build import build_batched_test_loader
        from ..data.two_view_mapper import TwoViewMapper

        # Held-out pairs: the training augmentations (colour included, so the score is not a
        # pixel-matching test), each pair seeded from the file name and its index, so every
        # evaluation sees the same views; PAIRS_PER_IMAGE pairs of every image.
        cfg = self.cfg
        records = get_detection_dataset_dicts([dataset_name], filter_empty=False)
        pairs = held_out_pairs(records, cfg.RESIM.EVAL.PAIRS_PER_IMAGE)
        args = TwoViewMapper.from_config(cfg, is_train=False)
        args["color_augment"] = TwoViewMapper.from_config(cfg, is_train=True)["color_augment"]
        mapper = TwoViewMapper(**args)
        return build_batched_test_loader(
            pairs,
            lambda r: mapper(r, rng=r["eval_seed"]),
            cfg.RESIM.EVAL.IMS_PER_BATCH,
            cfg.DATALOADER.NUM_WORKERS,
        )

    def build_evaluator(self, dataset_name, output_folder=None, model=None):
        return RegionCorrespondenceEvaluator(
            dataset_name, group_size=self.cfg.RESIM.EVAL.GROUP_SIZE
        )
