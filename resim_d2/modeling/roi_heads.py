"""The res5 box head of MoCo's detection protocol, and the norm of the frozen-backbone protocol.

:class:`Res5ROIHeadsExtraNorm` is detectron2's :class:`Res5ROIHeads` (the "C4" box head: RoI pooling
on res4, then the res5 stage on each RoI) with one more norm after the res5 stage, as in MoCo's
detection recipe that ReSim follows (paper §4.1: BN everywhere, synchronised, the box head
included). Registered in detectron2's ``ROI_HEADS_REGISTRY``::

    MODEL.ROI_HEADS.NAME: "Res5ROIHeadsExtraNorm"

Module names (the converter writes pre-trained res5 weights under them)::

    roi_heads.res5.{0,1,2}.*   the res5 blocks (detectron2 block names, as in the backbone)
    roi_heads.res5.norm.*      the extra norm (always initialised by the detector)

Norms of the head: ``RESIM.FINETUNE.RES5_NORM``, or ``MODEL.RESNETS.NORM`` when that is "".
"FrozenStatsBN" (:class:`FrozenStatsBatchNorm2d`) gives the frozen-backbone protocol (paper §4.1):
every BN statistic frozen while the res5 weights, BN scale and shift included, are trained.

Unlike detectron2's head, res5 follows ``MODEL.RESNETS.DEPTH``: BasicBlocks for ResNet-18/34 (so a
converted R18 encoder fits), bottleneck blocks otherwise.
"""

from torch import nn

from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads

__all__ = ["FrozenStatsBatchNorm2d", "Res5ROIHeadsExtraNorm", "res5_head_norm"]


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics and never updates them.

    The affine scale/shift stay trainable parameters (unlike detectron2's ``FrozenBatchNorm2d``,
    whose scale/shift are buffers). The module stays in eval mode whatever ``train()`` is called
    with, so detectron2's PreciseBN hook (``get_bn_modules`` keeps training-mode norms only) and
    SyncBN conversion leave it alone. Input/output: (N, C, H, W).
    """

    def train(self, mode: bool = True):
        return super().train(False)


def res5_head_norm(cfg):
    """The norm of the res5 head: a detectron2 norm name, or :class:`FrozenStatsBatchNorm2d`."""
    finetune = getattr(getattr(cfg, "RESIM", None), "FINETUNE", None)
    name = getattr(finetune, "RES5_NORM", "") or cfg.MODEL.RESNETS.NORM
    if name == "FrozenStatsBN":
        return FrozenStatsBatchNorm2d
    return name


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """detectron2's Res5ROIHeads with a norm after the res5 stage (see the module docstring).

    Box features: RoIs pooled from res4, (R, C4, P, P) -> res5 -> norm -> (R, C5, P/2, P/2), then
    averaged to (R, C5) for the box predictor, exactly as in ``Res5ROIHeads.forward``.
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        rn = cfg.MODEL.RESNETS
        norm = res5_head_norm(cfg)
        out_channels = rn.RES2_OUT_CHANNELS * 8  # res5 is 8x res2
        if rn.DEFORM_ON_PER_STAGE[-1]:
            raise ValueError("Deformable conv is not supported in the res5 box head")
        if rn.DEPTH in (18, 34):
            blocks = ResNet.make_stage(
                BasicBlock,
                3 if rn.DEPTH == 34 else 2,
                stride_per_block=[2] + [1] * (2 if rn.DEPTH == 34 else 1),
                in_channels=out_channels // 2,
                out_channels=out_channels,
                norm=norm,
            )
        else:
            blocks = ResNet.make_stage(
                BottleneckBlock,
                3,
                stride_per_block=[2, 1, 1],
                in_channels=out_channels // 2,
                bottleneck_channels=rn.NUM_GROUPS * rn.WIDTH_PER_GROUP * 8,
                out_channels=out_channels,
                num_groups=rn.NUM_GROUPS,
                norm=norm,
                stride_in_1x1=rn.STRIDE_IN_1X1,
            )
        res5 = nn.Sequential(*blocks)
        res5.add_module("norm", get_norm(norm, out_channels))
        return res5, out_channels
