"""Each detectron2 v0.6 adaptation in resim_d2.compat: the failure it prevents, and that it works.

The "without" half runs detectron2 in a fresh interpreter with that one adaptation turned off
(RESIM_D2_NO_COMPAT=<name>) and expects the original breakage; it is skipped where the installed
library does not need the adaptation.
"""

import argparse
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch
from helpers.processes import run_without_compat

from resim_d2 import compat


def _needs(key):
    if key not in compat.APPLIED:
        pytest.skip(f"installed libraries do not need the '{key}' adaptation")


def test_pillow_linear():
    _needs("pillow_linear")
    bad = run_without_compat("pillow_linear", "import detectron2.data.transforms")
    assert bad.returncode != 0 and "LINEAR" in bad.stderr
    from PIL import Image

    from detectron2.data.transforms import ExtentTransform

    assert Image.LINEAR == Image.BILINEAR
    t = ExtentTransform(src_rect=(0, 0, 4, 4), output_size=(2, 2))
    out = t.apply_image(np.arange(16, dtype=np.uint8).reshape(4, 4))
    assert out.shape == (2, 2)


def test_numpy_aliases_scoped_to_detectron2(synthetic_voc):
    _needs("numpy_aliases")
    bad = run_without_compat(
        "numpy_aliases",
        """
        from detectron2.data.build import print_instances_class_histogram
        print_instances_class_histogram([{"annotations": [{"category_id": 0}]}], ["a"])
        """,
    )
    assert bad.returncode != 0 and "numpy" in bad.stderr and "attribute" in bad.stderr
    from detectron2.data.build import print_instances_class_histogram
    from detectron2.data.datasets.pascal_voc import load_voc_instances
    from detectron2.structures.masks import polygons_to_bitmask

    print_instances_class_histogram([{"annotations": [{"category_id": 0}]}], ["a"])
    _, _, root = synthetic_voc
    from resim_d2.utils.synthetic_detection import CLASS_NAMES

    dicts = load_voc_instances(root, "test", CLASS_NAMES)  # uses np.str
    assert len(dicts) == 4 and all(d["annotations"] for d in dicts)
    mask = polygons_to_bitmask([np.array([0, 0, 4, 0, 4, 4, 0, 4], dtype=float)], 6, 6)
    assert mask.dtype == bool and mask.sum() == 16  # pycocotools rasterises the 4x4 square
    # the global numpy module is untouched
    assert "int" not in np.__dict__ and "float" not in np.__dict__


def test_pkg_resources_shim_is_not_global():
    _needs("pkg_resources")
    bad = run_without_compat("pkg_resources", "import detectron2.model_zoo")
    assert bad.returncode != 0 and "pkg_resources" in bad.stderr
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml")
    assert os.path.isfile(path)
    assert "pkg_resources" not in sys.modules


def test_missing_compiled_ops_raise_clear_errors():
    _needs("compiled_ops")
    bad = run_without_compat("compiled_ops", "import detectron2.layers")
    assert bad.returncode != 0 and "_C" in bad.stderr
    from detectron2.layers import DeformConv, deform_conv
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    # On CPU detectron2 runs deformable conv forward through torchvision; the compiled (CUDA) path
    # and everything rotated needs detectron2._C and must say so when chosen.
    conv = DeformConv(4, 4, 3, padding=1)
    x, offset = torch.zeros(1, 4, 5, 5), torch.zeros(1, 18, 5, 5)
    assert conv(x, offset).shape == (1, 4, 5, 5)
    with pytest.raises(
        compat.MissingCompiledOpError, match="deform_conv_forward.*build detectron2"
    ):
        deform_conv._C.deform_conv_forward  # noqa: B018  (the attribute access is the test)
    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
    with pytest.raises(compat.MissingCompiledOpError, match="box_iou_rotated"):
        pairwise_iou_rotated(boxes, boxes)
    # the stand-in is not visible as detectron2._C: environment reports stay truthful
    from detectron2.utils.collect_env import collect_env_info

    assert "not built correctly" in collect_env_info()
    assert "detectron2._C" not in sys.modules


def test_coco_evaluator_default_uses_pycocotools():
    _needs("compiled_ops")
    from detectron2.evaluation import coco_evaluation
    from pycocotools.cocoeval import COCOeval

    assert coco_evaluation.COCOeval_opt is COCOeval


def test_torch_load_numpy_checkpoint(tmp_path):
    _needs("torch_load_numpy")
    path = str(tmp_path / "np.pth")
    weight = np.arange(6, dtype=np.float32).reshape(3, 2)
    torch.save({"model": {"weight": weight, "bias": np.zeros(3, np.float32)}}, path)
    code = f"""
        import torch
        from detectron2.checkpoint import DetectionCheckpointer
        DetectionCheckpointer(torch.nn.Linear(2, 3)).load({path!r})
        """
    # safe_weight_loading also reads NumPy arrays (and only them): both off shows the breakage
    bad = run_without_compat("torch_load_numpy,safe_weight_loading", code)
    assert bad.returncode != 0 and "weights_only" in bad.stderr.replace(
        "Weights only", "weights_only"
    )
    from detectron2.checkpoint import DetectionCheckpointer

    model = torch.nn.Linear(2, 3)
    DetectionCheckpointer(model).load(path)
    assert torch.equal(model.weight.detach(), torch.from_numpy(weight))
    # other objects are still refused (argparse.Namespace, as old MoCo checkpoints carry)
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.03)}, path)
    with pytest.raises(Exception, match="refused to load.*argparse.Namespace"):
        DetectionCheckpointer(torch.nn.Linear(2, 3)).load(path)


def test_apply_records_why():
    for key, why in compat.APPLIED.items():
        assert why and len(why) < 100, key


def test_map_dataset_retries_a_failed_record():
    _needs("set_sampling")
    code = """
        from detectron2.data.common import MapDataset
        ds = MapDataset([0, 1, 2], lambda x: None if x == 0 else x)
        print(ds[0])
        """
    bad = run_without_compat("set_sampling", code)
    assert bad.returncode != 0 and "TypeError" in bad.stderr
    from detectron2.data.common import MapDataset

    ds = MapDataset([0, 1, 2, 3], lambda x: None if x == 0 else x * 10)
    assert all(ds[0] in (10, 20, 30) for _ in range(5)) and ds[2] == 20


def test_jit_script_warning_silenced_only_for_the_imports_that_script(tmp_path):
    _needs("jit_script_warning")
    # torch.jit.script reads its function's source, so the user's call lives in a file
    user = tmp_path / "user_code.py"
    user.write_text(textwrap.dedent("""
            import warnings
            warnings.simplefilter("always")  # print every warning, none deduplicated
            import detectron2.modeling, fvcore.nn  # both call torch.jit.script at import
            import torch

            def f(x: torch.Tensor) -> torch.Tensor:
                return x + 1

            torch.jit.script(f)  # the user's own call still warns
            """))
    code = f"""
        import runpy
        runpy.run_path({str(user)!r})
    """
    with_fix, without = run_without_compat("", code), run_without_compat("jit_script_warning", code)
    assert with_fix.returncode == 0, with_fix.stderr
    assert with_fix.stderr.count("`torch.jit.script` is") == 1  # the user's call only
    assert without.stderr.count("`torch.jit.script` is") >= 3  # fvcore's 2 and detectron2's 2


class _Marker:
    """Unpickling this creates ``path``: what a hostile weight file would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_safe_weight_loading(tmp_path):
    # applied always: no detectron2 version reads .pkl weights without running code from them
    assert "safe_weight_loading" in compat.APPLIED
    pkl, pth = str(tmp_path / "w.pkl"), str(tmp_path / "w.pth")
    with open(pkl, "wb") as f:
        pickle.dump({"model": {}, "__author__": "x", "p": _Marker(str(tmp_path / "pkl_ran"))}, f)
    torch.save({"model": {}, "p": _Marker(str(tmp_path / "pth_ran"))}, pth)
    code = f"""
        import torch
        from detectron2.checkpoint import DetectionCheckpointer
        for path in ({pkl!r}, {pth!r}):
            try:
                DetectionCheckpointer(torch.nn.Linear(2, 3)).load(path)
            except Exception as e:
                print(type(e).__name__, e)
        """
    # torch>=2.6 defaults to weights_only=True, unless this variable (or an older torch) says no
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    with mock.patch.dict(os.environ, env):
        bad = run_without_compat("safe_weight_loading", code)
    assert (tmp_path / "pkl_ran").exists() and (tmp_path / "pth_ran").exists(), bad.stderr
    os.remove(tmp_path / "pkl_ran"), os.remove(tmp_path / "pth_ran")
    with mock.patch.dict(os.environ, env):
        good = run_without_compat("", code)
    assert good.stdout.count("UnsafeCheckpointError") == 2, good.stdout + good.stderr
    assert not (tmp_path / "pkl_ran").exists() and not (tmp_path / "pth_ran").exists()
    # pickle and torch themselves are untouched; only detectron2's/fvcore's readers are routed
    from detectron2.checkpoint import detection_checkpoint

    assert pickle.load is not detection_checkpoint.pickle.load and torch.load.__module__ == (
        "torch.serialization"
    )


def test_cpu_launch():
    _needs("cpu_launch")
    # detectron2's own worker, as spawned by launch(): it asserts CUDA before anything else
    code = """
        import importlib
        launch = importlib.import_module("detectron2.engine.launch")
        launch._distributed_worker(0, print, 2, 2, 0, "tcp://127.0.0.1:1", ())
        """
    bad = run_without_compat("cpu_launch", code)
    assert bad.returncode != 0 and "cuda is not available" in bad.stderr
    import importlib

    defaults = importlib.import_module("detectron2.engine.defaults")
    launch = importlib.import_module("detectron2.engine.launch")
    assert launch._distributed_worker is compat._gloo_distributed_worker
    # DDP of a CPU module: no device_ids (detectron2 passes [local rank], which DDP refuses);
    # tools/train_net.py --num-gpus 2 / --num-machines 2 run in tests/test_multiprocess_launch.py
    seen = {}
    with mock.patch.object(defaults, "DistributedDataParallel", lambda m, **kw: seen.update(kw)):
        with mock.patch.object(defaults.comm, "get_world_size", return_value=2):
            defaults.create_ddp_model(torch.nn.Linear(2, 2), broadcast_buffers=False)
    assert seen.get("device_ids", "unset") is None


_BUFFERS_CODE = """
import os, sys, torch, torch.distributed as dist
import resim_d2
from detectron2.engine import defaults
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
out = []
for create in (defaults.create_ddp_model.__wrapped__, defaults.create_ddp_model):
    torch.manual_seed(rank)  # as detectron2's default_setup: seed + rank
    module = torch.nn.Linear(2, 2)
    module.register_buffer("queue", torch.randn(8))  # initialised at random, as MoCo's queue
    ddp = create(module, broadcast_buffers=False)
    gathered = [torch.zeros(8) for _ in range(2)]
    dist.all_gather(gathered, ddp.module.queue)
    out.append(bool(torch.equal(gathered[0], gathered[1])))
print("SAME", out)
"""


def test_ddp_init_buffers(tmp_path):
    _needs("ddp_init_buffers")
    # two processes; each builds its module from its own seed and wraps it twice: with
    # detectron2's create_ddp_model as it is (__wrapped__) and as adapted
    script = tmp_path / "buffers.py"
    script.write_text(_BUFFERS_CODE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    # without: each process keeps its own random queue; with: process 0's everywhere
    assert all("SAME [False, True]" in o for o in outs), outs
