"""Skipped files reach the run's record: each with its reason, counted once, as a running total;
fine-tuning images that are missing are reported before training starts."""

import logging
import os

import numpy as np
import pytest
from helpers.images import BAD, Spy, image_folder
from helpers.train_net_runner import tiny_demo_cfg

from resim_d2 import add_resim_config, get_config_file
from resim_d2.data.build import build_finetune_train_loader
from resim_d2.data.gpu_loader import RawViewReader
from resim_d2.data.stream import StreamDataset
from resim_d2.data.two_view_mapper import TwoViewMapper
from resim_d2.data.view_params import ViewParamSampler
from resim_d2.engine import Trainer

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog


def test_stream_counts_each_skip_once_with_its_file_and_reason(tmp_path, caplog):
    records = image_folder(str(tmp_path))
    cfg = tiny_demo_cfg()
    mapper = TwoViewMapper(cfg, is_train=True)
    mapper.log_skips = False  # as the training loaders set it: the batches carry the files
    spy = Spy(mapper)
    ds = StreamDataset(records, spy, seed=3)
    with caplog.at_level(logging.WARNING):
        samples = [ds[p] for p in range(24)]
    assert "skipping" not in caplog.text  # reported once, by whoever consumes the batches
    assert sum(s["num_skipped"] for s in samples) == len(spy.rejected) > 0  # once, not twice
    reported = [name for s in samples for name, _ in s["skipped"]]
    assert sorted(reported) == sorted(spy.rejected)
    assert {os.path.basename(n) for n in reported} <= set(BAD)
    for _, why in (r for s in samples for r in s["skipped"]):
        assert "not a readable image" in why or "cannot decode" in why  # what is wrong with it


def test_gpu_path_reader_reports_each_unreadable_file_once(tmp_path):
    records = image_folder(str(tmp_path))
    reader = RawViewReader(ViewParamSampler.from_config(tiny_demo_cfg()))
    reader.log_skips = False
    rng = np.random.default_rng(0)
    by_name = {os.path.basename(r["file_name"]): r for r in records}
    for name in BAD:
        assert reader(by_name[name], rng) is None
    assert reader({"file_name": str(tmp_path / "gone.jpg")}, rng) is None  # missing: one line
    out = reader(by_name["good1.png"], rng)
    assert out["num_skipped"] == len(BAD) + 1
    assert [os.path.basename(n) for n, _ in out["skipped"]] == [*BAD, "gone.jpg"]
    assert reader(by_name["good2.png"], rng)["num_skipped"] == 0


@pytest.fixture
def folder_dataset(tmp_path):
    records = image_folder(str(tmp_path / "images"))
    name = f"test_skip_record_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: records)
    yield name, records
    DatasetCatalog.remove(name)


def test_trainer_logs_every_skipped_file_and_keeps_a_running_total(
    tmp_path, folder_dataset, caplog, one_thread
):
    name, records = folder_dataset
    cfg = tiny_demo_cfg(
        "DATASETS.TRAIN", (name,), "SOLVER.MAX_ITER", 4, "OUTPUT_DIR", str(tmp_path)
    )
    # the reference: the stream's draws, replayed with a spy on the mapper (4 iterations x 4)
    spy = Spy(TwoViewMapper(cfg, is_train=True))
    per_iter = []
    ds = StreamDataset(records, spy, seed=cfg.SEED)
    for it in range(4):
        before = len(spy.rejected)
        for p in range(4 * it, 4 * it + 4):
            ds[p]
        per_iter.append(len(spy.rejected) - before)
    assert sum(per_iter) > per_iter[-1]  # a last-iteration count would differ from the total
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    with caplog.at_level(logging.WARNING, logger="resim_d2"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert sorted(line.split(" ")[1].rstrip(":") for line in lines) == sorted(spy.rejected)
    assert all(":" in line and len(line.split(": ", 1)[1]) > 5 for line in lines)  # a reason
    history = trainer.storage.history("data/skipped_images").values()
    assert [v for v, _ in history] == list(np.cumsum(per_iter))


# ---------------------------------------------------------------------------------- fine-tuning
@pytest.fixture
def voc_with_a_missing_image(tmp_path):
    from resim_d2.utils.synthetic_detection import CLASS_NAMES, write_voc

    from detectron2.data.datasets import register_pascal_voc

    root = write_voc(str(tmp_path / "voc"), {"trainval": 4}, seed=7)
    gone = os.path.join(root, "JPEGImages", "trainval_00002.jpg")
    os.remove(gone)
    name = f"test_missing_voc_{tmp_path.name}"
    register_pascal_voc(name, root, "trainval", 2007, CLASS_NAMES)
    yield name, gone
    DatasetCatalog.remove(name)


def test_finetune_loader_reports_missing_images_before_training(voc_with_a_missing_image, caplog):
    name, gone = voc_with_a_missing_image
    cfg = add_resim_config(get_cfg())
    cfg.merge_from_file(get_config_file("finetune/demo_synthetic_voc_R18_C4.yaml"))
    cfg.DATASETS.TRAIN = (name,)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    with caplog.at_level(logging.WARNING, logger="resim_d2"):
        with pytest.raises(FileNotFoundError, match="1 of the 4 images .* are missing") as e:
            Trainer.build_train_loader(cfg)  # the trainer's own dispatch
    assert gone in caplog.text and "RESIM.DATA.MISSING_IMAGES" in str(e.value)
    cfg.RESIM.DATA.MISSING_IMAGES = "skip"
    loader = build_finetune_train_loader(cfg)
    batches = iter(loader)  # one iterator: detectron2's grouping keeps state between them
    seen = {d["file_name"] for _ in range(4) for d in next(batches)}
    assert gone not in seen and len(seen) >= 2
