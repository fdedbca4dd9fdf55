"""Behaviour pinned before a refactoring: fixed-seed training steps and checkpoint conversion.

Each case recomputes, from fixed seeds, numbers recorded in ``tests/data/regression_pinned.json``
and compares them:

* training: ReSim-C4 and ReSim-FPN x MoCo and SimSiam (tiny ResNet-18 encoders, 64-px views of PNG
  files on disk through :class:`TwoViewMapper`, the CPU view backend), two steps with a plain SGD
  step (momentum, weight decay) between them, so the momentum encoder and MoCo's queue move before
  the second forward. Per step: every loss, every metric of ``model.last_metrics``, and a gradient
  fingerprint per top-level submodule (the gradient's norm, and the sum of gradient x a fixed
  random probe drawn from the parameter's name, which tells a changed direction apart from a
  changed norm). One step of ReSim-FPN x MoCo through the GPU view path run on the CPU device.
* conversion: :func:`resim_d2.checkpoint.convert_checkpoint` of tiny checkpoints made here (our
  ReSim-FPN layout to an FPN target with the FPN transferred, a MoCo-layout ResNet-18 to a C4
  target): converted names with their source keys, shapes, two checksums per tensor, the dropped
  keys with reasons, the metadata, and :func:`format_report`'s text (for the FPN target with a
  reconciliation against a built detector).

The recorded numbers are not derived independently: they are what the code computed when they were
recorded, and this test only says that behaviour has not changed since. Re-record them only on a
deliberate change of behaviour (and say so in the commit)::

    RESIM_RECORD_REGRESSION=1 python -m pytest tests/test_regression_pinned.py -p no:cacheprovider

Tolerances (the constants below): a refactoring may legitimately reorder float32 sums (windows
stacked differently, a fused head, another thread count or CPU). The first step is insensitive to
that (measured: 2 threads instead of 1 move step-1 values by at most 3e-5 relative), but the second
step sits after an SGD step on a 4-image batch whose batch norms are ill-conditioned, and the same
thread change moves its losses and metrics by up to 1e-3 relative (5e-6 absolute), its gradient
norms by up to 4e-4 and its gradient x probe sums by up to 0.5% of the gradient norm (a sum of
~1e6 products with random signs: the norm is its natural scale). The tolerances are 2-10x those:
losses and metrics ``rtol 1e-3 + atol 1e-4``, gradient norms ``rtol 3e-3``, probe sums ``1e-2 x``
the norm. A changed loss weight, temperature, window or update order moves losses by percents.
Conversions copy tensors, so their float64 checksums compare at ``rtol 1e-9``; strings, names,
shapes and counts compare exactly.
"""

import hashlib
import json
import os
import zlib

import pytest
import torch
from helpers.resim_model import build, tiny_cfg
from PIL import Image

from resim_d2.checkpoint import convert_checkpoint, format_report, reconcile
from resim_d2.data.gpu_loader import build_gpu_pretrain_loader
from resim_d2.data.two_view_mapper import TwoViewMapper

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "regression_pinned.json")
RECORD = os.environ.get("RESIM_RECORD_REGRESSION") == "1"
VALUE_RTOL, VALUE_ATOL = 1e-3, 1e-4  # losses and metrics
NORM_RTOL = 3e-3  # gradient norms
PROBE_TOL = 1e-2  # gradient x probe, as a fraction of the gradient norm (its natural scale)
EXACT_RTOL = 1e-9  # float64 checksums of tensors the conversion copies
S = 64  # view side (tiny_cfg's windows fit 64-px views)
CASES = [("c4", "moco"), ("c4", "simsiam"), ("fpn", "moco"), ("fpn", "simsiam")]
_recorded = {}  # what this run computed, written at module teardown when recording


def _load():
    if RECORD or not os.path.exists(DATA):
        return {}
    with open(DATA) as f:
        return json.load(f)


PINNED = _load()


@pytest.fixture(scope="module", autouse=True)
def _write_when_recording():
    yield
    if RECORD and _recorded:
        os.makedirs(os.path.dirname(DATA), exist_ok=True)
        old = {}
        if os.path.exists(DATA):
            with open(DATA) as f:
                old = json.load(f)
        old.update(_recorded)  # a partial run (-k) re-records only its own cases
        with open(DATA, "w") as f:
            json.dump(old, f, indent=0, sort_keys=True)
            f.write("\n")


def check(name, value, compare=None):
    """Record ``value`` under ``name`` or compare it with the recorded one (``compare(pinned,
    value, name)``, by default the tolerances of :func:`_compare`)."""
    if RECORD:
        _recorded[name] = value
        return
    if name not in PINNED:
        pytest.fail(f"{DATA} has no {name!r}: record it with RESIM_RECORD_REGRESSION=1")
    (compare or _compare)(PINNED[name], value, name)


def check_steps(name, steps):
    """Record training ``steps`` under ``name`` or compare them with the recorded ones."""
    check(name, steps, compare_steps)


def close(actual, expected, rtol, atol, where):
    assert abs(actual - expected) <= atol + rtol * abs(
        expected
    ), f"{where}: {actual!r} differs from the recorded {expected!r} (rtol {rtol}, atol {atol})"


def _compare(expected, actual, where, rtol=EXACT_RTOL, atol=0.0):
    """Nested dicts/lists: same keys and lengths, equal strings and ints, close floats."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        assert sorted(actual) == sorted(expected), f"{where}: keys differ"
        for k in expected:
            _compare(expected[k], actual[k], f"{where}/{k}", rtol, atol)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: length"
        for i, (e, a) in enumerate(zip(expected, actual)):
            _compare(e, a, f"{where}[{i}]", rtol, atol)
    elif isinstance(expected, float) or isinstance(actual, float):
        close(actual, expected, rtol, atol, where)
    else:
        assert actual == expected, f"{where}: {actual!r} differs from the recorded {expected!r}"


def compare_steps(expected, actual, where):
    """Training steps at the float32 tolerances of the module docstring."""
    assert len(actual) == len(expected), f"{where}: number of steps"
    for i, (e, a) in enumerate(zip(expected, actual)):
        at = f"{where}[step {i}]"
        _compare(e["losses"], a["losses"], f"{at}/losses", VALUE_RTOL, VALUE_ATOL)
        _compare(e["metrics"], a["metrics"], f"{at}/metrics", VALUE_RTOL, VALUE_ATOL)
        assert sorted(a["grads"]) == sorted(e["grads"]), f"{at}/grads: submodules differ"
        for top, (norm, dot) in e["grads"].items():
            close(a["grads"][top][0], norm, NORM_RTOL, 0.0, f"{at}/grads/{top}/norm")
            close(a["grads"][top][1], dot, 0.0, PROBE_TOL * norm, f"{at}/grads/{top}/probe")


# ----------------------------------------------------------------------------------------- data
def _smooth_rgb(h, w, seed):
    """A smooth random colour image (uint8 HxWx3): upsampled noise, so views have structure."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 6, generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return (img[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Four PNG files (lossless, so decoding is exact on every install) of different sizes."""
    root = tmp_path_factory.mktemp("pinned")
    out = []
    for i, (h, w) in enumerate([(96, 128), (120, 90), (100, 100), (80, 140)]):
        path = str(root / f"{i}.png")
        Image.fromarray(_smooth_rgb(h, w, 100 + i)).save(path)
        out.append({"file_name": path, "image_id": i})
    return out


def _cfg(arch, framework):
    cfg = tiny_cfg(arch, framework)
    cfg.RESIM.VIEWS.SIZE = S
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def cpu_batch(cfg, records, step):
    mapper = TwoViewMapper(cfg, is_train=True)
    return [mapper(r, rng=1000 * step + i) for i, r in enumerate(records)]


# ------------------------------------------------------------------------------------- training
def _probe(name, shape):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g, dtype=torch.float64)


def grad_fingerprint(model):
    """{top-level submodule: [gradient norm, sum of gradient x probe]} over its parameters.

    Submodules are the first component of the parameter names (``backbone``, ``global_head``,
    ...), which a refactoring keeps so that checkpoints load unchanged."""
    acc = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().double()
        sq_dot = acc.setdefault(name.split(".")[0], [0.0, 0.0])
        sq_dot[0] += float((g * g).sum())
        sq_dot[1] += float((g * _probe(name, g.shape)).sum())
    return {top: [sq**0.5, dot] for top, (sq, dot) in acc.items()}


def train_steps(model, batches):
    """One forward/backward per batch, a plain SGD step after each but the last."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    steps = []
    with EventStorage():
        for i, batch in enumerate(batches):
            opt.zero_grad(set_to_none=True)
            losses = model(batch)
            sum(losses.values()).backward()
            steps.append(
                {
                    "losses": {k: float(v.detach()) for k, v in losses.items()},
                    "metrics": {k: float(v) for k, v in model.last_metrics.items()},
                    "grads": grad_fingerprint(model),
                }
            )
            if i + 1 < len(batches):
                opt.step()
    return steps


@pytest.mark.parametrize("arch,framework", CASES)
def test_two_training_steps_cpu_views(arch, framework, records):
    cfg = _cfg(arch, framework)
    model = build(cfg, seed=7)
    batches = [cpu_batch(cfg, records, step) for step in range(2)]
    check_steps(f"train/{arch}_{framework}/cpu_views", train_steps(model, batches))


def test_one_training_step_gpu_views_on_cpu(records):
    cfg = _cfg("fpn", "moco")
    cfg.RESIM.VIEWS.BACKEND = "gpu"
    cfg.RESIM.GPU_VIEWS.DECODE = "worker"
    cfg.RESIM.GPU_VIEWS.PREFETCH = 0
    model = build(cfg, seed=7)
    loader = build_gpu_pretrain_loader(cfg, dataset=records, seed=5, device="cpu")
    batch = next(iter(loader))
    check_steps("train/fpn_moco/gpu_views", train_steps(model, [batch]))


# ----------------------------------------------------------------------------------- conversion
def _digest(items):
    """A short digest of a list of strings (exact; 16 hex digits keep the JSON file small)."""
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def _conversion_record(conv, detector_state=None):
    """Names, shapes and checksums of a conversion, grouped by destination module (e.g.
    ``backbone.res2``): per group the tensor count, a digest of its ``source -> name: shape``
    lines, the sum of its values, and the sum of its values x a probe drawn from each tensor's
    name (which catches two tensors swapped). Dropped keys: per reason, the count and a digest."""
    rec = None if detector_state is None else reconcile(conv, detector_state)
    src_of = {dst: src for src, dst in conv.moved}
    groups = {}
    for name, t in conv.model.items():
        group = ".".join(name.split(".")[:2])
        x = t.detach().double()
        line = f"{src_of[name]} -> {name}: {list(t.shape)}"
        g = groups.setdefault(group, {"lines": [], "sum": 0.0, "probe": 0.0})
        g["lines"].append(line)
        g["sum"] += float(x.sum())
        g["probe"] += float((x * _probe(name, x.shape)).sum())
    dropped = {}
    for src, reason in conv.dropped:
        dropped.setdefault(reason, []).append(src)
    return {
        "layout": conv.layout,
        "moved": len(conv.moved),
        "tensors": {
            k: [len(g["lines"]), _digest(g["lines"]), g["sum"], g["probe"]]
            for k, g in groups.items()
        },
        "dropped": {r: [len(keys), _digest(keys)] for r, keys in dropped.items()},
        "metadata": json.loads(json.dumps(conv.metadata())),
        "report": format_report(conv, rec).splitlines(),
    }


def _fpn_detector_state():
    """A tiny ResNet-18 Faster R-CNN FPN state dict: what the conversion is fitted to."""
    from resim_d2 import add_resim_config

    cfg = get_cfg()
    add_resim_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    rn = cfg.MODEL.RESNETS
    rn.DEPTH, rn.RES2_OUT_CHANNELS, rn.STRIDE_IN_1X1 = 18, 64, False
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    rn.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    torch.manual_seed(0)
    return build_model(cfg).state_dict()


def test_conversion_of_a_resim_fpn_checkpoint():
    model = build(tiny_cfg("fpn", "moco"), seed=11)
    obj = {"model": model.state_dict(), "iteration": 2}
    conv = convert_checkpoint(obj, target="fpn", transfer_fpn=True, fpn_levels=("p3", "p4"))
    check("convert/resim_fpn_to_fpn", _conversion_record(conv, _fpn_detector_state()))


def test_conversion_of_a_moco_checkpoint():
    import torchvision

    torch.manual_seed(12)
    net = torchvision.models.resnet18(num_classes=16)
    sd = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    sd["module.queue"] = torch.randn(16, 8)
    sd.update({f"module.encoder_k.{k}": v for k, v in list(net.state_dict().items())[:3]})
    obj = {"state_dict": sd, "epoch": 200, "arch": "resnet18"}
    conv = convert_checkpoint(obj, target="c4", source="moco_r18.pth.tar")
    # (no reconciliation: detectron2's C4 ROI heads build res5 of bottleneck blocks at any depth)
    check("convert/moco_to_c4", _conversion_record(conv))


def test_the_comparisons_can_fail():
    """Values just outside each tolerance fail, values inside pass; names compare exactly."""
    _compare({"a": [1.0, 2]}, {"a": [1.0 + 0.5 * EXACT_RTOL, 2]}, "x")
    with pytest.raises(AssertionError, match="x/a\\[0\\]"):
        _compare({"a": [1.0, 2]}, {"a": [1.0 + 3 * EXACT_RTOL, 2]}, "x")
    with pytest.raises(AssertionError, match="keys differ"):
        _compare({"a": 1.0}, {"b": 1.0}, "x")
    with pytest.raises(AssertionError):
        _compare(["res5.0.conv1.weight"], ["res5.0.conv2.weight"], "x")
    step = {"losses": {"loss_global": 2.0}, "metrics": {"m": 0.5}, "grads": {"backbone": [4, 1]}}

    def moved(**change):
        out = json.loads(json.dumps(step))
        for key, (k, v) in change.items():
            out[key][k] = v
        return out

    compare_steps([step], [moved(losses=("loss_global", 2.0 * (1 + VALUE_RTOL / 2)))], "s")
    compare_steps([step], [moved(grads=("backbone", [4.0, 1.0 + 2 * PROBE_TOL]))], "s")
    for bad in (
        moved(losses=("loss_global", 2.0 * (1 + 2 * VALUE_RTOL) + VALUE_ATOL)),
        moved(metrics=("m", 0.5 + 2 * VALUE_ATOL + VALUE_RTOL)),
        moved(grads=("backbone", [4.0 * (1 + 2 * NORM_RTOL), 1.0])),
        moved(grads=("backbone", [4.0, 1.0 + 4 * 2 * PROBE_TOL])),
    ):
        with pytest.raises(AssertionError, match="s\\[step 0\\]"):
            compare_steps([step], [bad], "s")
