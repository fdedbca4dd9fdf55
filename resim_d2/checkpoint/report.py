"""The human-readable report of a conversion: what moved where, what was dropped and why, and
what the detector initialises itself (``tools/convert.py`` prints it)."""

from __future__ import annotations

import re
from collections import OrderedDict, defaultdict

from .conversion import Conversion, Reconciliation, infer_resnet_config
from .layouts import LAYOUTS

__all__ = ["format_report"]


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
