"""The checkpoint layouts :mod:`~.conversion` reads, as data: how each is recognised, where its
encoder's keys live and how they are renamed to detectron2's prefix-free ResNet/FPN names.

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
  (``{"model": {"stem.conv1.weight": ..., "res2.0.conv1.weight": ...,
  "backbone.fpn_lateral5.weight": ...}, "matching_heuristics": True}``, NumPy arrays).

A new layout is one more :class:`SourceLayout` in :data:`SOURCE_LAYOUTS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["LAYOUTS", "SOURCE_LAYOUTS", "SourceLayout", "detect_layout"]

BN = r"(weight|bias|running_mean|running_var)"

# what a canonical (detectron2, prefix-free) name may look like
D2_RESNET = re.compile(
    rf"^(stem\.conv1\.(weight|norm\.{BN})"
    rf"|res[2-5]\.\d+\.(conv\d|shortcut)\.(weight|norm\.{BN}))$"
)
D2_FPN = re.compile(rf"^fpn_(lateral|output)(\d)\.(weight|bias|norm\.{BN})$")

# torchvision ResNet names (also MoCo's encoder_q and the released ReSim encoder) -> detectron2;
# "res{i}" is torchvision's layer<i>, renumbered to detectron2's res<i+1> by conversion
TORCHVISION_RULES = (
    (re.compile(r"^conv1\.weight$"), "stem.conv1.weight"),
    (re.compile(rf"^bn1\.{BN}$"), r"stem.conv1.norm.\1"),
    (re.compile(r"^layer([1-4])\.(\d+)\.conv(\d)\.weight$"), r"res{\1}.\2.conv\3.weight"),
    (re.compile(rf"^layer([1-4])\.(\d+)\.bn(\d)\.{BN}$"), r"res{\1}.\2.conv\3.norm.\4"),
    (re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$"), r"res{\1}.\2.shortcut.weight"),
    (re.compile(rf"^layer([1-4])\.(\d+)\.downsample\.1\.{BN}$"), r"res{\1}.\2.shortcut.norm.\3"),
)
# FPN convs of the released ReSim encoder: plain conv with bias, or Sequential(conv, BN)
FPN_RULES = (
    (re.compile(r"^(fpn_(?:lateral|output)\d)\.(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^(fpn_(?:lateral|output)\d)\.0\.(weight|bias)$"), r"\1.\2"),
    (re.compile(rf"^(fpn_(?:lateral|output)\d)\.1\.{BN}$"), r"\1.norm.\2"),
    (re.compile(rf"^(fpn_(?:lateral|output)\d)\.norm\.{BN}$"), r"\1.norm.\2"),
)
# names already in detectron2's ResNet/FPN form stay as they are
KEEP_D2 = ((D2_RESNET, r"\g<0>"), (D2_FPN, r"\g<0>"))

# keys dropped in every layout, checked on the full key before anything else
COMMON_DROPS = (
    (re.compile(r"num_batches_tracked$"), "BN step counters (detectron2 does not use them)"),
    (re.compile(r"^backbone_k\."), "key encoder (momentum copy of the query encoder)"),
    (re.compile(r"^(global_head|region_heads|region_mlps|predictor)"), "pre-training heads"),
    (re.compile(r"^queue(_ptr)?$"), "MoCo negative queue"),
    (
        re.compile(r"^(pixel_mean|pixel_std)$"),
        "input normalisation (set by the fine-tuning config)",
    ),
)

NO_COUNTERPART = "no detectron2 ResNet/FPN counterpart"


@dataclass(frozen=True)
class SourceLayout:
    """One checkpoint layout.

    name / description: for reports and errors.
    markers: alternative key sets; a state dict holding every key of one of them is this layout.
    unwrap_module: look for the markers after removing a ``module.`` prefix that every key has
        (a ``DataParallel`` state dict).
    encoder: ``(prefix pattern, renames)`` pairs, tried in order on each key: the first pattern
        that matches is cut off, the rest of the key goes through ``renames`` (``(pattern,
        replacement)`` pairs, the first match wins; none matching drops the key as having no
        detectron2 counterpart).
    outside: why a key that no prefix pattern matches is dropped.
    skip: ``(prefix, reason)`` pairs: encoder names (prefix already cut) dropped with a reason.
    """

    name: str
    description: str
    markers: tuple
    encoder: tuple
    unwrap_module: bool = False
    outside: str = NO_COUNTERPART
    skip: tuple = ()


SOURCE_LAYOUTS = (
    SourceLayout(
        name="resim_d2",
        description="resim_d2 pre-training checkpoint ({'model': ReSim state_dict}, query encoder "
        "'backbone.stem.*' / 'backbone.bottom_up.*')",
        markers=(("backbone.stem.conv1.weight",), ("backbone.bottom_up.stem.conv1.weight",)),
        encoder=(
            (re.compile(r"^(module\.)?backbone\.bottom_up\."), KEEP_D2),
            (re.compile(r"^(module\.)?backbone\."), KEEP_D2 + FPN_RULES),
        ),
        outside="not part of the query encoder",
    ),
    SourceLayout(
        name="moco",
        description="MoCo-family checkpoint ({'state_dict': {'module.encoder_q.conv1.weight', "
        "'module.encoder_q.layer1.0.bn1.weight', ...}}; released ReSim: + 'fpn_lateral5.*')",
        markers=(("module.encoder_q.conv1.weight",), ("encoder_q.conv1.weight",)),
        encoder=((re.compile(r"^(module\.)?encoder_q\."), TORCHVISION_RULES + FPN_RULES),),
        outside="not part of the query encoder (encoder_q)",
        skip=(("fc.", "global projection head (fc)"),),
    ),
    SourceLayout(
        name="torchvision",
        unwrap_module=True,  # also saved from a DataParallel model ('module.conv1.weight', ...)
        description="torchvision ImageNet classification state_dict ('conv1.weight', "
        "'bn1.weight', 'layer1.0.conv1.weight', 'fc.weight')",
        markers=(("conv1.weight", "layer1.0.conv1.weight"),),
        encoder=((re.compile(r"^(module\.)?"), TORCHVISION_RULES + FPN_RULES),),
        skip=(("fc.", "ImageNet classifier (fc)"),),
    ),
    SourceLayout(
        name="d2_backbone",
        description="MoCo-style detectron2 conversion ({'model': {'stem.conv1.weight', "
        "'res2.0.conv1.weight', ...}})",
        markers=(("stem.conv1.weight", "res2.0.conv1.weight"),),
        encoder=(
            (re.compile(r"^backbone\.(?=fpn_)"), KEEP_D2 + FPN_RULES),
            (re.compile(r"^"), KEEP_D2 + FPN_RULES),
        ),
    ),
)

# {name: description} of the layouts, in the order they are tried
LAYOUTS = {layout.name: layout.description for layout in SOURCE_LAYOUTS}
_BY_NAME = {layout.name: layout for layout in SOURCE_LAYOUTS}


def source_layout(name: str) -> SourceLayout:
    """The :class:`SourceLayout` called ``name``."""
    return _BY_NAME[name]


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


def _matches(layout: SourceLayout, sd: dict) -> bool:
    keys = _strip_module(sd) if layout.unwrap_module else sd
    return any(all(k in keys for k in marker) for marker in layout.markers)


def detect_layout(obj) -> tuple[str, dict]:
    """Which of :data:`LAYOUTS` ``obj`` (a loaded checkpoint) is in. Returns (layout, state dict).

    The checkpoint itself, then its ``model`` and ``state_dict`` entries, are tried against each
    layout in turn. Raises ValueError naming the expected layouts and some of the keys seen.
    """
    for _, sd in _candidates(obj):
        for layout in SOURCE_LAYOUTS:
            if _matches(layout, sd):
                return layout.name, sd
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
