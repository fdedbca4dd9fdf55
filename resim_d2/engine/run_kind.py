"""What differs between kinds of training run, in one object the Trainer asks for everything.

A *run kind* knows how one kind of run (ReSim pre-training, detector fine-tuning, DensePose R-CNN,
the linear probe) builds its model, optimizer, LR scheduler, train and test loaders, evaluators,
checkpointer, hooks and writers, and how it evaluates. :class:`resim_d2.engine.Trainer` and
``tools/train_net.py`` hold no branch on the kind of run: they call :func:`build_run_kind` and ask
the object. Kinds are registered by name in :data:`RUN_KIND_REGISTRY`; :func:`run_kind_name` picks
one from the config.

To add a kind: subclass :class:`RunKind`, override what differs, register it with
``@RUN_KIND_REGISTRY.register()`` and extend :func:`run_kind_name` (or call
:func:`build_run_kind` with ``name=``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

from detectron2.engine import DEFAULT_TIMEOUT, AMPTrainer, SimpleTrainer
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset, print_csv_format
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm
from detectron2.utils.registry import Registry

from ..checkpoint import ResumableCheckpointer

__all__ = ["RUN_KIND_REGISTRY", "RunKind", "build_run_kind", "run_kind_name"]

RUN_KIND_REGISTRY = Registry("RUN_KIND")
RUN_KIND_REGISTRY.__doc__ = """Kinds of training run (:class:`RunKind` subclasses), by name."""

logger = logging.getLogger(__name__)


def run_kind_name(cfg) -> str:
    """The registered kind ``cfg`` describes, from its meta-architecture and heads.

    ``"ReSimPretraining"`` (``META_ARCHITECTURE: "ReSim"``), ``"LinearProbe"``, ``"DensePoseRCNN"``
    (``MODEL.DENSEPOSE_ON``, a key only configs of detectron2's DensePose project have), else
    ``"DetectorFinetuning"`` (any other detectron2 model: Faster/Mask R-CNN, ...).
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "ReSim":
        return "ReSimPretraining"
    if arch == "LinearProbe":
        return "LinearProbe"
    if cfg.MODEL.get("DENSEPOSE_ON", False):
        return "DensePoseRCNN"
    return "DetectorFinetuning"


def build_run_kind(cfg, name: str | None = None) -> RunKind:
    """The :class:`RunKind` for ``cfg`` (``name`` overrides :func:`run_kind_name`)."""
    return RUN_KIND_REGISTRY.get(name or run_kind_name(cfg))(cfg)


class RunKind:
    """detectron2's defaults (``DefaultTrainer``'s choices) for every piece of a run.

    Subclasses override what their kind of run does differently. ``self.cfg`` is the run's config;
    methods that take ``model`` get the bare model or its DistributedDataParallel wrapper.
    """

    def __init__(self, cfg):
        self.cfg = cfg

    # ---------------------------------------------------------------- before the run starts
    def prepare_config(self) -> None:
        """Derive config values from others, before the config is frozen (``self.cfg`` mutable)."""

    def setup(self) -> None:
        """Per-process set-up once the config is final (after detectron2's ``default_setup``)."""

    def launch_timeout(self):
        """How long processes wait for each other in collective calls (``launch(timeout=)``)."""
        return DEFAULT_TIMEOUT

    # ---------------------------------------------------------------- training pieces
    def build_model(self):
        model = build_model(self.cfg)
        logging.getLogger("detectron2.engine.defaults").info(f"Model:\n{model}")
        return model

    def build_optimizer(self, model):
        return build_optimizer(self.cfg, model)

    def build_lr_scheduler(self, optimizer):
        return build_lr_scheduler(self.cfg, optimizer)

    def build_train_loader(self, start_iter: int = 0, seed: int | None = None):
        """The training data; ``start_iter``/``seed`` matter to kinds with resumable streams."""
        from detectron2.data import build_detection_train_loader

        return build_detection_train_loader(self.cfg)

    def resumed_train_loader(self, start_iter: int, seed: int):
        """A loader to replace the one built at iteration 0 when a run resumes, or None to keep
        it (detectron2's loaders draw fresh random batches either way)."""
        return None

    def build_step_trainer(self, model, data_loader, optimizer):
        """The object that runs one optimisation step (detectron2's SimpleTrainer/AMPTrainer)."""
        cls = AMPTrainer if self.cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        return cls(model, data_loader, optimizer)

    def build_checkpointer(self, model, save_dir: str = "", **checkpointables):
        """Saves the run and loads ``MODEL.WEIGHTS``/``--resume`` (also for ``--eval-only``):
        atomic saves, and ``--resume`` past unreadable files
        (:class:`~resim_d2.checkpoint.ResumableCheckpointer`)."""
        return ResumableCheckpointer(model, save_dir, **checkpointables)

    def build_hooks(self, trainer, hooks: list) -> list:
        """Adjust the trainer's default hooks (detectron2's, in order; writers last)."""
        return hooks

    def build_writers(self, writers: list) -> list:
        """Adjust the default event writers (console, metrics.json, TensorBoard)."""
        return writers

    # ---------------------------------------------------------------- evaluation
    def build_test_loader(self, dataset_name: str):
        from detectron2.data import build_detection_test_loader

        return build_detection_test_loader(self.cfg, dataset_name)

    def build_evaluator(self, dataset_name: str, output_folder: str | None = None, model=None):
        """The evaluator of ``dataset_name`` (``model``: for kinds whose evaluators need it)."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluator for {dataset_name}")

    def test(self, model, evaluators=None):
        """Evaluate ``model`` on every dataset of ``DATASETS.TEST``; as ``DefaultTrainer.test``.

        Returns {dataset: {task: {metric: value}}}, or the inner dict for one dataset.
        """
        names = list(self.cfg.DATASETS.TEST)
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(names):
            raise ValueError(f"{len(evaluators)} evaluators for {len(names)} datasets {names}")
        results = OrderedDict()
        for idx, name in enumerate(names):
            loader = self.build_test_loader(name)
            if evaluators is not None:
                evaluator = evaluators[idx]
            else:
                out = os.path.join(self.cfg.OUTPUT_DIR, "inference")
                evaluator = self.build_evaluator(name, out, model=model)
            results[name] = inference_on_dataset(model, loader, evaluator)
            if comm.is_main_process():
                logger.info(f"Evaluation results for {name} in csv format:")
                print_csv_format(results[name])
        if len(results) == 1:
            return list(results.values())[0]
        return results

    def evaluate(self, model):
        """What ``tools/train_net.py --eval-only`` reports: :meth:`test` (and kind extras)."""
        return self.test(model)
