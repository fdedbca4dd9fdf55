"""Both pre-training backends count every skipped file exactly once and give up by one rule.

A folder dataset on disk (good JPEGs and PNGs, three truncated JPEGs, an empty file, a text file
named like an image, a JPEG whose scan data is noise) goes through the real loaders: the CPU
backend (TwoViewMapper in the stream loader) and the GPU view backend on the CPU device (worker
decoding, and the device decoder's route). The reference is the documented record order, worked
out here from NumPy alone: position ``p`` reads record ``perm_e[p mod N]`` (``perm_e`` from
``(seed, 0, e)``); a record the reader cannot use is replaced by ``rng(seed, 1, p).integers(N)``,
drawn until one can. On the device route the workers pass the noisy JPEG on (its header and end
marker are fine); the device fails to decode it and replaces it by the next image of its batch.
"""

import os

import numpy as np
import pytest
from helpers.images import gradient_image, jpeg_bytes
from helpers.resim_model import tiny_resim_cfg
from PIL import Image

from resim_d2.data import register_image_folder
from resim_d2.data.build import build_pretrain_train_loader
from resim_d2.data.gpu_loader import build_gpu_pretrain_loader
from resim_d2.data.skips import DatasetUnreadableError

from detectron2.data import DatasetCatalog

S = 64
SEED = 7
BATCH = 4

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _write_folder(root, good=True):
    """The files of the dataset; returns the base names of those that cannot be read."""
    os.makedirs(root, exist_ok=True)
    whole = jpeg_bytes(gradient_image(90, 120))
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    bad = {
        "cut_a.jpg": whole[: len(whole) // 2],
        "cut_b.jpg": whole[: len(whole) // 3],
        "cut_c.jpeg": whole[:600],
        "empty.jpg": b"",
        "notes.png": b"a text file, not an image\n",
        "noise_scan.jpg": whole[:700] + noise + b"\xff\xd9",
    }
    for name, data in bad.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    if good:
        for i in range(4):
            Image.fromarray(gradient_image(70 + 10 * i, 96)).save(
                os.path.join(root, f"good{i}.jpg"), quality=90
            )
        for i in range(2):
            Image.fromarray(gradient_image(80, 64 + 8 * i)).save(os.path.join(root, f"good{i}.png"))
    return set(bad)


def _visited(num_records, is_bad, num_positions, seed=SEED, stop_after=None):
    """The records the stream reads for positions 0 .. num_positions - 1, in order."""
    out = []
    for p in range(num_positions):
        n = num_records
        idx = int(np.random.default_rng([seed, 0, p // n]).permutation(n)[p % n])
        rng = np.random.default_rng([seed, 1, p])
        out.append(idx)
        while is_bad(idx) and (stop_after is None or len(out) < stop_after):
            idx = int(rng.integers(n))
            out.append(idx)
        if stop_after is not None and len(out) >= stop_after:
            return out
    return out


def _cfg(name, backend, decode="worker"):
    cfg = tiny_resim_cfg("fpn")
    cfg.RESIM.VIEWS.SIZE = S
    cfg.RESIM.VIEWS.BACKEND = backend
    cfg.RESIM.GPU_VIEWS.DECODE = decode
    cfg.RESIM.GPU_VIEWS.PREFETCH = 0
    cfg.DATASETS.TRAIN = (name,)
    cfg.SOLVER.IMS_PER_BATCH = BATCH
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = SEED
    return cfg


def _loader(cfg):
    if cfg.RESIM.VIEWS.BACKEND == "gpu":
        return build_gpu_pretrain_loader(cfg, device="cpu")
    return build_pretrain_train_loader(cfg)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("skip_count"))
    bad = _write_folder(os.path.join(root, "mixed"))
    _write_folder(os.path.join(root, "all_bad"), good=False)
    noisy = os.path.join(root, "all_noise_scan")
    os.makedirs(noisy)
    data = open(os.path.join(root, "mixed", "noise_scan.jpg"), "rb").read()
    for i in range(3):
        with open(os.path.join(noisy, f"noise{i}.jpg"), "wb") as f:
            f.write(data)
    names = {
        "mixed": "test_skip_count_mixed",
        "all_bad": "test_skip_count_all_bad",
        "all_noise_scan": "test_skip_count_all_noise_scan",
    }
    for sub, name in names.items():
        if name not in DatasetCatalog.list():
            register_image_folder(name, os.path.join(root, sub))
    yield names, bad
    for name in names.values():
        DatasetCatalog.remove(name)


@pytest.mark.parametrize(
    "backend,decode", [("cpu", "worker"), ("gpu", "worker"), ("gpu", "device")]
)
def test_every_bad_file_visited_is_counted_once(folder, backend, decode):
    names, bad = folder
    records = DatasetCatalog.get(names["mixed"])
    base = [os.path.basename(r["file_name"]) for r in records]
    good = {f"good{i}.jpg" for i in range(4)} | {"good0.png", "good1.png"}
    assert sorted(base) == sorted(bad | good)
    # the files the workers (or the CPU path's mapper) refuse, refilled by the stream
    refused = bad - {"noise_scan.jpg"} if decode == "device" else bad
    iterations = -(-len(records) // BATCH) + 1  # every record at least once, then some refills
    visited = _visited(len(records), lambda i: base[i] in refused, iterations * BATCH)
    expected = [records[i]["file_name"] for i in visited if base[i] in bad]
    assert {os.path.basename(n) for n in expected} == bad  # the run visits every bad file
    # the samples: the records read that could be used, in the stream's order; on the device
    # route the noisy JPEG's place goes to the next usable image of its batch
    samples = [i for i in visited if base[i] not in refused]
    for b in range(0, len(samples), BATCH):
        batch = samples[b : b + BATCH]
        ok = [k for k, i in enumerate(batch) if base[i] not in bad]
        for k, i in enumerate(batch):
            if base[i] in bad:
                samples[b + k] = batch[min((g for g in ok if g > k), default=ok[0])]

    loader = _loader(_cfg(names["mixed"], backend, decode))
    loader.log_locally = False
    used, it = [], iter(loader)
    for _ in range(iterations):
        used += [d["file_name"] for d in next(it)]
    count, skipped = loader.take()  # what the trainer's SkippedFilesHook logs
    assert count == len(expected)
    assert sorted(name for name, _ in skipped) == sorted(expected)
    assert all(why for _, why in skipped)  # each with its reason
    assert used == [records[i]["file_name"] for i in samples]


@pytest.mark.parametrize("limit", [7, 100])
def test_give_up_rule_and_message_are_the_same_on_both_backends(folder, limit):
    names, _ = folder
    records = DatasetCatalog.get(names["all_bad"])
    *_, last = _visited(len(records), lambda i: True, 1, stop_after=limit)
    messages = []
    for backend in ("cpu", "gpu"):
        cfg = _cfg(names["all_bad"], backend)
        cfg.RESIM.VIEWS.MAX_CONSECUTIVE_SKIPS = limit
        with pytest.raises(DatasetUnreadableError) as e:
            next(iter(_loader(cfg)))
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(
        f"{limit} records in a row could not be used (the last: {records[last]['file_name']}: "
    )
    assert "DATASETS.TRAIN" in messages[0] and "$DETECTRON2_DATASETS" in messages[0]


def test_device_route_gives_up_by_the_same_rule(folder):
    """Files only the device's decoder refuses: whole batches are dropped, each file counted,
    until the limit of files in a row; the message names the last, as on the other routes."""
    names, _ = folder
    records = DatasetCatalog.get(names["all_noise_scan"])
    limit = 7  # positions 0..6: two dropped batches of 4 would be 8
    last = _visited(len(records), lambda i: False, limit)[-1]
    cfg = _cfg(names["all_noise_scan"], "gpu", decode="device")
    cfg.RESIM.VIEWS.MAX_CONSECUTIVE_SKIPS = limit
    with pytest.raises(DatasetUnreadableError) as e:
        next(iter(_loader(cfg)))
    message = str(e.value)
    assert message.startswith(
        f"{limit} records in a row could not be used (the last: {records[last]['file_name']}: "
    )
    assert message.endswith("check DATASETS.TRAIN and its root ($DETECTRON2_DATASETS)")
