#!/usr/bin/env python
"""The README's demo: runs tools/train_net.py on embedded data, no download, CPU is enough.

Until ReSim pre-training lands this is a short smoke run of Faster R-CNN R50-C4 on the generated
VOC-format dataset, followed by VOC evaluation.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_net  # noqa: E402

from resim_d2 import get_config_file  # noqa: E402

from detectron2.engine import default_argument_parser  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output-dir", default="output/demo")
    p.add_argument("--iters", type=int, default=30)
    a = p.parse_args()
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            get_config_file("finetune/smoke_synthetic_voc_R50_C4.yaml"),
            "OUTPUT_DIR",
            a.output_dir,
            "SOLVER.MAX_ITER",
            str(a.iters),
        ]
    )
    train_net.main(args)


if __name__ == "__main__":
    main()
