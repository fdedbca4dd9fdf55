"""Region-correspondence score: retrieval accuracy against hand-counted answers."""

import numpy as np
import pytest
import torch

from resim_d2.evaluation.region_correspondence import (
    RegionCorrespondenceEvaluator,
    correspondence_accuracy,
    correspondence_ranks,
    held_out_pairs,
    paired_difference,
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
    # per view pair, in order: (valid windows, top-1 hits)
    assert ev.per_pair["res4"] == [(2, 2), (1, 1), (2, 0)]


def test_ranks_exclude_masked_keys():
    q = torch.eye(3)
    k = torch.stack([q[0], q[0], q[2]])  # key 1 is a copy of query 0's positive
    # query 0 ties with key 1 (ties count against it); query 1 scores 0 with all three keys
    assert correspondence_ranks(q, k).tolist() == [1, 2, 0]
    exclude = torch.zeros(3, 3, dtype=torch.bool)
    exclude[0, 1] = True
    exclude[1, 2] = True
    assert correspondence_ranks(q, k, exclude).tolist() == [0, 1, 0]


def test_evaluator_leaves_out_other_pairs_of_the_same_image():
    """Two view pairs of one photograph whose windows show the same content (identical keys) do
    not compete with each other; the same content from another photograph does."""
    emb = torch.eye(3)
    out = {
        "region_q": {"res4": torch.stack([emb[[0, 1]], emb[[0, 1]], emb[[2, 2]]])},
        "region_k": {"res4": torch.stack([emb[[0, 1]], emb[[0, 1]], emb[[2, 2]]])},
        "valid": {"res4": torch.ones(3, 2, dtype=torch.bool)},
    }
    inputs = [{"file_name": "a.jpg"}, {"file_name": "a.jpg"}, {"file_name": "b.jpg"}]
    ev = RegionCorrespondenceEvaluator("x", group_size=3, distributed=False)
    ev.process(inputs, out)
    # pairs 0 and 1 (a.jpg): each window's only tie is the other pair's copy, left out -> hits;
    # pair 2 (b.jpg): its two windows tie with each other (same pair) -> misses
    assert ev.per_pair["res4"] == [(2, 2), (2, 2), (2, 0)]
    assert ev.evaluate()["region_corr_res4"]["top1"] == pytest.approx(100.0 * 4 / 6)
    # the same pairs from three different files: pairs 0 and 1 now tie with each other
    ev.reset()
    ev.process([{"file_name": f"{i}.jpg"} for i in range(3)], out)
    assert ev.per_pair["res4"] == [(2, 0), (2, 0), (2, 0)]
    # inputs without file names: every pair is its own image
    ev.reset()
    ev.process([{}, {}, {}], out)
    assert ev.per_pair["res4"] == [(2, 0), (2, 0), (2, 0)]


def test_held_out_pairs_interleave_images_with_fixed_distinct_seeds():
    records = [{"file_name": f"/data/img{i}.jpg", "image_id": i} for i in range(3)]
    pairs = held_out_pairs(records, 4)
    assert len(pairs) == 12
    # any 3 consecutive pairs hold the 3 images (a group of 3 is not one image's pairs)
    ids = [p["image_id"] for p in pairs]
    assert ids == [0, 1, 2] * 4
    seeds = [p["eval_seed"] for p in pairs]
    assert len(set(seeds)) == 12
    assert seeds == [p["eval_seed"] for p in held_out_pairs(records, 4)]
    assert "eval_seed" not in records[0]  # the dataset's own dicts are left alone


def test_paired_difference_known_answers():
    a = [(4, 1), (2, 0), (3, 3)]
    b = [(4, 2), (2, 1), (3, 3)]
    diff, low, high = paired_difference(a, b)
    assert diff == pytest.approx(100.0 * 2 / 9)
    assert low <= diff <= high
    # b one hit ahead on every pair of 5 windows: every resampling gives exactly 20 points
    a = [(5, k % 5) for k in range(40)]
    b = [(5, k % 5 + 1) for k in range(40)]
    assert paired_difference(a, b) == pytest.approx((20.0, 20.0, 20.0))
    with pytest.raises(ValueError, match="same view pairs"):
        paired_difference([(3, 1)], [(4, 1)])


def test_paired_difference_interval_matches_the_delta_method():
    # independent reference: the normal interval of a ratio of sums (delta method), which the
    # bootstrap approaches for many pairs
    rng = np.random.default_rng(1)
    n = rng.integers(1, 9, size=3000)
    a = rng.binomial(n, 0.3)
    b = np.minimum(n, a + rng.binomial(n, 0.1))
    diff, low, high = paired_difference(list(zip(n, a)), list(zip(n, b)), n_boot=4000)
    r = (b - a).sum() / n.sum()  # the difference as a fraction
    resid = (b - a) - r * n
    se = 100.0 * np.sqrt(len(n) * (resid**2).sum() / (len(n) - 1)) / n.sum()
    assert diff == pytest.approx(100.0 * r)
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.1)


def test_evaluator_scores_the_region_head_output_beside_the_backbone_map():
    """Hand-counted: the backbone windows match their keys, the head windows are swapped."""
    emb = torch.eye(4)
    out = {
        "region_q": {"res4": torch.stack([emb[[0, 1]], emb[[2, 3]]])},
        "region_k": {"res4": torch.stack([emb[[0, 1]], emb[[2, 3]]])},
        "head_q": {"res4": torch.stack([emb[[0, 1]], emb[[2, 3]]])},
        "head_k": {"res4": torch.stack([emb[[1, 0]], emb[[3, 3]]])},
        "valid": {"res4": torch.tensor([[True, True], [True, True]])},
    }
    ev = RegionCorrespondenceEvaluator("x", group_size=2, distributed=False)
    ev.process([{}, {}], out)
    res = ev.evaluate()
    assert res["region_corr_res4"]["top1"] == 100.0
    # head: pair 0 swapped (0 hits); pair 1: window 0's key ties with window 1's (a miss), window
    # 1's own key is emb[3] and ties with window 0's key emb[3] (a miss)
    assert res["region_corr_head_res4"]["top1"] == 0.0
    assert res["region_corr_head_res4"]["windows"] == 4
    assert ev.per_pair["res4"] == [(2, 2), (2, 2)]
    assert ev.per_pair["head_res4"] == [(2, 0), (2, 0)]


def test_model_inference_gives_head_embeddings_only_where_a_region_head_exists():
    from helpers.resim_model import build, make_batch, tiny_resim_cfg

    for region, head, expect in ((True, "conv", True), (True, "none", False), (False, "conv", 0)):
        cfg = tiny_resim_cfg("c4", region=region)
        cfg.RESIM.REGION.HEAD = head
        model = build(cfg).eval()
        out = model(make_batch(cfg, B=2))
        assert set(out["region_q"]) == {"res4"}
        assert set(out["head_q"]) == ({"res4"} if expect else set())
        if expect:
            hq = out["head_q"]["res4"]
            assert hq.shape == (2, out["valid"]["res4"].shape[1], cfg.RESIM.REGION.HEAD_DIM)
            valid = out["valid"]["res4"]
            assert valid.any()
            torch.testing.assert_close(hq[valid].norm(dim=-1), torch.ones(int(valid.sum())))
            # the head's output is another embedding than the raw map's
            assert not torch.allclose(
                out["head_q"]["res4"] @ out["head_k"]["res4"].transpose(1, 2),
                out["region_q"]["res4"] @ out["region_k"]["res4"].transpose(1, 2),
            )
