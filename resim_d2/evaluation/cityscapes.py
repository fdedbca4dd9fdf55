"""Cityscapes instance segmentation AP with detectron2's evaluator, keeping the files the
Cityscapes scripts write inside the run's output folder."""

from __future__ import annotations

import contextlib
import os

from detectron2.data.catalog import Metadata
from detectron2.evaluation import CityscapesInstanceEvaluator
from detectron2.utils.file_io import PathManager

__all__ = ["CityscapesInstanceEvaluatorInFolder"]


@contextlib.contextmanager
def _working_directory(path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


class CityscapesInstanceEvaluatorInFolder(CityscapesInstanceEvaluator):
    """detectron2's :class:`CityscapesInstanceEvaluator` (AP and AP50 of the masks, by the
    Cityscapes scripts), run from ``output_dir``.

    The scripts write ``matches.json`` (every prediction matched to ground truth) into the working
    directory; evaluating from ``output_dir`` keeps it there instead of wherever the command was
    started. Without ``output_dir`` it goes to the evaluator's temporary folder, deleted after.
    """

    def __init__(self, dataset_name, output_dir=None):
        super().__init__(dataset_name)
        self._output_dir = output_dir
        # the scripts glob the ground truth from the working directory: make its path absolute
        gt_dir = os.path.abspath(PathManager.get_local_path(self._metadata.gt_dir))
        self._metadata = Metadata(**{**vars(self._metadata), "gt_dir": gt_dir})

    def evaluate(self):
        folder = os.path.abspath(self._output_dir or self._temp_dir)
        os.makedirs(folder, exist_ok=True)
        with _working_directory(folder):
            return super().evaluate()
