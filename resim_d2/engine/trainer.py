"""One trainer for every kind of run, asking a :class:`~resim_d2.engine.run_kind.RunKind` for
each piece."""

import logging
import weakref

from detectron2.engine import DefaultTrainer, create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .reliability import reliability_hooks
from .run_kind import build_run_kind

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer, with every piece built by the config's run kind.

    The kind (:func:`~resim_d2.engine.run_kind.build_run_kind`: ReSim pre-training, detector
    fine-tuning, DensePose R-CNN, linear probe) builds the model, optimizer, LR scheduler, loaders,
    evaluators, checkpointer, hooks and writers; the classmethods below keep DefaultTrainer's
    signatures and forward to it. On top, for every kind:

    * the optimizer and the data stream's seed are checkpointed (v0.6's DefaultTrainer saves no
      optimizer state, so ``--resume`` restarted SGD momentum and the first step used the initial
      lr);
    * a non-finite loss, gradient or statistic stops the run before the optimizer step, naming a
      checkpoint to continue from (:mod:`resim_d2.engine.nan_guard`).
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__'s construction, in the run kind's terms, with the kind's
        # checkpointer in place before the hooks (which save through it) are built
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        self.kind = build_run_kind(cfg)
        self._data_seed = self._initial_data_seed(cfg)
        model = self.kind.build_model()
        optimizer = self.kind.build_optimizer(model)
        data_loader = self.kind.build_train_loader()
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = self.kind.build_step_trainer(model, data_loader, optimizer)
        self.scheduler = self.kind.build_lr_scheduler(optimizer)
        self.checkpointer = self.kind.build_checkpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        hooks = super().build_hooks()
        hooks[:0] = reliability_hooks(self.cfg)  # NaN guard, resume schedule, skips, RNG state
        return self.kind.build_hooks(self, hooks)

    def build_writers(self):
        return self.kind.build_writers(super().build_writers())

    @staticmethod
    def _initial_data_seed(cfg):
        # the stream's seed goes into checkpoints, so a resumed run continues the same stream
        return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()

    # ------------------------------------------------- DefaultTrainer's builders, by the kind
    @classmethod
    def build_model(cls, cfg):
        return build_run_kind(cfg).build_model()

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_run_kind(cfg).build_optimizer(model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_run_kind(cfg).build_lr_scheduler(optimizer)

    @classmethod
    def build_train_loader(cls, cfg, start_iter=0, seed=None):
        return build_run_kind(cfg).build_train_loader(start_iter, seed=seed)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_run_kind(cfg).build_test_loader(dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, model=None):
        return build_run_kind(cfg).build_evaluator(dataset_name, output_folder, model=model)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        return build_run_kind(cfg).test(model, evaluators)

    # ----------------------------------------------------------------------------- state
    def state_dict(self):
        ret = super().state_dict()
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
        loader = self.kind.resumed_train_loader(self.start_iter, self._data_seed)
        if loader is not None:  # e.g. a pre-training stream continued where it stopped
            self._trainer.data_loader = loader
            self._trainer._data_loader_iter = iter(loader)
