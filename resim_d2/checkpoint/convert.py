"""Pre-trained checkpoints -> detectron2 weights for R50-C4 and R50-FPN detectors, by exact names.

Sources (recognised from their keys, see :func:`detect_layout`):

* ``resim_d2``: our pre-training checkpoint (``tools/train_net.py`` output, ``{"model": ...}``) of
  the ReSim meta-architecture. The query encoder ``backbone.*`` is a detectron2 ResNet
  (``backbone.stem.*``, ``backbone.res2.*``, ...; C4 configs) or FPN (``backbone.bottom_up.*``,
  ``backbone.fpn_lateral3.*``, ``backbone.fpn_output4.*``, ...; FPN configs). The key encoder
  ``backbone_k.*``, the heads ``global_head*``, ``region_heads*``, ``region_mlps.*`` (ReSim on
  SimSiam), ``predictor.*`` and the MoCo queue ``queue``/``queue_ptr`` are dropped.
* ``moco``: MoCo-family checkpoints, ``{"state_dict": {"module.encoder_q.<torchvision name>"}}``
  (MoCo v1/v2, and the released ReSim checkpoints, which add ``fpn_lateral{5,4,3}`` and
  ``fpn_output{4,3}`` convs, as ``fpn_lateral5.weight/.bias`` or, built with ``use_fpn_norm``,
  ``fpn_lateral5.0.weight`` + ``fpn_lateral5.1.<BN>``; ReSim's ``moco/models.py``).
* ``torchvision``: ImageNet classification state dicts (``conv1.weight``, ``bn1.*``, ``layer1.*``,
  ``fc.*``), the supervised baseline; a ``module.`` prefix or a ``state_dict`` wrapper is fine.
* ``d2_backbone``: what MoCo's/ReSim's ``convert-pretrain-to-detectron2.py`` wrote
  (``{"model": {"stem.conv1.weight": ..., "res2.0.conv1.norm.weight": ...,
  "backbone.fpn_lateral5.weight": ...}, "matching_heuristics": True}``, NumPy arrays), so those
  files can be turned into exact names too.

Targets, with detectron2's module names:

* ``"c4"`` (Faster R-CNN R50-C4): stem and res2-res4 -> ``backbone.*``; res5 ->
  ``roi_heads.res5.<block>.*`` (``Res5ROIHeads`` / ``Res5ROIHeadsExtraNorm`` run res5 on each RoI;
  the C4 backbone has no res5). FPN convs are dropped.
* ``"fpn"`` (Mask R-CNN / DensePose R-CNN R50-FPN): the ResNet -> ``backbone.bottom_up.*``; with
  ``transfer_fpn`` (ReSim-FPN^T) the FPN lateral/output convs that pre-training trained ->
  ``backbone.fpn_lateral<l>.*`` / ``backbone.fpn_output<l>.*``, a ``.0``/``.1`` (conv, BN) pair
  becoming detectron2's ``conv`` + ``conv.norm``.

Names are exact, so the file loads with ``matching_heuristics`` off: a key either lands where it
is named or is reported. The conversion is a rename, no reshaping: our pre-training, MoCo and
torchvision ResNets all put the stride in the 3x3 conv (``MODEL.RESNETS.STRIDE_IN_1X1 False``).
BN ``num_batches_tracked`` counters are dropped (detectron2 ignores them; its FrozenBN has none).

:func:`reconcile` checks a conversion against a built detector's state dict: it removes what the
detector has no place for (e.g. an FPN conv bias where the detector's conv is followed by a norm
and has no bias), refuses shape mismatches, and lists what the detector will initialise itself.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import torch

from .checkpointer import AtomicWriter, ResumableCheckpointer
from .safe_load import load_weights_file

__all__ = [
    "LAYOUTS",
    "Conversion",
    "Reconciliation",
    "TransferCheckpointer",
    "convert_checkpoint",
    "detect_layout",
    "format_report",
    "infer_resnet_config",
    "load_checkpoint",
    "reconcile",
    "save_conversion",
    "trained_fpn_convs",
]

logger = logging.getLogger(__name__)

AUTHOR = "resim_d2"

LAYOUTS = {
    "resim_d2": "resim_d2 pre-training checkpoint ({'model': ReSim state_dict}, query encoder "
    "'backbone.stem.*' / 'backbone.bottom_up.*')",
    "moco": "MoCo-family checkpoint ({'state_dict': {'module.encoder_q.conv1.weight', "
    "'module.encoder_q.layer1.0.bn1.weight', ...}}; released ReSim: + 'fpn_lateral5.*')",
    "torchvision": "torchvision ImageNet classification state_dict ('conv1.weight', 'bn1.weight', "
    "'layer1.0.conv1.weight', 'fc.weight')",
    "d2_backbone": "MoCo-style detectron2 conversion ({'model': {'stem.conv1.weight', "
    "'res2.0.conv1.weight', ...}})",
}

_BN = r"(weight|bias|running_mean|running_var)"
_NUM_BLOCKS = {
    ((2, 2, 2, 2), "basic"): 18,
    ((3, 4, 6, 3), "basic"): 34,
    ((3, 4, 6, 3), "bottleneck"): 50,
    ((3, 4, 23, 3), "bottleneck"): 101,
    ((3, 8, 36, 3), "bottleneck"): 152,
}

# torchvision ResNet names (also MoCo's encoder_q and the released ReSim encoder) -> detectron2
_TORCHVISION_RULES = [
    (re.compile(r"^conv1\.weight$"), "stem.conv1.weight"),
    (re.compile(rf"^bn1\.{_BN}$"), r"stem.conv1.norm.\1"),
    (re.compile(r"^layer([1-4])\.(\d+)\.conv(\d)\.weight$"), r"res{\1}.\2.conv\3.weight"),
    (re.compile(rf"^layer([1-4])\.(\d+)\.bn(\d)\.{_BN}$"), r"res{\1}.\2.conv\3.norm.\4"),
    (re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$"), r"res{\1}.\2.shortcut.weight"),
    (re.compile(rf"^layer([1-4])\.(\d+)\.downsample\.1\.{_BN}$"), r"res{\1}.\2.shortcut.norm.\3"),
]
# FPN convs of the released ReSim encoder: plain conv with bias, or Sequential(conv, BN)
_FPN_RULES = [
    (re.compile(r"^(fpn_(?:lateral|output)\d)\.(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^(fpn_(?:lateral|output)\d)\.0\.(weight|bias)$"), r"\1.\2"),
    (re.compile(rf"^(fpn_(?:lateral|output)\d)\.1\.{_BN}$"), r"\1.norm.\2"),
    (re.compile(rf"^(fpn_(?:lateral|output)\d)\.norm\.{_BN}$"), r"\1.norm.\2"),
]
# what a canonical (detectron2, prefix-free) name may look like
_D2_RESNET = re.compile(
    rf"^(stem\.conv1\.(weight|norm\.{_BN})"
    rf"|res[2-5]\.\d+\.(conv\d|shortcut)\.(weight|norm\.{_BN}))$"
)
_D2_FPN = re.compile(rf"^fpn_(lateral|output)(\d)\.(weight|bias|norm\.{_BN})$")

_DROP_REASONS = [
    (re.compile(r"num_batches_tracked$"), "BN step counters (detectron2 does not use them)"),
    (re.compile(r"^backbone_k\."), "key encoder (momentum copy of the query encoder)"),
    (re.compile(r"^(global_head|region_heads|region_mlps|predictor)"), "pre-training heads"),
    (re.compile(r"^queue(_ptr)?$"), "MoCo negative queue"),
    (
        re.compile(r"^(pixel_mean|pixel_std)$"),
        "input normalisation (set by the fine-tuning config)",
    ),
]


# ------------------------------------------------------------------------------------------ loading
def load_checkpoint(path: str):
    """Read a checkpoint without running code from it (:func:`~.safe_load.load_weights_file`).

    ``.pkl`` files (MoCo-style detectron2 conversions, model-zoo files) are unpickled with NumPy
    arrays, dicts, lists, tuples, strings and numbers allowed; other files with
    ``torch.load(weights_only=True)`` and NumPy arrays allowed. Anything else raises
    :class:`~.safe_load.UnsafeCheckpointError`; a file that is no checkpoint raises
    :class:`~.safe_load.CheckpointReadError`; both name the file.
    """
    return load_weights_file(path)


def _as_tensor(v):
    if isinstance(v, torch.Tensor):
        return v
    return torch.as_tensor(v)


def _strip_module(sd: dict) -> dict:
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _candidates(obj):
    """(where, dict) pairs a state dict may live in."""
    if not isinstance(obj, dict):
        return []
    out = [("", obj)]
    for name in ("model", "state_dict"):
        if isinstance(obj.get(name), dict):
            out.append((name, obj[name]))
    return out


def detect_layout(obj) -> tuple[str, dict]:
    """Which of :data:`LAYOUTS` ``obj`` (a loaded checkpoint) is in. Returns (layout, state dict).

    Raises ValueError naming the expected layouts and some of the keys seen.
    """
    for _, sd in _candidates(obj):
        if "backbone.stem.conv1.weight" in sd or "backbone.bottom_up.stem.conv1.weight" in sd:
            return "resim_d2", sd
        for prefix in ("module.encoder_q.", "encoder_q."):
            if f"{prefix}conv1.weight" in sd:
                return "moco", sd
        stripped = _strip_module(sd)
        if "conv1.weight" in stripped and "layer1.0.conv1.weight" in stripped:
            return "torchvision", sd
        if "stem.conv1.weight" in sd and "res2.0.conv1.weight" in sd:
            return "d2_backbone", sd
    seen_top = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
    sample = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict):
                sample += [f"{k}[{kk!r}]" for kk in list(v)[:4]]
            else:
                sample.append(repr(k))
    expected = "\n".join(f"  - {name}: {desc}" for name, desc in LAYOUTS.items())
    raise ValueError(
        "unrecognised checkpoint layout. Expected one of:\n"
        f"{expected}\n"
        f"saw top-level keys {seen_top}; keys such as {', '.join(sample[:8])}"
    )


# ------------------------------------------------------------------------------------- canonical
def _apply_rules(name: str, rules):
    for pattern, repl in rules:
        m = pattern.match(name)
        if m:
            out = m.expand(repl)
            # layer<i> -> res<i+1>
            return re.sub(r"^res\{(\d)\}", lambda g: f"res{int(g.group(1)) + 1}", out)
    return None


def _drop_reason(key: str) -> str | None:
    for pattern, reason in _DROP_REASONS:
        if pattern.search(key):
            return reason
    return None


def _canonical(layout: str, sd: dict):
    """Map a source state dict to detectron2 prefix-free names.

    Returns ({canonical name: (source key, tensor)}, [(source key, reason)] dropped).
    """
    canon: dict[str, tuple[str, torch.Tensor]] = OrderedDict()
    dropped: list[tuple[str, str]] = []

    def put(src, name, value):
        if name is None or not (_D2_RESNET.match(name) or _D2_FPN.match(name)):
            dropped.append((src, "no detectron2 ResNet/FPN counterpart"))
        else:
            canon[name] = (src, _as_tensor(value))

    for key, value in sd.items():
        if not isinstance(key, str) or isinstance(value, dict):
            continue
        reason = _drop_reason(key)
        if reason is None and layout == "resim_d2":
            k = key[len("module.") :] if key.startswith("module.") else key
            if k.startswith("backbone.bottom_up."):
                put(key, k[len("backbone.bottom_up.") :], value)
            elif k.startswith("backbone.fpn_"):
                put(key, _apply_rules(k[len("backbone.") :], _FPN_RULES), value)
            elif k.startswith("backbone."):
                put(key, k[len("backbone.") :], value)
            else:
                dropped.append((key, "not part of the query encoder"))
            continue
        if reason is None and layout == "moco":
            prefix = "module.encoder_q." if key.startswith("module.") else "encoder_q."
            if not key.startswith(prefix):
                reason = "not part of the query encoder (encoder_q)"
            else:
                k = key[len(prefix) :]
                if k.startswith("fc."):
                    reason = "global projection head (fc)"
                else:
                    put(key, _apply_rules(k, _TORCHVISION_RULES + _FPN_RULES), value)
                    continue
        if reason is None and layout == "torchvision":
            k = key[len("module.") :] if key.startswith("module.") else key
            if k.startswith("fc."):
                reason = "ImageNet classifier (fc)"
            else:
                put(key, _apply_rules(k, _TORCHVISION_RULES + _FPN_RULES), value)
                continue
        if reason is None and layout == "d2_backbone":
            k = key[len("backbone.") :] if key.startswith("backbone.fpn_") else key
            if _D2_RESNET.match(k):
                put(key, k, value)
            else:
                put(key, _apply_rules(k, _FPN_RULES), value)
            continue
        dropped.append((key, reason or "no detectron2 ResNet/FPN counterpart"))
    return canon, dropped


def trained_fpn_convs(levels_present, fpn_levels=("p3", "p4")) -> set[str]:
    """FPN convs that pre-training on ``fpn_levels`` trained, e.g. {"fpn_lateral5", ...}.

    Output convs of the used levels, and lateral convs from the top down to the lowest used level
    (those feed the used levels through the top-down path). ``levels_present``: ints, e.g. 2..5.
    """
    used = {int(lv.lstrip("pP")) for lv in fpn_levels}
    if not used:
        return set()
    lowest = min(used)
    out = {f"fpn_lateral{lv}" for lv in levels_present if lv >= lowest}
    out |= {f"fpn_output{lv}" for lv in levels_present if lv in used}
    return out


# -------------------------------------------------------------------------------------- conversion
@dataclass
class Conversion:
    """The result of :func:`convert_checkpoint`.

    model: {detectron2 name: tensor}, ready for ``DetectionCheckpointer``.
    moved: [(source key, detectron2 name)]; dropped: [(source key, reason)].
    """

    model: OrderedDict[str, torch.Tensor]
    layout: str
    target: str
    transfer_fpn: bool
    fpn_levels: tuple
    moved: list = field(default_factory=list)
    dropped: list = field(default_factory=list)
    source: str = ""

    def metadata(self) -> dict:
        return {
            "source": self.source,
            "layout": self.layout,
            "target": self.target,
            "transfer_fpn": self.transfer_fpn,
            "fpn_levels": list(self.fpn_levels),
            "resnet": infer_resnet_config(self),
        }


def convert_checkpoint(
    obj, target: str = "c4", transfer_fpn: bool = False, fpn_levels=("p3", "p4"), source: str = ""
) -> Conversion:
    """Convert a loaded checkpoint (any of :data:`LAYOUTS`) to detectron2 names for ``target``.

    Args:
        obj: what :func:`load_checkpoint` returned.
        target: "c4" (res5 in ``roi_heads.res5``) or "fpn" (ResNet in ``backbone.bottom_up``).
        transfer_fpn: also transfer the FPN convs (ReSim-FPN^T); "fpn" targets only.
        fpn_levels: the pre-training's region levels (RESIM.REGION.IN_FEATURES of a ReSim-FPN
            run), deciding which FPN convs were trained (:func:`trained_fpn_convs`).
        source: a name for the report (the input path).
    """
    if target not in ("c4", "fpn"):
        raise ValueError(f"target must be 'c4' or 'fpn', got {target!r}")
    if transfer_fpn and target != "fpn":
        raise ValueError("transfer_fpn needs an FPN target (a C4 detector has no FPN)")
    layout, sd = detect_layout(obj)
    canon, dropped = _canonical(layout, sd)
    if not any(name.startswith("res5.") for name in canon):
        raise ValueError(f"{source or 'checkpoint'}: no res5 weights found ({LAYOUTS[layout]})")
    levels = sorted({int(m.group(2)) for n in canon if (m := _D2_FPN.match(n))})
    trained = trained_fpn_convs(levels, fpn_levels)
    if transfer_fpn and not levels:
        raise ValueError(
            f"{source or 'checkpoint'} has no FPN weights to transfer (ReSim-FPN^T needs a "
            "ReSim-FPN pre-training checkpoint); convert without --fpn"
        )
    model: OrderedDict[str, torch.Tensor] = OrderedDict()
    moved = []
    for name, (src, tensor) in canon.items():
        if name.startswith("fpn_"):
            conv = name.split(".")[0]
            if target == "c4":
                dropped.append((src, "FPN conv (a C4 detector has no FPN)"))
                continue
            if not transfer_fpn:
                dropped.append((src, "FPN conv (ResNet-only transfer; --fpn gives ReSim-FPN^T)"))
                continue
            if conv not in trained:
                dropped.append(
                    (src, f"FPN conv not trained by pre-training on {','.join(fpn_levels)}")
                )
                continue
            dst = "backbone." + name
        elif target == "c4":
            dst = (
                "roi_heads.res5." + name[len("res5.") :]
                if name.startswith("res5.")
                else ("backbone." + name)
            )
        else:
            dst = "backbone.bottom_up." + name
        model[dst] = tensor.detach().clone().contiguous()
        moved.append((src, dst))
    return Conversion(
        model=model,
        layout=layout,
        target=target,
        transfer_fpn=transfer_fpn,
        fpn_levels=tuple(fpn_levels),
        moved=moved,
        dropped=dropped,
        source=source,
    )


def infer_resnet_config(conv: Conversion) -> dict:
    """detectron2 config values that describe the converted ResNet (and FPN width).

    Returns {"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.STEM_OUT_CHANNELS": 64, ...}; the depth is
    None when the block counts match no standard ResNet.
    """
    names = {}
    for dst, tensor in conv.model.items():
        for prefix in ("backbone.bottom_up.", "backbone."):
            if dst.startswith(prefix):
                names[dst[len(prefix) :]] = tensor
                break
        if dst.startswith("roi_heads.res5."):
            names["res5." + dst[len("roi_heads.res5.") :]] = tensor
    bottleneck = "res2.0.conv3.weight" in names
    counts = tuple(
        1 + max((int(n.split(".")[1]) for n in names if n.startswith(f"res{s}.")), default=-1)
        for s in range(2, 6)
    )
    out = {
        "MODEL.RESNETS.DEPTH": _NUM_BLOCKS.get((counts, "bottleneck" if bottleneck else "basic")),
        "MODEL.RESNETS.STEM_OUT_CHANNELS": int(names["stem.conv1.weight"].shape[0]),
    }
    last = "res2.0.conv3.weight" if bottleneck else "res2.0.conv2.weight"
    if last in names:
        out["MODEL.RESNETS.RES2_OUT_CHANNELS"] = int(names[last].shape[0])
    if bottleneck:
        width = int(names["res2.0.conv1.weight"].shape[0])
        groups = width // int(names["res2.0.conv2.weight"].shape[1])
        out["MODEL.RESNETS.NUM_GROUPS"] = groups
        out["MODEL.RESNETS.WIDTH_PER_GROUP"] = width // groups
    fpn = [t for n, t in names.items() if n.startswith("fpn_lateral") and n.endswith(".weight")]
    if fpn:
        out["MODEL.FPN.OUT_CHANNELS"] = int(fpn[0].shape[0])
    return out


# --------------------------------------------------------------------------------- target check
@dataclass
class Reconciliation:
    """A conversion checked against a detector's state dict (see :func:`reconcile`).

    random_init: detector keys the file does not provide (the detector initialises them).
    removed: [(detectron2 name, reason)] taken out of the conversion: the detector has no place.
    """

    random_init: list
    removed: list


def reconcile(conv: Conversion, model_state: dict) -> Reconciliation:
    """Fit ``conv`` to a detector's ``state_dict()`` in place; return what it leaves random.

    Keys the detector lacks are removed from ``conv.model`` (and added to ``conv.dropped``), e.g.
    an FPN conv bias where the detector's conv is followed by a norm (``FPN.NORM``) and has none;
    in training mode such a norm cancels any bias anyway. Shape mismatches raise ValueError: the
    detector is a different architecture (check MODEL.RESNETS.DEPTH / widths / FPN.OUT_CHANNELS).
    """
    src_of = {dst: src for src, dst in conv.moved}
    mismatched, removed = [], []
    for dst in list(conv.model):
        if dst not in model_state:
            stem = dst.rsplit(".", 1)[0]
            if dst.endswith(".bias") and f"{stem}.norm.weight" in model_state:
                reason = "the detector's conv has a norm and no bias (FPN.NORM)"
            else:
                reason = "the detector has no such parameter"
            removed.append((dst, reason))
            conv.dropped.append((src_of.get(dst, dst), reason))
            conv.moved = [(s, d) for s, d in conv.moved if d != dst]
            del conv.model[dst]
        elif tuple(model_state[dst].shape) != tuple(conv.model[dst].shape):
            mismatched.append((dst, tuple(conv.model[dst].shape), tuple(model_state[dst].shape)))
    if mismatched:
        lines = "\n".join(f"  {k}: file {a}, detector {b}" for k, a, b in mismatched[:8])
        raise ValueError(
            f"{len(mismatched)} converted tensors do not fit the detector (a different "
            f"architecture? the source looks like {infer_resnet_config(conv)}):\n{lines}"
        )
    random_init = [
        k for k in model_state if k not in conv.model and not k.endswith("num_batches_tracked")
    ]
    return Reconciliation(random_init=random_init, removed=removed)


# ---------------------------------------------------------------------------------------- output
def save_conversion(conv: Conversion, path: str) -> str:
    """Write ``conv`` for detectron2's ``DetectionCheckpointer`` (``MODEL.WEIGHTS``).

    ``.pth`` (recommended): ``torch.save`` of ``{"model": {name: tensor}, "__author__":
    "resim_d2", "matching_heuristics": False, "resim_d2_conversion": {...}}``, readable with
    ``weights_only=True``. ``.pkl``: the same dict pickled with NumPy arrays, detectron2's model-zoo
    format (with resim_d2 imported, detectron2 reads it with only weights allowed). Names are exact
    in both.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {
        "__author__": AUTHOR,
        "matching_heuristics": False,
        "resim_d2_conversion": conv.metadata(),
    }
    with AtomicWriter().open(path, "wb") as f:  # a partial file never appears under `path`
        if path.endswith(".pkl"):
            data["model"] = {k: v.cpu().numpy() for k, v in conv.model.items()}
            pickle.dump(data, f)
        else:
            data["model"] = dict(conv.model)
            torch.save(data, f)
    return path


def _brace(names):
    """['a.weight', 'a.bias'] -> 'a.{weight,bias}'; keys grouped by module."""
    groups = OrderedDict()
    for n in names:
        mod, _, leaf = n.rpartition(".")
        groups.setdefault(mod, []).append(leaf)
    return [f"{m}.{{{','.join(v)}}}" if len(v) > 1 else f"{m}.{v[0]}" for m, v in groups.items()]


def _collapse(keys, limit=8):
    """A short description of many keys: the keys, or their common modules with counts."""
    if len(keys) <= limit:
        return ", ".join(keys)
    parts = [k.split(".") for k in keys]
    depth = 1
    while depth < 3 and len({tuple(p[:depth]) for p in parts}) == 1:
        depth += 1
    tops = OrderedDict()
    for p in parts:
        top = ".".join(p[:depth]) + (".*" if len(p) > depth else "")
        tops[top] = tops.get(top, 0) + 1
    return ", ".join(f"{t} ({n})" if n > 1 else t for t, n in tops.items())


def _stage(name: str) -> str:
    """'backbone.bottom_up.res2.0.conv1.weight' -> 'backbone.bottom_up.res2'."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if re.fullmatch(r"(stem|res\d|layer\d|conv1|bn1|fpn_\w+)", p):
            return ".".join(parts[: i + 1])
    return parts[0]


def format_report(conv: Conversion, rec: Reconciliation | None = None, verbose=False) -> str:
    """Human-readable: what moved where (per stage, or per module if ``verbose``), what was dropped
    and why, and what the detector initialises."""
    arch = infer_resnet_config(conv)
    depth = arch.get("MODEL.RESNETS.DEPTH")
    lines = [
        f"source: {conv.source or '<checkpoint>'}",
        f"layout: {conv.layout}: {LAYOUTS[conv.layout]}",
        f"network: ResNet-{depth or '?'} "
        + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in arch.items()),
        "target: "
        + (
            "R-C4 detector (stem/res2-4 -> backbone.*, res5 -> roi_heads.res5.*)"
            if conv.target == "c4"
            else "R-FPN detector (ResNet -> backbone.bottom_up.*"
            + (
                ", FPN -> backbone.fpn_*: ReSim-FPN^T)"
                if conv.transfer_fpn
                else ", FPN not transferred)"
            )
        ),
        "",
        f"moved ({len(conv.moved)} tensors):",
    ]
    groups = OrderedDict()
    for src, dst in conv.moved:
        if verbose:
            key = (src.rpartition(".")[0], dst.rpartition(".")[0])
            groups.setdefault(key, []).append(dst.rpartition(".")[2])
        else:
            groups.setdefault((_stage(src), _stage(dst)), []).append(dst)
    for (s, d), items in groups.items():
        detail = ",".join(items) if verbose else f"{len(items)} tensor{'s' * (len(items) > 1)}"
        lines.append(f"  {s}{'' if verbose else '.*'} -> {d}{'' if verbose else '.*'}  [{detail}]")
    lines.append("")
    lines.append(f"dropped ({len(conv.dropped)} tensors):")
    reasons = defaultdict(list)
    for src, reason in conv.dropped:
        reasons[reason].append(src)
    for reason, keys in reasons.items():
        lines.append(f"  {reason} ({len(keys)}): {_collapse(keys)}")
    if rec is not None:
        lines.append("")
        lines.append(
            f"initialised by the detector ({len(rec.random_init)} tensors, not in the file):"
        )
        for name in _brace(rec.random_init):
            lines.append(f"  {name}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- loading
class TransferCheckpointer(ResumableCheckpointer):
    """The training checkpointer, applying ``RESIM.FINETUNE.TRANSFER_FPN`` to converted files.

    For a file written by :func:`save_conversion` (``__author__ == "resim_d2"``): with
    ``transfer_fpn`` False its ``backbone.fpn_*`` tensors are ignored (ReSim-FPN transfers the
    ResNet only; the FPN starts from detectron2's init); with ``transfer_fpn`` True a file without
    FPN tensors is an error (a ReSim-FPN^T config given a ResNet-only conversion). Other files
    (detectron2 checkpoints, ``--resume``) load unchanged.
    """

    def __init__(self, model, save_dir="", *, transfer_fpn: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.transfer_fpn = bool(transfer_fpn)

    def _load_file(self, filename):
        data = super()._load_file(filename)
        if not (isinstance(data, dict) and data.get("__author__") == AUTHOR):
            return data
        fpn = [k for k in data["model"] if k.startswith("backbone.fpn_")]
        if self.transfer_fpn and not fpn:
            raise ValueError(
                f"{filename} holds no FPN weights, but RESIM.FINETUNE.TRANSFER_FPN is True "
                "(ReSim-FPN^T): convert a ReSim-FPN checkpoint with tools/convert.py --fpn, or "
                "use the config without FPN transfer"
            )
        if not self.transfer_fpn and fpn:
            self.logger.info(
                f"RESIM.FINETUNE.TRANSFER_FPN is False: ignoring {len(fpn)} FPN tensors of "
                f"{filename} (the FPN keeps detectron2's initialisation)"
            )
            drop = set(fpn)
            data["model"] = {k: v for k, v in data["model"].items() if k not in drop}
        return data
