"""Dataset registration: ImageNet / IN-100 layouts, image folders, the embedded demo images."""

import os

import pytest

from resim_d2.data import datasets as ds
from resim_d2.data.image_io import load_rgb_image

from detectron2.data import DatasetCatalog


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """$DETECTRON2_DATASETS with imagenet/{train,val}/<wnid>/*.JPEG: the 100 IN-100 classes with one
    image each plus two other classes with two images each, and a non-image file per class."""
    in100, others = ds.imagenet100_wnids(), ["n99999991", "n99999992"]
    for split in ("train", "val"):
        for wnid, count in [(w, 1) for w in in100] + [(w, 2) for w in others]:
            for i in range(count):
                _touch(str(tmp_path / "imagenet" / split / wnid / f"{wnid}_{i}.JPEG"))
            _touch(str(tmp_path / "imagenet" / split / wnid / "notes.txt"))
    monkeypatch.setenv(ds.DATASETS_ENV, str(tmp_path))
    return tmp_path, in100, others


def test_imagenet100_list_is_packaged():
    wnids = ds.imagenet100_wnids()
    assert len(wnids) == 100 == len(set(wnids))
    assert all(w.startswith("n") and len(w) == 9 for w in wnids)
    # the packaged copy equals the project's shared list, where that is beside the checkout
    shared = os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "data", "imagenet100.txt"
    )
    if os.path.exists(shared):
        with open(shared) as f:
            assert [line.strip() for line in f if line.strip()] == wnids


def test_imagenet_layouts(fake_root):
    root, in100, others = fake_root
    train = DatasetCatalog.get("imagenet_train")
    assert len(train) == 104
    assert all(r["file_name"].endswith(".JPEG") for r in train)
    assert [r["image_id"] for r in train] == list(range(104))
    assert {r["class_id"] for r in train} == set(in100) | set(others)
    assert len(DatasetCatalog.get("imagenet_val")) == 104
    subset = DatasetCatalog.get("imagenet100_train")
    assert len(subset) == 100 and {r["class_id"] for r in subset} == set(in100)
    assert len(DatasetCatalog.get("imagenet100_val")) == 100


def test_flat_imagenet_val_folder(tmp_path, monkeypatch):
    for i in range(3):
        _touch(str(tmp_path / "imagenet" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG"))
    monkeypatch.setenv(ds.DATASETS_ENV, str(tmp_path))
    assert len(DatasetCatalog.get("imagenet_val")) == 3


def test_imagenet100_needs_all_its_classes(tmp_path, monkeypatch):
    _touch(str(tmp_path / "imagenet" / "train" / "n01749939" / "a.JPEG"))
    monkeypatch.setenv(ds.DATASETS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lacks 99 of the requested classes"):
        DatasetCatalog.get("imagenet100_train")


def test_missing_root_names_the_path_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(ds.DATASETS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get("imagenet_train")
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "imagenet" / "train") in msg and ds.DATASETS_ENV in msg


def test_image_folder_is_recursive_and_filters_extensions(tmp_path):
    for rel in ("a.jpg", "sub/b.PNG", "sub/deeper/c.jpeg", "sub/readme.md", "d.txt"):
        _touch(str(tmp_path / "imgs" / rel))
    ds.register_image_folder("test_resim_folder", str(tmp_path / "imgs"))
    records = DatasetCatalog.get("test_resim_folder")
    names = [os.path.relpath(r["file_name"], tmp_path / "imgs") for r in records]
    assert names == ["a.jpg", "sub/b.PNG", "sub/deeper/c.jpeg"]
    ds.register_image_folder("test_resim_empty_folder", str(tmp_path / "imgs" / "sub" / "deeper2"))
    with pytest.raises(FileNotFoundError, match="deeper2"):
        DatasetCatalog.get("test_resim_empty_folder")
    os.makedirs(tmp_path / "none")
    ds.register_image_folder("test_resim_no_images", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="no image files"):
        DatasetCatalog.get("test_resim_no_images")


def test_demo_images_need_no_download_and_splits_are_disjoint():
    train = DatasetCatalog.get("resim_demo_images")
    val = DatasetCatalog.get("resim_demo_images_val")
    assert len(train) >= 10 and len(val) >= 3
    train_files = {r["file_name"] for r in train}
    val_files = {r["file_name"] for r in val}
    assert not train_files & val_files
    for r in train + val:
        image = load_rgb_image(r["file_name"])
        assert image.mode == "RGB" and min(image.size) >= 100
