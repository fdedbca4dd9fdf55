"""DefaultTrainer with resim_d2's evaluator selection."""
from detectron2.engine import DefaultTrainer

from ..evaluation import build_evaluator


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer; evaluators come from the dataset's evaluator_type."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)
