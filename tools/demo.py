#!/usr/bin/env python
"""The README's demo: a real, small ReSim pre-training on embedded photographs, on CPU, in minutes.

Trains ReSim-C4 (configs/pretrain/demo_resim_c4_cpu.yaml) and, the same way, the MoCo-v2 baseline
(demo_mocov2_cpu.yaml) on the photographs scikit-image ships (no download), then scores region
correspondence of both, and of the untrained network, on the same held-out view pairs, and prints
a summary: the loss curves, the checkpoints, the scores and the paired differences with bootstrap
intervals. Training goes through tools/train_net.py's Trainer.

    python tools/demo.py                 # both runs
    python tools/demo.py --only resim    # ReSim alone
"""

import argparse
import json
import os
import subprocess
import sys

from resim_d2 import get_config_file

RUNS = {"resim": "pretrain/demo_resim_c4_cpu.yaml", "mocov2": "pretrain/demo_mocov2_cpu.yaml"}
FEATURE = "res4"


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


def correspondence(config, opts, weights):
    """Per-pair region correspondence of the model ``config`` + ``opts`` with ``weights`` (None:
    untrained, built with the config's seed), on the config's held-out dataset, in this process.
    Returns (top-1 %, windows, per-pair list)."""
    import torch

    from resim_d2 import add_resim_config
    from resim_d2.engine import Trainer, resolve_pretrain_schedule
    from resim_d2.evaluation.region_correspondence import RegionCorrespondenceEvaluator

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.evaluation import inference_on_dataset

    cfg = get_cfg()
    add_resim_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(opts)
    resolve_pretrain_schedule(cfg)
    torch.manual_seed(cfg.SEED)
    model = Trainer.build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(weights)
    name = cfg.DATASETS.TEST[0]
    evaluator = RegionCorrespondenceEvaluator(
        name, group_size=cfg.RESIM.EVAL.GROUP_SIZE, distributed=False
    )
    res = inference_on_dataset(model, Trainer.build_test_loader(cfg, name), evaluator)
    r = res[f"region_corr_{FEATURE}"]
    return r["top1"], int(r["windows"]), evaluator.per_pair[FEATURE]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default="output/demo")
    p.add_argument("--iters", type=int, default=0, help="override SOLVER.MAX_ITER (0: config's)")
    p.add_argument("--only", choices=list(RUNS), help="train only this one")
    p.add_argument(
        "--eval-pairs", type=int, default=0, help="RESIM.EVAL.PAIRS_PER_IMAGE (0: config's)"
    )
    a = p.parse_args()
    results = {}
    for name, config in RUNS.items():
        if a.only and name != a.only:
            continue
        out = os.path.join(a.output_dir, name)
        opts = ["OUTPUT_DIR", out]
        if a.iters:
            opts += ["SOLVER.MAX_ITER", str(a.iters), "TEST.EVAL_PERIOD", str(a.iters)]
        if a.eval_pairs:
            opts += ["RESIM.EVAL.PAIRS_PER_IMAGE", str(a.eval_pairs)]
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = [sys.executable, os.path.join(here, "train_net.py"), "--config-file"]
        cmd += [get_config_file(config)] + opts
        print(f"\n=== {name}: " + " ".join(cmd) + "\n", flush=True)
        subprocess.run(cmd, check=True)
        results[name] = {
            "rows": _read_metrics(os.path.join(out, "metrics.json")),
            "checkpoint": os.path.join(out, "model_final.pth"),
            "config": get_config_file(config),
            "opts": opts,
        }
    if not results:
        return
    print("\n=== region correspondence of every model on the same held-out view pairs", flush=True)
    first = next(iter(results.values()))
    scores = {"untrained": correspondence(first["config"], first["opts"], None)}  # random init
    for name, r in results.items():
        scores[name] = correspondence(r["config"], r["opts"], r["checkpoint"])

    print("\n================ demo summary ================")
    for name, r in results.items():
        print(f"\n{name}: checkpoint {r['checkpoint']}")
        print(_loss_curve(r["rows"]))
        key = f"region_corr_{FEATURE}/top1"
        # completed iterations: in-training evaluations log the iteration before, the final one
        # (after training) the count itself
        last = max((row["iteration"] + 1 for row in r["rows"] if "total_loss" in row), default=0)
        curve = [(min(row["iteration"] + 1, last), row[key]) for row in r["rows"] if key in row]
        if curve:
            pts = ", ".join(f"{v:.1f}% at iter {it}" for it, v in curve)
            print(f"  correspondence top-1 during training: {pts}")
    windows = scores["untrained"][1]
    print(
        f"\nRegion correspondence ({FEATURE}, held-out photographs, {windows} query windows): "
        "the share of query windows whose nearest key window is their own"
    )
    for name, (top1, _, _) in scores.items():
        print(f"  {name:10s} top-1 {top1:5.1f}%")
    from resim_d2.evaluation.region_correspondence import paired_difference

    for b, a in (("resim", "mocov2"), ("resim", "untrained"), ("mocov2", "untrained")):
        if a in scores and b in scores:
            d, lo, hi = paired_difference(scores[a][2], scores[b][2])
            print(
                f"  {b} minus {a}: {d:+.1f} points (95% interval {lo:+.1f} to {hi:+.1f}, "
                "bootstrap over view pairs)"
            )
    print(
        "\nNext: python tools/convert.py (see README) turns a checkpoint into detectron2 weights."
    )


if __name__ == "__main__":
    main()
