#!/usr/bin/env python
"""End to end on a CPU: pre-train, convert, fine-tune, evaluate, and one table.

1. tiny pre-training of ReSim-C4 and of the MoCo-v2 baseline (configs/pretrain/demo_*_cpu.yaml, on
   the photographs scikit-image ships);
2. tools/convert.py of both checkpoints to detectron2 R18-C4 weights;
3. fine-tuning of Faster R-CNN R18-C4 from random init, MoCo-v2 and ReSim, in the full and the
   frozen-backbone settings (configs/finetune/demo_synthetic_voc_R18_C4[_frozen].yaml), on the
   generated VOC-format dataset;
4. VOC evaluation (detectron2's PascalVOCDetectionEvaluator) and a table of AP / AP50 / AP75.

Everything runs through tools/train_net.py and tools/convert.py, as a user would. The numbers come
from minutes of CPU training on toy data: they show the pipeline works, not what ReSim is worth.

    python tools/e2e_demo.py [--output-dir output/e2e] [--pretrain-iters 60] [--finetune-iters 80]
"""

import argparse
import json
import os
import subprocess
import sys
import time

from resim_d2 import get_config_file

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAIN = {
    "MoCo-v2": "pretrain/demo_mocov2_cpu.yaml",
    "ReSim-C4": "pretrain/demo_resim_c4_cpu.yaml",
}
FINETUNE = {
    "full": "finetune/demo_synthetic_voc_R18_C4.yaml",
    "frozen": "finetune/demo_synthetic_voc_R18_C4_frozen.yaml",
}


def _train(config, opts):
    """Run tools/train_net.py in its own process, as a user would; returns its last evaluation."""
    cmd = [sys.executable, os.path.join(HERE, "train_net.py"), "--config-file"]
    cmd += [get_config_file(config)] + opts
    print("\n=== " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    out = opts[opts.index("OUTPUT_DIR") + 1]
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in rows if "bbox/AP" in r]
    return (
        {"bbox": {k[5:]: v for k, v in evals[-1].items() if k.startswith("bbox/")}} if evals else {}
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default="output/e2e")
    p.add_argument("--pretrain-iters", type=int, default=60)
    p.add_argument("--finetune-iters", type=int, default=80)
    a = p.parse_args()
    t0 = time.time()
    weights = {"random init": ""}
    for name, config in PRETRAIN.items():
        out = os.path.join(a.output_dir, "pretrain", name)
        it = str(a.pretrain_iters)
        _train(config, ["OUTPUT_DIR", out, "SOLVER.MAX_ITER", it, "TEST.EVAL_PERIOD", it])
        converted = os.path.join(a.output_dir, f"{name}_d2.pth")
        cmd = [
            sys.executable,
            os.path.join(HERE, "convert.py"),
            os.path.join(out, "model_final.pth"),
            converted,
            "--target",
            "c4",
            "--config",
            get_config_file(FINETUNE["full"]),
        ]
        print("\n=== " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        weights[name] = converted

    table = {}
    for setting, config in FINETUNE.items():
        for name, w in weights.items():
            out = os.path.join(a.output_dir, "finetune", setting, name.replace(" ", "_"))
            it = str(a.finetune_iters)
            res = _train(
                config,
                ["OUTPUT_DIR", out, "MODEL.WEIGHTS", w, "SOLVER.MAX_ITER", it, "SEED", "1"],
            )
            box = res.get("bbox", {})
            table[(setting, name)] = [box.get(k, float("nan")) for k in ("AP", "AP50", "AP75")]

    lines = [
        "",
        "Faster R-CNN R18-C4 on the generated VOC-format shapes (test split), VOC07 11-point AP",
        f"pre-training {a.pretrain_iters} iterations, fine-tuning {a.finetune_iters} iterations",
        "",
        f"{'setting':8s} {'initialisation':14s} {'AP':>6s} {'AP50':>6s} {'AP75':>6s}",
    ]
    for (setting, name), (ap, ap50, ap75) in table.items():
        lines.append(f"{setting:8s} {name:14s} {ap:6.1f} {ap50:6.1f} {ap75:6.1f}")
    lines.append(
        f"\n(total {time.time() - t0:.0f} s; toy data and minutes of CPU: not a benchmark)"
    )
    text = "\n".join(lines)
    print(text)
    os.makedirs(a.output_dir, exist_ok=True)
    with open(os.path.join(a.output_dir, "results.json"), "w") as f:
        json.dump({f"{s}/{n}": v for (s, n), v in table.items()}, f, indent=1)
    with open(os.path.join(a.output_dir, "results.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
