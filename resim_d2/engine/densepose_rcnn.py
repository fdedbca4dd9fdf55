"""DensePose R-CNN, trained and evaluated as detectron2's DensePose project (v0.6) does it.

The project's trainer (``densepose.engine.Trainer``, a DefaultTrainer subclass) differs from
detectron2's in its data (its own DatasetMapper with DensePose annotations, category merging and
filtering across datasets, bootstrap loaders), its evaluators (box AP through its COCO adapter plus
``DensePoseCOCOEvaluator``: GPS, GPSm and segm AP, per ``DENSEPOSE_EVALUATION.*``), its optimizer
(learning-rate factors for CSE embeddings), its checkpointer (HRNet weights), its test-time
augmentation (``TEST.AUG``) and its logging and launch settings. This kind uses the project's
classmethods for all of that, so behaviour follows the installed project, and keeps resim_d2's
weight transfer (``RESIM.FINETUNE.TRANSFER_FPN``) for converted pre-trained weights.
"""

from __future__ import annotations

from datetime import timedelta

from detectron2.engine import DEFAULT_TIMEOUT, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..utils.densepose_project import densepose_checkpointer_class, ensure_densepose
from .finetuning import DetectorFinetuning
from .run_kind import RUN_KIND_REGISTRY

__all__ = ["DensePoseRCNN"]


def _project_trainer():
    ensure_densepose()
    from densepose.engine import Trainer

    return Trainer


@RUN_KIND_REGISTRY.register()
class DensePoseRCNN(DetectorFinetuning):
    """DensePose R-CNN (``MODEL.DENSEPOSE_ON``) on detectron2's DensePose project."""

    def setup(self):
        # the project logs under "densepose"; its train_net sets that logger up
        setup_logger(output=self.cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="densepose")

    def launch_timeout(self):
        # evaluation on the main process only can take hours while the others wait
        if self.cfg.DENSEPOSE_EVALUATION.DISTRIBUTED_INFERENCE:
            return DEFAULT_TIMEOUT
        return timedelta(hours=4)

    def build_optimizer(self, model):
        return _project_trainer().build_optimizer(self.cfg, model)

    def build_train_loader(self, start_iter=0, seed=None):
        return _project_trainer().build_train_loader(self.cfg)

    def build_test_loader(self, dataset_name):
        return _project_trainer().build_test_loader(self.cfg, dataset_name)

    def build_checkpointer(self, model, save_dir="", **checkpointables):
        ensure_densepose()
        return densepose_checkpointer_class()(
            model,
            save_dir,
            transfer_fpn=self.cfg.RESIM.FINETUNE.TRANSFER_FPN,
            **checkpointables,
        )

    def build_evaluator(self, dataset_name, output_folder=None, model=None):
        trainer = _project_trainer()
        embedder = trainer.extract_embedder_from_model(model) if model is not None else None
        return trainer.build_evaluator(self.cfg, dataset_name, output_folder, embedder=embedder)

    def test(self, model, evaluators=None):
        # the project's test: evaluators get the model's CSE embedder; with
        # DENSEPOSE_EVALUATION.DISTRIBUTED_INFERENCE False only the main process runs inference
        return _project_trainer().test(self.cfg, model, evaluators)

    def test_with_tta(self, model):
        """The evaluation with test-time augmentation, results keyed ``<task>_TTA``."""
        return _project_trainer().test_with_TTA(self.cfg, model)

    def evaluate(self, model):
        results = self.test(model)
        if self.cfg.TEST.AUG.ENABLED:
            results.update(self.test_with_tta(model))
        return results

    def build_hooks(self, trainer, hook_list):
        if self.cfg.TEST.AUG.ENABLED:  # once more with TTA after the last iteration
            hook_list.append(hooks.EvalHook(0, lambda: self.test_with_tta(trainer.model)))
        return hook_list

    def build_writers(self, writers):
        from densepose.data import has_inference_based_loaders
        from densepose.engine.trainer import SampleCountMetricPrinter

        if has_inference_based_loaders(self.cfg):  # it prints the per-dataset sample counts
            writers.append(SampleCountMetricPrinter())
        return writers
