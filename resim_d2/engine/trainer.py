"""DefaultTrainer for both jobs: ReSim pre-training and detectron2 fine-tuning."""

import logging
import math
import weakref

from detectron2.data import DatasetCatalog
from detectron2.data.build import get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer
from detectron2.utils import comm

from ..checkpoint import TransferCheckpointer
from ..evaluation import build_evaluator
from ..evaluation.region_correspondence import RegionCorrespondenceEvaluator, held_out_pairs
from ..solver import build_pretrain_lr_scheduler, build_pretrain_optimizer
from .hooks import ReSimMetricsHook

__all__ = ["Trainer", "is_pretraining", "resolve_pretrain_schedule"]

logger = logging.getLogger(__name__)


def is_pretraining(cfg) -> bool:
    """Whether ``cfg`` describes ReSim pre-training (as opposed to a detectron2 detector)."""
    return cfg.MODEL.META_ARCHITECTURE == "ReSim"


def is_linear_probe(cfg) -> bool:
    """Whether ``cfg`` is the ImageNet linear probe (frozen backbone, linear classifier)."""
    return cfg.MODEL.META_ARCHITECTURE == "LinearProbe"


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


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer, plus what pre-training needs.

    * Evaluators come from the test dataset's ``evaluator_type`` (:func:`build_evaluator`); for
      ReSim, the region-correspondence score on held-out two-view pairs.
    * Pre-training data is a resumable stream (:mod:`resim_d2.data.stream`): ``--resume`` continues
      with exactly the batches the uninterrupted run would have seen.
    * A NaN/Inf loss stops the run before the optimizer step, naming the last good checkpoint.
    """

    def __init__(self, cfg):
        self._data_seed = self._initial_data_seed(cfg)
        super().__init__(cfg)
        if not is_pretraining(cfg):
            # converted ReSim-FPN files carry FPN weights; RESIM.FINETUNE.TRANSFER_FPN decides
            # whether they are loaded (ReSim-FPN^T) or ignored (ReSim-FPN)
            self.checkpointer = TransferCheckpointer(
                self._trainer.model,
                cfg.OUTPUT_DIR,
                transfer_fpn=cfg.RESIM.FINETUNE.TRANSFER_FPN,
                trainer=weakref.proxy(self),
            )

    def build_hooks(self):
        hooks = super().build_hooks()
        if is_pretraining(self.cfg):
            # before the writers (last in the list), so each step's metrics reach them
            hooks.insert(len(hooks) - 1, ReSimMetricsHook())
        return hooks

    @staticmethod
    def _initial_data_seed(cfg):
        # the stream's seed goes into checkpoints, so a resumed run continues the same stream
        return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()

    # ----------------------------------------------------------------------------- data
    @classmethod
    def build_train_loader(cls, cfg, start_iter=0, seed=None):
        if is_linear_probe(cfg):
            from ..data.classification import build_classification_train_loader

            return build_classification_train_loader(cfg)
        if not is_pretraining(cfg):
            return super().build_train_loader(cfg)
        backend = cfg.RESIM.VIEWS.BACKEND
        if backend == "gpu":  # workers read files; views are made batched on the model's device
            from ..data.gpu_loader import build_gpu_pretrain_loader

            return build_gpu_pretrain_loader(cfg, start_iter=start_iter, seed=seed)
        if backend != "cpu":
            raise ValueError(f"RESIM.VIEWS.BACKEND must be 'cpu' or 'gpu', got {backend!r}")
        from ..data.build import build_pretrain_train_loader

        return build_pretrain_train_loader(cfg, start_iter=start_iter, seed=seed)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if is_linear_probe(cfg):
            from ..data.classification import build_classification_test_loader

            return build_classification_test_loader(cfg, dataset_name)
        if not is_pretraining(cfg):
            return super().build_test_loader(cfg, dataset_name)
        from ..data.build import build_batched_test_loader
        from ..data.two_view_mapper import TwoViewMapper

        # Held-out pairs: the training augmentations (colour included, so the score is not a
        # pixel-matching test), each pair seeded from the file name and its index, so every
        # evaluation sees the same views; PAIRS_PER_IMAGE pairs of every image.
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

    @classmethod
    def build_optimizer(cls, cfg, model):
        if is_pretraining(cfg):  # detectron2's, with SimSiam's fixed-lr predictor groups
            return build_pretrain_optimizer(cfg, model)
        return super().build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        if is_pretraining(cfg):
            return build_pretrain_lr_scheduler(cfg, optimizer)
        return super().build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if is_linear_probe(cfg):
            from ..evaluation.classification import ClassificationEvaluator

            return ClassificationEvaluator(dataset_name)
        if is_pretraining(cfg):
            return RegionCorrespondenceEvaluator(dataset_name, group_size=cfg.RESIM.EVAL.GROUP_SIZE)
        return build_evaluator(cfg, dataset_name, output_folder)

    # ----------------------------------------------------------------------------- state
    def state_dict(self):
        ret = super().state_dict()
        # detectron2 v0.6's DefaultTrainer checkpoints no optimizer state (later versions do), so a
        # resumed run restarted SGD momentum from zero and the first step used the initial lr
        ret["_trainer"] = self._trainer.state_dict()
        ret["data_seed"] = self._data_seed
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        self._data_seed = state_dict.get("data_seed", self._data_seed)

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if is_pretraining(self.cfg) and (self.start_iter > 0 or self._data_seed != self.cfg.SEED):
            # the loader built in __init__ started at iteration 0; continue the stream instead
            loader = self.build_train_loader(self.cfg, self.start_iter, seed=self._data_seed)
            self._trainer.data_loader = loader
            self._trainer._data_loader_iter = iter(loader)

    # ----------------------------------------------------------------------------- run
    def train(self):
        try:
            return super().train()
        except FloatingPointError as e:
            ckpt = self.checkpointer
            last = ckpt.get_checkpoint_file() if ckpt.has_checkpoint() else None
            msg = (
                f"Training stopped: {str(e).splitlines()[0]} The weights were not updated with it. "
                + (
                    f"Last good checkpoint: {last} (continue with --resume, e.g. after lowering "
                    "SOLVER.BASE_LR or enabling SOLVER.CLIP_GRADIENTS)."
                    if last
                    else "No checkpoint had been saved yet (SOLVER.CHECKPOINT_PERIOD)."
                )
            )
            if comm.is_main_process():
                logger.error(msg)
            raise FloatingPointError(msg) from e
