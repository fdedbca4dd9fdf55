"""Shared fixtures: small synthetic datasets in the real VOC and COCO formats, registered once;
the scripts under tools/ as modules."""

import importlib.util
import os

import pytest
import torch

import resim_d2  # noqa: F401  (applies detectron2 compat before any detectron2 submodule import)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny networks and many small ops: on a loaded 2-core
    machine two threads contend and run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def load_tool():
    """``load_tool("convert")``: tools/convert.py imported as a module (tools/ is no package)."""
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")

    def load(name):
        spec = importlib.util.spec_from_file_location(f"tool_{name}", f"{tools}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory):
    """(train_name, test_name, root) of a 2007-style VOC dataset with 3 classes, registered."""
    from resim_d2.utils.synthetic_detection import CLASS_NAMES, write_voc

    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_pascal_voc

    root = write_voc(str(tmp_path_factory.mktemp("voc")), {"trainval": 6, "test": 4}, seed=1)
    names = ("test_syn_voc_trainval", "test_syn_voc_test")
    for name, split in zip(names, ("trainval", "test")):
        if name not in DatasetCatalog.list():
            register_pascal_voc(name, root, split, 2007, CLASS_NAMES)
    return names[0], names[1], root


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """(name, json_path, image_dir) of a COCO-format instances dataset with polygon masks."""
    from resim_d2.utils.synthetic_detection import write_coco

    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    root = str(tmp_path_factory.mktemp("coco"))
    image_dir = os.path.join(root, "images")
    json_path = write_coco(image_dir, os.path.join(root, "instances.json"), 6, seed=2)
    name = "test_syn_coco"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, json_path, image_dir)
    return name, json_path, image_dir
