#!/usr/bin/env python
"""Convert a pre-trained checkpoint into detectron2 weights for an R-C4 or R-FPN detector.

    # ReSim-C4 / MoCo-v2 pre-training (ours or MoCo's) -> VOC Faster R-CNN R50-C4
    python tools/convert.py output/resim_c4/model_final.pth output/resim_c4_d2.pth --target c4
    # ReSim-FPN -> COCO Mask R-CNN R50-FPN, ResNet only (ReSim-FPN) or with the FPN (ReSim-FPN^T)
    python tools/convert.py output/resim_fpn/model_final.pth resim_fpn_d2.pth --target fpn
    python tools/convert.py output/resim_fpn/model_final.pth resim_fpnT_d2.pth --target fpn --fpn
    # supervised baseline: torchvision's ImageNet weights
    python tools/convert.py resnet50-0676ba61.pth output/r50_tv_d2.pth --target c4

Inputs: our pre-training checkpoints, MoCo-family checkpoints (``module.encoder_q.*``, the released
ReSim/MoCo weights), torchvision classification state dicts, MoCo-style detectron2 conversions
(resim_d2/checkpoint/layouts.py lists the layouts). Output: ``.pth`` (recommended) or ``.pkl`` with
exact detectron2 names; use it as MODEL.WEIGHTS.

The conversion is checked against the detector it is meant for: ``--config`` (a fine-tuning config,
plus KEY VALUE overrides after it), by default configs/finetune/voc_R50_C4_24k.yaml (c4) or
coco_R50_FPN_1x[_fpnT].yaml (fpn) with the ResNet depth/widths of the checkpoint. The detector is
built on the CPU (a few seconds); tensors it has no place for are left out of the file and
reported. It prints which keys moved, which were dropped and why, and which the detector will
initialise itself.
"""

import argparse
import os
import sys

import resim_d2  # noqa: F401  (first: adapts detectron2 to the installed libraries, registers ours)
from resim_d2.checkpoint import (
    convert_checkpoint,
    format_report,
    infer_resnet_config,
    load_checkpoint,
    reconcile,
    save_conversion,
)
from resim_d2.config import add_resim_config, get_config_file

from detectron2.config import get_cfg
from detectron2.modeling import build_model

DEFAULT_CONFIGS = {
    ("c4", False): "finetune/voc_R50_C4_24k.yaml",
    ("fpn", False): "finetune/coco_R50_FPN_1x.yaml",
    ("fpn", True): "finetune/coco_R50_FPN_1x_fpnT.yaml",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "input",
        help="pre-trained checkpoint: .pth/.pth.tar (torch, weights_only) or .pkl (detectron2); "
        "files holding anything but weights are refused",
    )
    p.add_argument("output", help="detectron2 weights to write: .pth (recommended) or .pkl")
    p.add_argument(
        "--target",
        choices=["c4", "fpn"],
        default=None,
        help="detector: c4 (res5 in the box head) or fpn; default: from --config, else c4",
    )
    p.add_argument(
        "--fpn",
        action="store_true",
        help="also transfer the FPN convs pre-training trained (ReSim-FPN^T; --target fpn)",
    )
    p.add_argument(
        "--fpn-levels",
        default="p3,p4",
        help="region levels of the ReSim-FPN pre-training (RESIM.REGION.IN_FEATURES); they decide "
        "which FPN convs were trained (default: p3,p4)",
    )
    p.add_argument("--config", default="", help="fine-tuning config the weights are for")
    p.add_argument("-v", "--verbose", action="store_true", help="list moves module by module")
    p.add_argument("--no-check", action="store_true", help="do not build the detector to check")
    p.add_argument("opts", nargs="*", help="KEY VALUE overrides of the check config")
    return p.parse_intermixed_args(argv)


def _target_of(cfg) -> str:
    return "fpn" if "fpn" in cfg.MODEL.BACKBONE.NAME else "c4"


def build_check_config(args, conv_arch: dict, target: str):
    """The fine-tuning config the conversion is checked against (CPU, no weights)."""
    cfg = get_cfg()
    add_resim_config(cfg)
    if args.config:
        cfg.merge_from_file(args.config)
    else:
        cfg.merge_from_file(get_config_file(DEFAULT_CONFIGS[(target, args.fpn)]))
        # the default config describes the checkpoint's network (e.g. a ResNet-18 demo run)
        cfg.merge_from_list([x for kv in conv_arch.items() if kv[1] is not None for x in kv])
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def main(argv=None):
    args = parse_args(argv)
    target = args.target
    check_cfg = None
    if args.config:
        check_cfg = build_check_config(args, {}, target or "c4")
        target = target or _target_of(check_cfg)
    target = target or "c4"
    levels = tuple(x.strip() for x in args.fpn_levels.split(",") if x.strip())
    obj = load_checkpoint(args.input)
    conv = convert_checkpoint(
        obj, target=target, transfer_fpn=args.fpn, fpn_levels=levels, source=args.input
    )
    rec = None
    if not args.no_check:
        if check_cfg is None:
            check_cfg = build_check_config(args, infer_resnet_config(conv), target)
        if check_cfg.MODEL.RESNETS.STRIDE_IN_1X1:
            print(
                "warning: the config has MODEL.RESNETS.STRIDE_IN_1X1 True; these weights put the "
                "stride in the 3x3 conv (set it False)",
                file=sys.stderr,
            )
        model = build_model(check_cfg)
        rec = reconcile(conv, model.state_dict())
        del model
    save_conversion(conv, args.output)
    print(format_report(conv, rec, verbose=args.verbose))
    print("")
    print(f"wrote {os.path.abspath(args.output)} ({len(conv.model)} tensors)")
    return conv


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        # unknown layout, shape mismatch, missing file; a file that is no checkpoint or holds
        # more than weights (resim_d2.checkpoint.safe_load names the file and what it found)
        sys.exit(f"error: {e}")
