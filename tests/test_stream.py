"""The pre-training stream: sample p depends only on (seed, p), so resume and sharding are exact."""

import itertools

import numpy as np
import pytest
import torch

from resim_d2.data.stream import StreamDataset, StreamSampler, build_stream_loader


def _mapper(record, rng):
    # stands in for TwoViewMapper: uses the generator it is given, rejects "bad" records
    if record["file_name"].startswith("bad"):
        return None
    return {"file_name": record["file_name"], "draw": float(rng.random())}


RECORDS = [{"file_name": f"img{i}"} for i in range(7)] + [{"file_name": "bad0"}]


def _batches(loader, n):
    return [[(d["file_name"], d["draw"]) for d in b] for b in itertools.islice(loader, n)]


def test_epochs_are_permutations_and_bad_records_are_replaced():
    ds = StreamDataset(RECORDS, _mapper, seed=5)
    names = [ds[p]["file_name"] for p in range(8)]
    assert "bad0" not in names
    skipped = sum(ds[p]["num_skipped"] for p in range(8))
    assert skipped >= 1  # the bad record's position was refilled
    good = {r["file_name"] for r in RECORDS[:7]}
    assert set(names) <= good and len(set(names)) >= 6  # one epoch = a permutation (+1 refill)


def test_resume_continues_the_same_stream():
    full = _batches(build_stream_loader(RECORDS, _mapper, 3, 4, 0), 6)
    resumed = _batches(build_stream_loader(RECORDS, _mapper, 3, 4, 0, start_iter=4), 2)
    assert resumed == full[4:6]
    other_seed = _batches(build_stream_loader(RECORDS, _mapper, 4, 4, 0), 6)
    assert other_seed != full


def test_workers_do_not_change_the_stream():
    a = _batches(build_stream_loader(RECORDS, _mapper, 3, 4, 0), 4)
    b = _batches(build_stream_loader(RECORDS, _mapper, 3, 4, 2), 4)
    assert a == b


def test_ranks_split_the_global_batch():
    one = list(itertools.islice(iter(StreamSampler(8, rank=0, world_size=1)), 16))
    r0 = list(itertools.islice(iter(StreamSampler(8, rank=0, world_size=2)), 8))
    r1 = list(itertools.islice(iter(StreamSampler(8, rank=1, world_size=2)), 8))
    for it in range(2):
        assert one[it * 8 : (it + 1) * 8] == r0[it * 4 : (it + 1) * 4] + r1[it * 4 : (it + 1) * 4]
    with pytest.raises(ValueError, match="IMS_PER_BATCH=6 must be divisible"):
        StreamSampler(6, rank=0, world_size=4)


def test_unreadable_dataset_raises():
    ds = StreamDataset([{"file_name": "bad1"}, {"file_name": "bad2"}], _mapper, seed=0)
    with pytest.raises(RuntimeError, match="could not be used.*bad"):
        ds[0]
    with pytest.raises(ValueError, match="empty"):
        StreamDataset([], _mapper, seed=0)


def test_real_mapper_is_reproducible_per_position():
    from resim_d2 import add_resim_config
    from resim_d2.data import TwoViewMapper

    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog

    cfg = add_resim_config(get_cfg())
    records = DatasetCatalog.get("resim_demo_images")
    ds1 = StreamDataset(records, TwoViewMapper(cfg), seed=1)
    ds2 = StreamDataset(records, TwoViewMapper(cfg), seed=1)
    for p in (0, 5, 17):
        a, b = ds1[p], ds2[p]
        assert torch.equal(a["image_q"], b["image_q"]) and torch.equal(a["image_k"], b["image_k"])
        assert np.array_equal(a["crop_q"], b["crop_q"])
