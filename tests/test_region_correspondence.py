"""Region-correspondence score: retrieval accuracy against hand-counted answers."""

import torch

from resim_d2.evaluation.region_correspondence import (
    RegionCorrespondenceEvaluator,
    correspondence_accuracy,
)


def test_accuracy_known_answers():
    q = torch.eye(4)
    assert correspondence_accuracy(q, q) == {1: 4, 5: 4}
    # keys rotated by one: every query's own key is the worst of four
    k = q.roll(1, dims=0)
    assert correspondence_accuracy(q, k, topk=(1, 3, 4)) == {1: 0, 3: 0, 4: 4}
    # ties count against the query: identical keys never give a top-1 hit
    same = torch.ones(3, 2) / 2**0.5
    assert correspondence_accuracy(same, same)[1] == 0


def test_evaluator_groups_and_masks():
    ev = RegionCorrespondenceEvaluator("x", group_size=2, distributed=False)
    d = 3
    emb = torch.eye(d)  # 3 distinct unit vectors
    # image 0: windows 0,1 valid; image 1: window 0 valid; matching keys -> all correct
    out = {
        "region_q": {"res4": torch.stack([emb[[0, 1]], emb[[2, 0]]])},
        "region_k": {"res4": torch.stack([emb[[0, 1]], emb[[2, 0]]])},
        "valid": {"res4": torch.tensor([[True, True], [True, False]])},
    }
    ev.process([{}, {}], out)
    # a second group whose keys are swapped between its two valid windows -> both wrong
    out2 = {
        "region_q": {"res4": torch.stack([emb[[0, 1]]])},
        "region_k": {"res4": torch.stack([emb[[1, 0]]])},
        "valid": {"res4": torch.tensor([[True, True]])},
    }
    ev.process([{}], out2)
    res = ev.evaluate()["region_corr_res4"]
    assert res["windows"] == 5
    assert res["top1"] == 100.0 * 3 / 5
