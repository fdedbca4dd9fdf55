"""Region correspondence: does a query window's feature find its own key window among many?

A feature-quality score usable during pre-training (``TEST.EVAL_PERIOD``) on held-out images. For
every valid query window of an image, its embedding is compared (cosine) with the embeddings of all
valid key windows of a group of ``group_size`` images (the image's own and the others'); the window
counts as matched when the nearest is its own key window. A held-out set with fewer images than a
group repeats images as further view pairs (``RESIM.EVAL.PAIRS_PER_IMAGE``); windows of another
pair of the same image (same ``file_name``) show the same scene and are left out of the candidates,
as a batch of distinct images would have none. Reported as top-1 (and top-5) accuracy in
percent, per feature map, with the number of windows scored. Chance is about 1 / (windows in the
group); a model without region training can still score above chance from global context, which is
why the MoCo-v2 baseline is the reference to compare with, not zero.

Two embeddings are scored when the model gives both: the raw backbone map (``region_corr_<f>``,
what transfers to detectors, comparable across models) and the region head's output
(``region_corr_head_<f>``, what the region loss trains; models without a region head have none).
"""

import itertools
from collections import OrderedDict

import numpy as np
import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = [
    "RegionCorrespondenceEvaluator",
    "correspondence_accuracy",
    "held_out_pairs",
    "paired_difference",
]


def held_out_pairs(records: list[dict], pairs_per_image: int) -> list[dict]:
    """The evaluation's view pairs: ``pairs_per_image`` copies of every record, each with its own
    ``eval_seed`` (from the file name and the pair's index, so every evaluation sees the same
    views), ordered pair index first: pair 0 of every image, then pair 1, ... Consecutive pairs
    (a correspondence group, one process's shard) therefore come from different images, as a batch
    of held-out images would; image by image, a group would hold one image's pairs only.
    """
    from ..data.two_view_mapper import stable_seed

    return [
        dict(r, eval_seed=stable_seed(r["file_name"], i))
        for i in range(pairs_per_image)
        for r in records
    ]


def correspondence_ranks(
    q: torch.Tensor, k: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """(N,) rank of each query's own key among all keys: 0 when it is the nearest.

    Args:
        q, k: (N, D) embeddings; row i of ``k`` is the positive of row i of ``q``.
        exclude: optional (N, N) bool, True where key j is not a candidate for query i (its
            diagonal must be False).
    Ties count against the query: a key scoring the same as the positive ranks above it.
    """
    sim = q.float() @ k.float().t()  # (N, N)
    pos = sim.diagonal().unsqueeze(1)
    above, tied = sim > pos, sim == pos
    if exclude is not None:
        above, tied = above & ~exclude, tied & ~exclude
    # rank = how many keys score strictly higher, plus ties other than the positive itself
    return above.sum(1) + (tied.sum(1) - 1)


def correspondence_accuracy(q, k, topk=(1, 5)):
    """Top-k retrieval accuracy of each query's own key among all keys.

    Args:
        q, k: (N, D) embeddings; row i of ``k`` is the positive of row i of ``q``.
    Returns:
        {k: number of rows whose positive ranks in the top k} (ties count against the query).
    """
    ranks = correspondence_ranks(q, k)
    return {t: int((ranks < t).sum()) for t in topk}


def paired_difference(a, b, n_boot: int = 4000, seed: int = 0, level: float = 0.95):
    """Top-1 of model ``b`` minus model ``a`` on the same view pairs, with a bootstrap interval.

    Args:
        a, b: per view pair ``(windows, top-1 hits)`` of two models, pair i of both being the same
            views and windows (e.g. ``RegionCorrespondenceEvaluator.per_pair[feature]`` of two
            single-process evaluations).
    Returns:
        (difference, low, high) in percentage points: the difference of the pooled top-1
        accuracies and the central ``level`` interval of the difference over ``n_boot``
        resamplings of whole view pairs (windows of one pair are not independent of each other).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 2)
    if a.shape != b.shape or not np.array_equal(a[:, 0], b[:, 0]):
        raise ValueError("paired_difference needs the same view pairs and windows for both models")
    n = a[:, 0]
    if n.sum() == 0:
        raise ValueError("paired_difference: no valid windows")
    diff = 100.0 * (b[:, 1].sum() - a[:, 1].sum()) / n.sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), size=(n_boot, len(n)))
    boot = 100.0 * (b[idx, 1].sum(1) - a[idx, 1].sum(1)) / np.maximum(n[idx].sum(1), 1)
    tail = 100.0 * (1.0 - level) / 2
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    return float(diff), float(low), float(high)


# (key of the scored embedding in per_pair and the results, query output, key output)
SOURCES = (("{}", "region_q", "region_k"), ("head_{}", "head_q", "head_k"))


class RegionCorrespondenceEvaluator(DatasetEvaluator):
    """Consumes ReSim's inference outputs: ``{"region_q": {f: (B, M, D)}, "region_k": {f: (B, M,
    D)}, "valid": {f: (B, M)}}`` and optionally ``"head_q"``/``"head_k"`` (embeddings
    L2-normalised). After ``evaluate``, ``per_pair`` holds this process's (windows, top-1 hits) of
    every view pair, for paired comparisons of two models on the same pairs, under ``f`` for the
    backbone map and ``"head_" + f`` for the region head's output."""

    def __init__(self, dataset_name, group_size=64, distributed=True):
        self._dataset_name = dataset_name
        self._group_size = group_size
        self._distributed = distributed
        self.reset()

    def reset(self):
        # feature -> list of (q (m, D), k (m, D), source) per view pair, current group
        self._pending = {}
        self._counts = {}  # feature -> [windows, top1, top5]
        # feature -> [(windows, top-1 hits)] per view pair, in the order processed (this process)
        self.per_pair = {}

    def _score_group(self, feature):
        per_image = self._pending.pop(feature, [])
        if not per_image:
            return
        q = torch.cat([p[0] for p in per_image])
        k = torch.cat([p[1] for p in per_image])
        # (N,) pair index and source image of every window; other pairs of one image excluded
        sizes = torch.tensor([len(p[0]) for p in per_image])
        pair = torch.arange(len(per_image)).repeat_interleave(sizes)
        source_ids = {}
        source = torch.tensor([source_ids.setdefault(p[2], len(source_ids)) for p in per_image])
        source = source.repeat_interleave(sizes)
        exclude = (source[:, None] == source[None, :]) & (pair[:, None] != pair[None, :])
        if len(q):
            ranks = correspondence_ranks(q, k, exclude)
        else:
            ranks = torch.zeros(0, dtype=torch.long)
        c = self._counts.setdefault(feature, [0, 0, 0])
        c[0] += len(q)
        c[1] += int((ranks < 1).sum())
        c[2] += int((ranks < 5).sum())
        per_pair = self.per_pair.setdefault(feature, [])
        for r in ranks.split([len(p[0]) for p in per_image]):
            per_pair.append((len(r), int((r < 1).sum())))

    def process(self, inputs, outputs):
        batch = max((v.shape[0] for v in outputs["valid"].values()), default=0)
        sources = []  # the image each pair was cut from; a pair without a file name is its own
        for b in range(batch):
            name = inputs[b].get("file_name") if b < len(inputs) else None
            sources.append(name if name is not None else object())
        for feature, valid in outputs["valid"].items():
            for name, q_key, k_key in SOURCES:
                if feature not in outputs.get(q_key, {}):
                    continue
                rq, rk = outputs[q_key][feature], outputs[k_key][feature]
                key = name.format(feature)
                group = self._pending.setdefault(key, [])
                for b in range(valid.shape[0]):
                    m = valid[b].to("cpu", torch.bool)
                    group.append((rq[b].detach().cpu()[m], rk[b].detach().cpu()[m], sources[b]))
                    if len(group) >= self._group_size:
                        self._score_group(key)
                        group = self._pending.setdefault(key, [])

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
