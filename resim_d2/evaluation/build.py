"""Pick a detectron2 evaluator from a dataset's ``evaluator_type`` metadata."""

import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    SemSegEvaluator,
)

from .cityscapes import CityscapesInstanceEvaluatorInFolder
from .voc_ap_iou import PascalVOCDetectionEvaluatorAllIoU

# evaluator_type -> factory(cfg, dataset_name, output_folder)
_FACTORIES = {
    "coco": lambda cfg, name, out: COCOEvaluator(name, output_dir=out),
    # AP, AP50, AP75 as detectron2's, plus AP at every IoU 0.50..0.95 (voc_ap_per_iou.json)
    "pascal_voc": lambda cfg, name, out: PascalVOCDetectionEvaluatorAllIoU(name, output_dir=out),
    "lvis": lambda cfg, name, out: LVISEvaluator(name, output_dir=out),
    # matches.json, which the Cityscapes scripts write to the working directory, kept in `out`
    "cityscapes_instance": lambda cfg, name, out: CityscapesInstanceEvaluatorInFolder(name, out),
    "cityscapes_sem_seg": lambda cfg, name, out: CityscapesSemSegEvaluator(name),
    "sem_seg": lambda cfg, name, out: SemSegEvaluator(name, distributed=True, output_dir=out),
}


def register_evaluator(evaluator_type, factory):
    """Add an evaluator for datasets whose metadata says ``evaluator_type``."""
    _FACTORIES[evaluator_type] = factory


def build_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator for ``dataset_name``: cfg.RESIM.EVALUATOR if set, else its evaluator_type.

    Raises a ValueError naming the dataset and the types known when there is none.
    """
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
    kind = cfg.RESIM.EVALUATOR or MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if kind is None:
        raise ValueError(
            f"dataset '{dataset_name}' has no evaluator_type in its metadata and RESIM.EVALUATOR "
            f"is empty; known types: {sorted(_FACTORIES)}"
        )
    kinds = [kind] if isinstance(kind, str) else list(kind)
    unknown = [k for k in kinds if k not in _FACTORIES]
    if unknown:
        raise ValueError(
            f"no evaluator for type(s) {unknown} of dataset '{dataset_name}'; "
            f"known types: {sorted(_FACTORIES)}"
        )
    evaluators = [_FACTORIES[k](cfg, dataset_name, output_folder) for k in kinds]
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
