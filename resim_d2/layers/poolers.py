"""Make Precise RoI Pooling selectable as a detectron2 ``POOLER_TYPE``.

detectron2 v0.6's :class:`~detectron2.modeling.poolers.ROIPooler` hard-codes the pooler types it
accepts (``ROIAlign``, ``ROIAlignV2``, ``ROIPool``, ``ROIAlignRotated``) and raises ``ValueError``
for any other; the ROI heads construct ``ROIPooler`` directly from
``cfg.MODEL.ROI_*_HEAD.POOLER_TYPE``.
Rather than fork the pooler (its level assignment and forward are what we want), this module wraps
``ROIPooler.__init__`` once:

* ``pooler_type="PrRoIPool"`` (the original op's coordinate convention, like ``ROIAlign``) or
  ``"PrRoIPoolV2"`` (``aligned=True``: half-pixel offset, like ``ROIAlignV2``) builds the usual
  pooler with ``"ROIAlign"`` - so every check and attribute of the original constructor is kept -
  and then replaces ``self.level_poolers`` with :class:`~resim_d2.layers.PrRoIPool` modules of the
  same output size and per-level spatial scales. ``sampling_ratio`` is ignored: the integral is
  exact.
* Every other ``pooler_type`` goes to the original constructor untouched.

So ``MODEL.ROI_BOX_HEAD.POOLER_TYPE: "PrRoIPool"`` (and the mask / keypoint heads' keys) works in
any detectron2 config once :func:`register_prroi_pooler` has run (``import resim_d2`` runs it).
The wrapper is idempotent and :func:`unregister_prroi_pooler` restores the original constructor.
"""

from __future__ import annotations

import functools

from torch import nn

from detectron2.modeling.poolers import ROIPooler

from .prroi_pool import PrRoIPool

__all__ = ["PRROI_POOLER_TYPES", "register_prroi_pooler", "unregister_prroi_pooler"]

# pooler_type -> the ``aligned`` flag of the PrRoIPool modules it builds
PRROI_POOLER_TYPES = {"PrRoIPool": False, "PrRoIPoolV2": True}

_MARK = "_resim_prroi_original"


def register_prroi_pooler() -> None:
    """Let ``ROIPooler`` accept ``pooler_type`` "PrRoIPool" / "PrRoIPoolV2". Safe to call again."""
    current = ROIPooler.__init__
    if hasattr(current, _MARK):
        return
    original = current

    @functools.wraps(original)
    def __init__(self, output_size, scales, sampling_ratio, pooler_type, *args, **kwargs):
        if pooler_type not in PRROI_POOLER_TYPES:
            original(self, output_size, scales, sampling_ratio, pooler_type, *args, **kwargs)
            return
        # Build with ROIAlign to keep all of ROIPooler's checks (pyramid scales, levels, ...).
        original(self, output_size, scales, sampling_ratio, "ROIAlign", *args, **kwargs)
        aligned = PRROI_POOLER_TYPES[pooler_type]
        self.level_poolers = nn.ModuleList(
            PrRoIPool(self.output_size, spatial_scale=scale, aligned=aligned) for scale in scales
        )

    setattr(__init__, _MARK, original)
    ROIPooler.__init__ = __init__


def unregister_prroi_pooler() -> None:
    """Restore detectron2's own ``ROIPooler.__init__`` (no-op if not registered)."""
    original = getattr(ROIPooler.__init__, _MARK, None)
    if original is not None:
        ROIPooler.__init__ = original
