"""Runs that start from converted pre-trained weights: detector fine-tuning and the linear probe."""

from __future__ import annotations

from ..checkpoint import TransferCheckpointer
from ..evaluation import build_evaluator
from .run_kind import RUN_KIND_REGISTRY, RunKind

__all__ = ["DetectorFinetuning", "LinearProbe", "is_linear_probe"]


def is_linear_probe(cfg) -> bool:
    """Whether ``cfg`` is the ImageNet linear probe (frozen backbone, linear classifier)."""
    return cfg.MODEL.META_ARCHITECTURE == "LinearProbe"


@RUN_KIND_REGISTRY.register()
class DetectorFinetuning(RunKind):
    """A detectron2 detector (Faster/Mask R-CNN, ...) trained as ``DefaultTrainer`` trains it,
    loading ``tools/convert.py`` output with ``RESIM.FINETUNE.TRANSFER_FPN`` applied, and
    evaluated by the test dataset's ``evaluator_type`` (:func:`resim_d2.evaluation.build_evaluator`:
    COCO, VOC with AP at every IoU, Cityscapes, LVIS, semantic segmentation)."""

    def build_checkpointer(self, model, save_dir="", **checkpointables):
        # converted ReSim-FPN files carry FPN weights; RESIM.FINETUNE.TRANSFER_FPN decides whether
        # they are loaded (ReSim-FPN^T) or ignored (ReSim-FPN)
        return TransferCheckpointer(
            model,
            save_dir,
            transfer_fpn=self.cfg.RESIM.FINETUNE.TRANSFER_FPN,
            **checkpointables,
        )

    def build_train_loader(self, start_iter=0, seed=None):
        from ..data.build import build_finetune_train_loader  # image files checked first

        return build_finetune_train_loader(self.cfg)

    def build_evaluator(self, dataset_name, output_folder=None, model=None):
        return build_evaluator(self.cfg, dataset_name, output_folder)


@RUN_KIND_REGISTRY.register()
class LinearProbe(DetectorFinetuning):
    """The ImageNet linear probe: classification loaders (MoCo's lincls augmentation) and top-1 /
    top-5 accuracy, on converted weights like a detector."""

    def build_train_loader(self, start_iter=0, seed=None):
        from ..data.classification import build_classification_train_loader

        return build_classification_train_loader(self.cfg)

    def build_test_loader(self, dataset_name):
        from ..data.classification import build_classification_test_loader

        return build_classification_test_loader(self.cfg, dataset_name)

    def build_evaluator(self, dataset_name, output_folder=None, model=None):
        from ..evaluation.classification import ClassificationEvaluator

        return ClassificationEvaluator(dataset_name)
