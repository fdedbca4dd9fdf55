"""PASCAL VOC box AP at every IoU threshold 0.50, 0.55, ..., 0.95 (the paper's Figure 4).

detectron2's :class:`PascalVOCDetectionEvaluator` already runs ``voc_eval`` at these ten thresholds
to average them into "AP", but reports only AP, AP50 and AP75. This evaluator keeps the same
predictions, the same ``voc_eval`` (the VOC devkit's matching, 11-point metric for 2007) and the
same averages, and also returns "AP55" ... "AP95" and writes them, per class too, to
``<output_dir>/voc_ap_per_iou.json``::

    {"dataset": name, "metric": "voc2007_11point" | "voc_area",
     "thresholds": [0.5, 0.55, ..., 0.95], "ap": [mAP per threshold, percent],
     "per_class": {class_name: [AP per threshold, percent]}}

``tools/plot_ap_iou.py`` plots ΔAP against IoU from several such files.
"""

import json
import os
import tempfile
from collections import OrderedDict, defaultdict

import numpy as np

from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.evaluation.pascal_voc_evaluation import voc_eval
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = [
    "IOU_THRESHOLDS_PERCENT",
    "JSON_NAME",
    "PascalVOCDetectionEvaluatorAllIoU",
]

# IoU thresholds in percent, as detectron2's VOC evaluator loops over them.
IOU_THRESHOLDS_PERCENT = tuple(range(50, 100, 5))
JSON_NAME = "voc_ap_per_iou.json"


class PascalVOCDetectionEvaluatorAllIoU(PascalVOCDetectionEvaluator):
    """detectron2's VOC box evaluator, reporting AP at each IoU threshold 0.50 ... 0.95.

    Returns ``{"bbox": {"AP", "AP50", "AP75", "AP55", ..., "AP95"}}`` (percent; "AP" is the mean
    over the ten thresholds, as detectron2's). Like the parent it gathers predictions from every
    rank and must be called from all of them; only the main process returns results and writes
    the JSON.
    """

    def __init__(self, dataset_name, output_dir=None):
        """
        Args:
            dataset_name (str): a VOC-format dataset registered with ``register_pascal_voc``
                (metadata ``dirname``, ``split``, ``year``, ``thing_classes``).
            output_dir (str or None): where ``voc_ap_per_iou.json`` goes; None writes nothing.
        """
        super().__init__(dataset_name)
        self._output_dir = output_dir

    def evaluate(self):
        all_predictions = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return None
        predictions = defaultdict(list)
        for predictions_per_rank in all_predictions:
            for cls_id, lines in predictions_per_rank.items():
                predictions[cls_id].extend(lines)
        del all_predictions

        self._logger.info(
            f"Evaluating {self._dataset_name} using the {2007 if self._is_2007 else 2012} metric "
            f"at IoU {IOU_THRESHOLDS_PERCENT[0]}..{IOU_THRESHOLDS_PERCENT[-1]}%. "
            "Note that results do not use the official Matlab API."
        )
        # per_class[name][t]: AP (percent) of class `name` at threshold index t
        per_class = OrderedDict()
        with tempfile.TemporaryDirectory(prefix="pascal_voc_eval_") as dirname:
            res_file_template = os.path.join(dirname, "{}.txt")
            for cls_id, cls_name in enumerate(self._class_names):
                with open(res_file_template.format(cls_name), "w") as f:
                    f.write("\n".join(predictions.get(cls_id, [""])))
                per_class[cls_name] = [
                    100.0
                    * float(
                        voc_eval(
                            res_file_template,
                            self._anno_file_template,
                            self._image_set_path,
                            cls_name,
                            ovthresh=thresh / 100.0,
                            use_07_metric=self._is_2007,
                        )[2]
                    )
                    for thresh in IOU_THRESHOLDS_PERCENT
                ]

        # (num_classes, num_thresholds) -> mean over classes per threshold
        table = np.array(list(per_class.values()), dtype=np.float64).reshape(
            len(per_class), len(IOU_THRESHOLDS_PERCENT)
        )
        m_ap = table.mean(axis=0)
        by_name = {f"AP{t}": float(ap) for t, ap in zip(IOU_THRESHOLDS_PERCENT, m_ap)}
        # detectron2's three first (same values as its evaluator), then the other thresholds
        bbox = OrderedDict(
            AP=float(m_ap.mean()), AP50=by_name.pop("AP50"), AP75=by_name.pop("AP75")
        )
        bbox.update(by_name)
        if self._output_dir:
            self._write_json(m_ap, per_class)
        return OrderedDict(bbox=bbox)

    def _write_json(self, m_ap, per_class):
        PathManager.mkdirs(self._output_dir)
        path = os.path.join(self._output_dir, JSON_NAME)
        record = {
            "dataset": self._dataset_name,
            "metric": "voc2007_11point" if self._is_2007 else "voc_area",
            "thresholds": [t / 100.0 for t in IOU_THRESHOLDS_PERCENT],
            "ap": [float(x) for x in m_ap],
            "per_class": {name: [float(x) for x in aps] for name, aps in per_class.items()},
        }
        with PathManager.open(path, "w") as f:
            json.dump(record, f, indent=2)
        self._logger.info(f"AP per IoU threshold written to {path}")
