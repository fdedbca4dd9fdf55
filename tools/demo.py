#!/usr/bin/env python
"""The README's demo: a real, small ReSim pre-training on embedded photographs, on CPU, in minutes.

Trains ReSim-C4 (configs/pretrain/demo_resim_c4_cpu.yaml) and, the same way, the MoCo-v2 baseline
(demo_mocov2_cpu.yaml) on the photographs scikit-image ships (no download), evaluates region
correspondence on held-out photographs, and prints a summary: the loss curve, the checkpoint, and
the correspondence score of both. Everything goes through tools/train_net.py's Trainer.

    python tools/demo.py                 # both runs (about 5 minutes on 2 cores)
    python tools/demo.py --only resim    # ReSim alone
"""

import argparse
import json
import os
import subprocess
import sys

from resim_d2 import get_config_file

RUNS = {"resim": "pretrain/demo_resim_c4_cpu.yaml", "mocov2": "pretrain/demo_mocov2_cpu.yaml"}


def _read_metrics(path):
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return rows


def _loss_curve(rows, width=40):
    pts = [(r["iteration"], r["total_loss"]) for r in rows if "total_loss" in r]
    if not pts:
        return "  (no losses logged)"
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    lines = []
    for it, v in pts:
        bar = "#" * (1 + int((width - 1) * (v - lo) / max(hi - lo, 1e-9)))
        lines.append(f"  iter {it:4d}  loss {v:7.3f}  {bar}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default="output/demo")
    p.add_argument("--iters", type=int, default=0, help="override SOLVER.MAX_ITER (0: config's)")
    p.add_argument("--only", choices=list(RUNS), help="train only this one")
    a = p.parse_args()
    results = {}
    for name, config in RUNS.items():
        if a.only and name != a.only:
            continue
        out = os.path.join(a.output_dir, name)
        opts = ["OUTPUT_DIR", out]
        if a.iters:
            opts += ["SOLVER.MAX_ITER", str(a.iters), "TEST.EVAL_PERIOD", str(a.iters)]
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = [sys.executable, os.path.join(here, "train_net.py"), "--config-file"]
        cmd += [get_config_file(config)] + opts
        print(f"\n=== {name}: " + " ".join(cmd) + "\n", flush=True)
        subprocess.run(cmd, check=True)
        rows = _read_metrics(os.path.join(out, "metrics.json"))
        evals = [r for r in rows if any(k.startswith("region_corr_res4/") for k in r)]
        results[name] = {
            "rows": rows,
            "top1": evals[-1].get("region_corr_res4/top1") if evals else None,
            "windows": evals[-1].get("region_corr_res4/windows") if evals else None,
            "checkpoint": os.path.join(out, "model_final.pth"),
        }

    print("\n================ demo summary ================")
    for name, r in results.items():
        print(f"\n{name}: checkpoint {r['checkpoint']}")
        print(_loss_curve(r["rows"]))
        if r["top1"] is not None:
            print(
                f"  region correspondence (res4, held-out photographs): top-1 {r['top1']:.1f}% of "
                f"{int(r['windows'])} query windows find their own key window"
            )
    if (
        "resim" in results
        and "mocov2" in results
        and None
        not in (
            results["resim"]["top1"],
            results["mocov2"]["top1"],
        )
    ):
        d = results["resim"]["top1"] - results["mocov2"]["top1"]
        print(f"\nReSim minus MoCo-v2, correspondence top-1: {d:+.1f} points (tiny CPU run)")
    print(
        "\nNext: python tools/convert.py (see README) turns a checkpoint into detectron2 weights."
    )


if __name__ == "__main__":
    main()
