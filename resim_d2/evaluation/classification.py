"""Top-k classification accuracy for the linear probe, as a detectron2 DatasetEvaluator."""

import logging
from collections import OrderedDict

import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["ClassificationEvaluator", "topk_correct"]

logger = logging.getLogger(__name__)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> list[int]:
    """Number of rows whose label is among the k highest logits, for each k.

    Args:
        logits: (N, K) scores; labels: (N,) int64 in [0, K). A k above K counts as K.
    Returns:
        list of ints, one per k.
    """
    if logits.numel() == 0:
        return [0 for _ in topk]
    kmax = min(max(topk), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax), best first
    hit = top == labels.view(-1, 1)
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in topk]


class ClassificationEvaluator(DatasetEvaluator):
    """Top-1 / top-5 accuracy (percent) over a dataset, summed over all processes.

    ``process`` takes the mapper's dicts (``"label"``) and the model's outputs (``"logits"`` of
    shape (K,)); ``evaluate`` gathers the counts with detectron2's ``comm.gather`` (call it on every
    rank) and returns ``{"classification": {"top1", "top5", "num_images"}}`` on the main process,
    None elsewhere. Detectron2's InferenceSampler shards the images without repeats, so the sums
    are exact.
    """

    def __init__(self, dataset_name=None, topk=(1, 5)):
        self._dataset_name = dataset_name
        self._topk = tuple(topk)
        self.reset()

    def reset(self):
        self._num = 0
        self._correct = [0 for _ in self._topk]

    def process(self, inputs, outputs):
        if not inputs:
            return
        logits = torch.stack([o["logits"].detach().float().cpu() for o in outputs])
        labels = torch.as_tensor([int(x["label"]) for x in inputs], dtype=torch.int64)
        for i, c in enumerate(topk_correct(logits, labels, self._topk)):
            self._correct[i] += c
        self._num += len(inputs)

    def evaluate(self):
        parts = comm.gather((self._num, self._correct), dst=0)
        if not comm.is_main_process():
            return None
        num = sum(n for n, _ in parts)
        correct = [sum(c[i] for _, c in parts) for i in range(len(self._topk))]
        if num == 0:
            logger.warning(f"ClassificationEvaluator on {self._dataset_name}: no images")
            return OrderedDict(classification={})
        res = OrderedDict((f"top{k}", 100.0 * c / num) for k, c in zip(self._topk, correct))
        res["num_images"] = num
        return OrderedDict(classification=res)
