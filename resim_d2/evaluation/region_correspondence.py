"""Region correspondence: does a query window's feature find its own key window among many?

A feature-quality score usable during pre-training (``TEST.EVAL_PERIOD``) on held-out images. For
every valid query window of an image, its embedding is compared (cosine) with the embeddings of all
valid key windows of a group of ``group_size`` images (the image's own and the others'); the window
counts as matched when the nearest is its own key window. Reported as top-1 (and top-5) accuracy in
percent, per feature map, with the number of windows scored. Chance is about 1 / (windows in the
group); a model without region training can still score above chance from global context, which is
why the MoCo-v2 baseline is the reference to compare with, not zero.
"""

import itertools
from collections import OrderedDict

import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["RegionCorrespondenceEvaluator", "correspondence_accuracy"]


def correspondence_accuracy(q, k, topk=(1, 5)):
    """Top-k retrieval accuracy of each query's own key among all keys.

    Args:
        q, k: (N, D) embeddings; row i of ``k`` is the positive of row i of ``q``.
    Returns:
        {k: number of rows whose positive ranks in the top k} (ties count against the query).
    """
    sim = q.float() @ k.float().t()  # (N, N)
    pos = sim.diagonal().unsqueeze(1)
    # rank = how many keys score strictly higher, plus ties other than the positive itself
    higher = (sim > pos).sum(1) + ((sim == pos).sum(1) - 1)
    return {t: int((higher < t).sum()) for t in topk}


class RegionCorrespondenceEvaluator(DatasetEvaluator):
    """Consumes ReSim's inference outputs: ``{"region_q": {f: (B, M, D)}, "region_k": {f: (B, M,
    D)},
    "valid": {f: (B, M)}}`` (embeddings L2-normalised)."""

    def __init__(self, dataset_name, group_size=64, distributed=True):
        self._dataset_name = dataset_name
        self._group_size = group_size
        self._distributed = distributed
        self.reset()

    def reset(self):
        self._pending = {}  # feature -> list of (q (m, D), k (m, D)) per image, current group
        self._counts = {}  # feature -> [windows, top1, top5]

    def _score_group(self, feature):
        per_image = self._pending.pop(feature, [])
        if not per_image:
            return
        q = torch.cat([p[0] for p in per_image])
        k = torch.cat([p[1] for p in per_image])
        if len(q) == 0:
            return
        hits = correspondence_accuracy(q, k)
        c = self._counts.setdefault(feature, [0, 0, 0])
        c[0] += len(q)
        c[1] += hits[1]
        c[2] += hits[5]

    def process(self, inputs, outputs):
        for feature, valid in outputs["valid"].items():
            rq, rk = outputs["region_q"][feature], outputs["region_k"][feature]
            for b in range(valid.shape[0]):
                m = valid[b].to("cpu", torch.bool)
                group = self._pending.setdefault(feature, [])
                group.append((rq[b].detach().cpu()[m], rk[b].detach().cpu()[m]))
                if len(group) >= self._group_size:
                    self._score_group(feature)

    def evaluate(self):
        for feature in list(self._pending):
            self._score_group(feature)
        counts = self._counts
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(counts, dst=0)
            if not comm.is_main_process():
                return {}
            counts = {}
            for c in itertools.chain(*(g.items() for g in gathered)):
                acc = counts.setdefault(c[0], [0, 0, 0])
                for i in range(3):
                    acc[i] += c[1][i]
        results = OrderedDict()
        for feature, (n, top1, top5) in sorted(counts.items()):
            results[f"region_corr_{feature}"] = {
                "top1": 100.0 * top1 / max(n, 1),
                "top5": 100.0 * top5 / max(n, 1),
                "windows": float(n),
            }
        return results
