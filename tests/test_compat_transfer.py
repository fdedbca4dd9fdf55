"""The compat adaptations for the transfer targets (DensePose, Cityscapes scripts): the failure
each prevents, in a fresh interpreter with it turned off, and the result with it on."""

import importlib.util
import textwrap

import numpy as np
import pytest
from helpers.processes import run_without_compat

from resim_d2 import compat


def _needs(key):
    if key not in compat.APPLIED:
        pytest.skip(f"installed libraries do not need the '{key}' adaptation")


# what the Cityscapes instance evaluation does with a ground-truth image and one prediction
_CITYSCAPES_EVAL = """
import json, os
import numpy as np
from PIL import Image
import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as ev
{prelude}
os.makedirs({folder!r}); os.chdir({folder!r})
gt = np.zeros((40, 60), dtype=np.uint16); gt[:] = 7; gt[5:25, 10:30] = 26000; gt[30:, :] = 1
Image.fromarray(gt).save("a_gtFine_instanceIds.png")
Image.fromarray((gt == 26000).astype(np.uint8) * 255).save("a_pred_0.png")
open("a_pred.txt", "w").write("a_pred_0.png 26 0.9\\n")
ev.args.quiet = True; ev.args.JSONOutput = False; ev.args.colorized = False
ev.args.predictionPath = os.getcwd(); ev.args.predictionWalk = None
ev.args.gtInstancesFile = os.path.abspath("gt.json")
res = ev.evaluateImgLists(["a_pred.txt"], ["a_gtFine_instanceIds.png"], ev.args)
print("AP", res["averages"]["allAp"])
json.load(open("matches.json"))
"""


def _run_here(code, capsys):
    exec(textwrap.dedent(code), {})
    return capsys.readouterr().out


def test_cityscapes_numpy2(tmp_path, monkeypatch, capsys):
    _needs("cityscapes_numpy2")
    code = _CITYSCAPES_EVAL.format(folder=str(tmp_path / "a"), prelude="")
    bad = run_without_compat("cityscapes_numpy2", code)
    assert bad.returncode != 0
    assert "in1d" in bad.stderr or "'numpy.int64' object has no attribute '__dict__'" in bad.stderr
    if (
        "in1d" in compat.APPLIED["cityscapes_numpy2"]
        and "count_nonzero" in compat.APPLIED["cityscapes_numpy2"]
    ):  # past np.in1d (given back by hand), NumPy 2's counts break the JSON output
        prelude = "np.in1d = lambda a, b, **k: np.isin(np.ravel(a), b, **k)"
        code = _CITYSCAPES_EVAL.format(folder=str(tmp_path / "c"), prelude=prelude)
        bad = run_without_compat("cityscapes_numpy2", code)
        assert bad.returncode != 0 and "has no attribute '__dict__'" in bad.stderr, bad.stderr
    monkeypatch.chdir(tmp_path)  # (the code changes the working directory)
    out = _run_here(_CITYSCAPES_EVAL.format(folder=str(tmp_path / "b"), prelude=""), capsys)
    assert "AP 1.0" in out  # the one car predicted exactly
    # scoped: global NumPy is unchanged, the scripts see NumPy-1 behaviour
    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as ev

    assert isinstance(ev.np.count_nonzero(np.ones(3)), int)
    assert ev.np.in1d([[1, 2], [3, 4]], [2, 3]).tolist() == [False, True, True, False]
    assert not hasattr(np, "in1d") or "in1d" in np.__dict__


@pytest.mark.skipif(importlib.util.find_spec("densepose") is None, reason="no DensePose project")
def test_densepose_numpy_aliases(capsys):
    _needs("densepose_numpy_aliases")
    code = """
    import numpy as np
    from densepose.evaluation.densepose_coco_evaluation import DensePoseCocoEval
    ev = DensePoseCocoEval()
    ev.cocoDt = ev.cocoGt = None
    tps = np.array([[True, False, True]])
    print(np.cumsum(tps, axis=1).astype(dtype=__import__(
        "densepose.evaluation.densepose_coco_evaluation", fromlist=["np"]).np.float).tolist())
    """
    bad = run_without_compat("densepose_numpy_aliases", code)
    assert bad.returncode != 0 and "has no attribute 'float'" in bad.stderr
    assert "[[1.0, 1.0, 2.0]]" in _run_here(code, capsys)
    assert "int" not in np.__dict__ and "float" not in np.__dict__
