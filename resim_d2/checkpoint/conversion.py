"""Pre-trained checkpoints -> detectron2 weights for R-C4 and R-FPN detectors, by exact names.

The source is any layout of :mod:`~.layouts`. Targets, with detectron2's module names:

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

import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .checkpointer import AtomicWriter
from .layouts import (
    COMMON_DROPS,
    D2_FPN,
    D2_RESNET,
    LAYOUTS,
    NO_COUNTERPART,
    detect_layout,
    source_layout,
)
from .safe_load import load_weights_file

__all__ = [
    "AUTHOR",
    "Conversion",
    "Reconciliation",
    "convert_checkpoint",
    "infer_resnet_config",
    "load_checkpoint",
    "reconcile",
    "save_conversion",
    "trained_fpn_convs",
]

# the ``__author__`` of files written by :func:`save_conversion`
AUTHOR = "resim_d2"

_NUM_BLOCKS = {
    ((2, 2, 2, 2), "basic"): 18,
    ((3, 4, 6, 3), "basic"): 34,
    ((3, 4, 6, 3), "bottleneck"): 50,
    ((3, 4, 23, 3), "bottleneck"): 101,
    ((3, 8, 36, 3), "bottleneck"): 152,
}


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


def _apply_rules(name: str, rules):
    for pattern, repl in rules:
        m = pattern.match(name)
        if m:
            out = m.expand(repl)
            # layer<i> -> res<i+1>
            return re.sub(r"^res\{(\d)\}", lambda g: f"res{int(g.group(1)) + 1}", out)
    return None


def _drop_reason(key: str) -> str | None:
    for pattern, reason in COMMON_DROPS:
        if pattern.search(key):
            return reason
    return None


def _encoder_name(layout, key: str):
    """(canonical name or None, reason or None) for ``key`` of a ``layout`` state dict."""
    for prefix, renames in layout.encoder:
        m = prefix.match(key)
        if m:
            name = key[m.end() :]
            for skip, reason in layout.skip:
                if name.startswith(skip):
                    return None, reason
            return _apply_rules(name, renames), None
    return None, layout.outside


def _canonical(layout_name: str, sd: dict):
    """Map a source state dict to detectron2 prefix-free names.

    Returns ({canonical name: (source key, tensor)}, [(source key, reason)] dropped).
    """
    layout = source_layout(layout_name)
    canon: dict[str, tuple[str, torch.Tensor]] = OrderedDict()
    dropped: list[tuple[str, str]] = []
    for key, value in sd.items():
        if not isinstance(key, str) or isinstance(value, dict):
            continue
        reason = _drop_reason(key)
        name = None
        if reason is None:
            name, reason = _encoder_name(layout, key)
        if reason is not None:
            dropped.append((key, reason))
        elif name is None or not (D2_RESNET.match(name) or D2_FPN.match(name)):
            dropped.append((key, NO_COUNTERPART))
        else:
            canon[name] = (key, _as_tensor(value))
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
    levels = sorted({int(m.group(2)) for n in canon if (m := D2_FPN.match(n))})
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
