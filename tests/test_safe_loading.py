"""Weight files are read without running code from them, on every path that loads weights.

The hostile files are real: unpickling them with pickle.load or torch.load(weights_only=False)
creates a marker file (tests/test_compat.py shows that happening with the adaptation off). Each
path must refuse them, name the file and what it holds, and leave no marker.
"""

import collections
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from helpers.train_net_runner import DEMO_CONFIG, TINY, train_net

from resim_d2.checkpoint import (
    CheckpointReadError,
    ResumableCheckpointer,
    TransferCheckpointer,
    UnsafeCheckpointError,
    load_weights_file,
)

from detectron2.checkpoint import DetectionCheckpointer


class Marker:
    """Unpickling this object creates the file ``path`` (what a malicious file would run)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_files(folder):
    """(marker path, {kind: path}) of weight files that carry a Marker next to real weights."""
    marker = os.path.join(folder, "MARKER")
    weights = {"linear.weight": np.ones((2, 2), np.float32)}
    pkl = os.path.join(folder, "weights.pkl")
    with open(pkl, "wb") as f:
        pickle.dump({"model": weights, "__author__": "x", "payload": Marker(marker)}, f)
    pth = os.path.join(folder, "weights.pth")
    torch.save({"model": {"linear.weight": torch.ones(2, 2)}, "payload": Marker(marker)}, pth)
    return marker, {"pkl": pkl, "pth": pth}


# ----------------------------------------------------------------------------------- formats
def _py2_style_pickle(values):
    """A protocol-2 pickle as Python 2 / Detectron wrote them: byte strings as SHORT_BINSTRING,
    NumPy 1.x module names (numpy.core.multiarray). Assembled opcode by opcode."""

    def s(text):  # SHORT_BINSTRING (a Python 2 str)
        data = text if isinstance(text, bytes) else text.encode("latin1")
        return b"U" + bytes([len(data)]) + data

    out = b"\x80\x02}(" + s("__author__") + s("Detectron") + s("blobs") + b"}("
    for name, arr in values.items():
        out += s(name)
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s("b")
        out += b"\x87R(K\x01" + b"".join(b"K" + bytes([n]) for n in arr.shape)
        out += {1: b"\x85", 2: b"\x86"}[arr.ndim]
        out += b"cnumpy\ndtype\n" + s("f4") + b"K\x00K\x01\x87R"
        out += b"(K\x03" + s("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        out += b"\x89" + s(arr.astype("<f4").tobytes()) + b"tb"
    return out + b"uu."


def test_detectron2_weight_pickles_of_every_protocol_load(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = {
        "model": collections.OrderedDict(w=arr, b=np.float64(0.5)),
        "__author__": "resim_d2",
        "matching_heuristics": True,
        "misc": [1, 2.5, None, (True, "s", b"raw")],
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        out = load_weights_file(str(path))
        assert np.array_equal(out["model"]["w"], arr) and out["model"]["b"] == 0.5, protocol
        assert out["misc"] == data["misc"] and out["__author__"] == "resim_d2"
    # a Detectron (Python 2) model-zoo file: the {"blobs": ...} layout detectron2 converts
    blob = np.array([[1.5, -2.0], [0.25, 8.0]], dtype=np.float32)
    py2 = tmp_path / "R-50.pkl"
    py2.write_bytes(_py2_style_pickle({"conv1_w": blob, "fc_b": np.array([3.0, 4.0])}))
    assert pickle.loads(py2.read_bytes(), encoding="latin1")["blobs"]["fc_b"][1] == 4.0
    out = load_weights_file(str(py2))
    assert np.array_equal(out["blobs"]["conv1_w"], blob)
    loaded = DetectionCheckpointer(torch.nn.Linear(2, 2))._load_file(str(py2))
    assert loaded["__author__"] == "Caffe2" and np.array_equal(loaded["model"]["conv1_w"], blob)


def test_refusals_name_the_file_and_what_it_holds(tmp_path):
    marker, files = hostile_files(str(tmp_path))
    for path in files.values():
        with pytest.raises(UnsafeCheckpointError) as e:
            load_weights_file(path)
        assert path in str(e.value) and "io.open" in str(e.value)
        assert "weights_only=False" not in str(e.value)
    objects = tmp_path / "objects.pkl"
    objects.write_bytes(pickle.dumps({"model": {"w": np.array([1, "a"], dtype=object)}}))
    with pytest.raises(UnsafeCheckpointError, match="Python objects"):
        load_weights_file(str(objects))
    assert not os.path.exists(marker)


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("notes.pth", b"this is a text file\n", "not a zip archive"),
        ("empty.pth", b"", "an empty file"),
        ("random.pth", struct.pack("<64d", *range(64)), "not a"),
        ("notes.pkl", b"this is a text file\n", "not a readable pickle"),
    ],
)
def test_files_that_are_no_checkpoint_name_the_file(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointReadError) as e:
        load_weights_file(str(path))
    assert str(path) in str(e.value) and says in str(e.value)
    assert not isinstance(e.value, UnsafeCheckpointError)


def test_truncated_torch_file_names_the_file(tmp_path):
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(100)}}, buf)
    path = tmp_path / "model_0000009.pth"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CheckpointReadError, match="model_0000009.pth: .*truncated or damaged"):
        load_weights_file(str(path))


# ----------------------------------------------------------------------------------- paths
def test_every_python_loading_path_refuses_hostile_files(tmp_path, load_tool):
    marker, files = hostile_files(str(tmp_path))
    model = torch.nn.Sequential(collections.OrderedDict(linear=torch.nn.Linear(2, 2)))
    convert = load_tool("convert")
    for kind, path in files.items():
        loaders = {
            # detectron2's own class: MODEL.WEIGHTS anywhere, tools/demo.py's evaluation
            "DetectionCheckpointer": lambda p: DetectionCheckpointer(model).load(p),
            "TransferCheckpointer": lambda p: TransferCheckpointer(model).load(p),
            "ResumableCheckpointer": lambda p: ResumableCheckpointer(model).load(p),
            "tools/convert.py": lambda p: convert.main([p, str(tmp_path / "out.pth")]),
        }
        for where, load in loaders.items():
            with pytest.raises(UnsafeCheckpointError, match="refused to load") as e:
                load(path)
            assert path in str(e.value), (kind, where)
    # --resume with a hostile newest checkpoint skips it and continues from the previous one
    run = tmp_path / "run"
    run.mkdir()
    good = ResumableCheckpointer(model, str(run))
    good.save("model_0000001", iteration=1)
    os.replace(files["pth"], run / "model_0000003.pth")
    good.tag_last_checkpoint("model_0000003.pth")
    assert good.resume_or_load("", resume=True)["iteration"] == 1
    assert not os.path.exists(marker)


def test_train_net_refuses_hostile_weights(tmp_path):
    marker, files = hostile_files(str(tmp_path))
    run = train_net(*TINY, "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.WEIGHTS", files["pkl"])
    assert run.returncode != 0
    assert "UnsafeCheckpointError" in run.stderr and files["pkl"] in run.stderr, run.stderr[-3000:]
    assert "weights_only=False" not in run.stderr
    assert not os.path.exists(marker)


def test_eval_only_refuses_hostile_weights(tmp_path, load_tool):
    from detectron2.engine import default_argument_parser

    marker, files = hostile_files(str(tmp_path))
    tool = load_tool("train_net")
    out = str(tmp_path / "out")
    argv = ["--eval-only", "--config-file", DEMO_CONFIG, *TINY, "OUTPUT_DIR", out]
    args = default_argument_parser().parse_args(argv + ["MODEL.WEIGHTS", files["pth"]])
    with pytest.raises(UnsafeCheckpointError, match="weights.pth: refused to load"):
        tool.main(args)
    assert not os.path.exists(marker)
