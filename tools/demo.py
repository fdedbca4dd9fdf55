#!/usr/bin/env python
"""The README's demo: a real, small ReSim pre-training on embedded photographs, on CPU, in minutes.

Trains ReSim-C4 (configs/pretrain/demo_resim_c4_cpu.yaml) and, the same way, the MoCo-v2 baseline
(demo_mocov2_cpu.yaml) on the photographs scikit-image ships (no download), then scores region
correspondence of both, and of the untrained network, on the same view pairs: of held-out
photographs, and new pairs of the pre-training photographs; on the raw res4 map (all models) and on
the region head's output (what ReSim's region loss trains; ReSim and the untrained network, which
is built from ReSim's config). Prints a summary: the loss curves, the checkpoints, the scores and
the paired differences with bootstrap intervals (per seed and across seeds with --seeds). Training
goes through tools/train_net.py in a child process: the console shows its progress (iteration,
loss, ETA), and its whole output goes to train_net_output.log in the run's output folder.

    python tools/demo.py                 # both runs
    python tools/demo.py --only resim    # ReSim alone
    python tools/demo.py --seeds 0 1 2   # both runs for each of three seeds
"""

import argparse
import datetime
import json
import os
import sys
import time

from resim_d2 import get_config_file
from resim_d2.utils.child_run import ChildRunError, run_logged

RUNS = {"resim": "pretrain/demo_resim_c4_cpu.yaml", "mocov2": "pretrain/demo_mocov2_cpu.yaml"}
FEATURE = "res4"
LOG_NAME = "train_net_output.log"  # the child's whole output, in each run's output folder


def cpu_speed_opts(precision):
    """Config options for the fastest faithful CPU step: bfloat16 autocast with channels-last
    when ``precision`` is "bf16", or "auto" and the CPU multiplies bfloat16 natively (AMX or
    AVX512-BF16; elsewhere oneDNN emulates it and bf16 is slower than fp32); otherwise float32 in
    the default layout, where the batch-norm groups (RESIM.BN_GROUP_IMAGES) cost no copy and
    float32 convolutions are no slower than channels-last.
    Returns (opts, "bf16" or "fp32")."""
    import torch

    if precision == "auto":
        native = False
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
            try:
                native = native or bool(getattr(torch.cpu, probe)())
            except (AttributeError, RuntimeError):  # older torch: no probe, stay in fp32
                pass
        precision = "bf16" if native else "fp32"
    if precision == "bf16":
        return ["RESIM.SPEED.CHANNELS_LAST", "True", "RESIM.SPEED.AMP_DTYPE", "bfloat16"], precision
    return [], precision


def _read_metrics(path):
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return rows


def _loss_curve(rows, width=40):
    # iterations counted from 1, as the progress lines and the correspondence curve count them
    pts = [(r["iteration"] + 1, r["total_loss"]) for r in rows if "total_loss" in r]
    if not pts:
        return "  (no losses logged)"
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    lines = []
    for it, v in pts:
        bar = "#" * (1 + int((width - 1) * (v - lo) / max(hi - lo, 1e-9)))
        lines.append(f"  iter {it:4d}  loss {v:7.3f}  {bar}")
    return "\n".join(lines)


def correspondence(config, opts, weights, on_train_images=False):
    """Per-pair region correspondence of the model ``config`` + ``opts`` with ``weights`` (None:
    untrained, built with the config's seed), in this process: on the config's held-out dataset,
    or with ``on_train_images`` on new view pairs of its pre-training images (as many pairs in
    all as the held-out evaluation has). Returns {source: (top-1 %, windows, per-pair list)} for
    the sources the model has: "map" (the raw backbone map) and "head" (its region head)."""
    import torch

    from resim_d2 import add_resim_config
    from resim_d2.engine import Trainer, resolve_pretrain_schedule
    from resim_d2.evaluation.region_correspondence import RegionCorrespondenceEvaluator

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import inference_on_dataset

    cfg = get_cfg()
    add_resim_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(opts)
    resolve_pretrain_schedule(cfg)
    name = cfg.DATASETS.TEST[0]
    if on_train_images:
        train = cfg.DATASETS.TRAIN[0]
        pairs = cfg.RESIM.EVAL.PAIRS_PER_IMAGE * len(DatasetCatalog.get(name))
        cfg.RESIM.EVAL.PAIRS_PER_IMAGE = max(1, round(pairs / len(DatasetCatalog.get(train))))
        name = train
    torch.manual_seed(cfg.SEED)
    model = Trainer.build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(weights)
    evaluator = RegionCorrespondenceEvaluator(
        name, group_size=cfg.RESIM.EVAL.GROUP_SIZE, distributed=False
    )
    res = inference_on_dataset(model, Trainer.build_test_loader(cfg, name), evaluator)
    out = {}
    for source, key in SOURCES.items():
        r = res.get(f"region_corr_{key}")
        if r is not None:
            out[source] = (r["top1"], int(r["windows"]), evaluator.per_pair[key])
    return out


PAIRS = (("resim", "mocov2"), ("resim", "untrained"), ("mocov2", "untrained"))
# what the summary scores -> the evaluator's key
SOURCES = {"map": FEATURE, "head": f"head_{FEATURE}"}


def _train(name, config, out, opts):
    """One training run through tools/train_net.py, its output in ``out``/train_net_output.log and
    its progress on the console; returns what the summary needs."""
    opts = ["OUTPUT_DIR", out] + opts
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "train_net.py"), "--config-file"]
    cmd += [get_config_file(config)] + opts
    print(f"\n=== {name}: training ({config})", flush=True)
    try:
        run_logged(cmd, os.path.join(out, LOG_NAME), name)
    except ChildRunError as e:
        sys.exit(str(e))
    return {
        "rows": _read_metrics(os.path.join(out, "metrics.json")),
        "checkpoint": os.path.join(out, "model_final.pth"),
        "config": get_config_file(config),
        "opts": opts,
    }


def _print_run(name, r):
    print(f"\n{name}: checkpoint {r['checkpoint']}")
    print(_loss_curve(r["rows"]))
    # completed iterations: in-training evaluations log the iteration before, the final one
    # (after training) the count itself
    last = max((row["iteration"] + 1 for row in r["rows"] if "total_loss" in row), default=0)
    for source, name in SOURCES.items():
        key = f"region_corr_{name}/top1"
        curve = [(min(row["iteration"] + 1, last), row[key]) for row in r["rows"] if key in row]
        if curve:
            pts = ", ".join(f"{v:.1f}% at iter {it}" for it, v in curve)
            what = "res4 map" if source == "map" else "region head"
            print(f"  correspondence top-1 during training ({what}): {pts}")


# what the summary calls each evaluation -> correspondence(on_train_images=...)
EVAL_SETS = {
    "held-out photographs": False,
    "new view pairs of the pre-training photographs": True,
}


def _summarise(label, by_seed, source="map"):
    """Print the scores of every model on one evaluation set, per seed and across seeds, of one
    embedding: "map" (the raw res4 map) or "head" (the region head's output)."""
    from resim_d2.evaluation.region_correspondence import paired_difference

    by_seed = {
        seed: {n: r[source] for n, r in s.items() if source in r} for seed, s in by_seed.items()
    }
    if not any(by_seed.values()):
        return
    windows = next(iter(next(iter(by_seed.values())).values()))[1]
    what = FEATURE if source == "map" else f"{FEATURE} region head, what the region loss trains"
    print(
        f"\nRegion correspondence ({what}; {label}, {windows} query windows): the share of "
        "query windows whose nearest key window is their own"
    )
    diffs = {pair: [] for pair in PAIRS}
    for seed, s in by_seed.items():
        if seed is not None:
            print(f" seed {seed}:")
        for name, (top1, _, _) in s.items():
            print(f"  {name:10s} top-1 {top1:5.1f}%")
        for b, base in PAIRS:
            if base in s and b in s:
                d, lo, hi = paired_difference(s[base][2], s[b][2])
                diffs[(b, base)].append(d)
                print(
                    f"  {b} minus {base}: {d:+.1f} points (95% interval {lo:+.1f} to {hi:+.1f}, "
                    "bootstrap over view pairs)"
                )
    if len(by_seed) > 1:
        print(f" across the {len(by_seed)} seeds:")
        for (b, base), ds in diffs.items():
            if ds:
                ahead = sum(d > 0 for d in ds)
                print(
                    f"  {b} minus {base}: mean {sum(ds) / len(ds):+.1f} points, from "
                    f"{min(ds):+.1f} to {max(ds):+.1f}; {b} ahead in {ahead} of {len(ds)}"
                )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default="output/demo")
    p.add_argument("--iters", type=int, default=0, help="override SOLVER.MAX_ITER (0: config's)")
    p.add_argument("--only", choices=list(RUNS), help="train only this one")
    p.add_argument(
        "--eval-pairs", type=int, default=0, help="RESIM.EVAL.PAIRS_PER_IMAGE (0: config's)"
    )
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bfloat16 autocast where the CPU has AMX or AVX512-BF16, else fp32",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="train both models once per seed (SEED) and compare across seeds (default: the "
        "config's seed, one run each)",
    )
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config options for both runs, as KEY VALUE pairs at the end",
    )
    a = p.parse_args()
    speed_opts, precision = cpu_speed_opts(a.precision)
    layout = "channels-last" if "RESIM.SPEED.CHANNELS_LAST" in speed_opts else "default layout"
    print(f"[demo] precision {precision}, {layout}", flush=True)
    common = speed_opts + list(a.opts)
    if a.iters:
        common += ["SOLVER.MAX_ITER", str(a.iters), "TEST.EVAL_PERIOD", str(a.iters)]
    if a.eval_pairs:
        common += ["RESIM.EVAL.PAIRS_PER_IMAGE", str(a.eval_pairs)]
    seeds = a.seeds or [None]
    runs = {}  # seed -> name -> run
    for seed in seeds:
        opts = common + (["SEED", str(seed)] if seed is not None else [])
        root = a.output_dir if seed is None else os.path.join(a.output_dir, f"seed{seed}")
        for name, config in RUNS.items():
            if not a.only or name == a.only:
                out = os.path.join(root, name)
                runs.setdefault(seed, {})[name] = _train(name, config, out, opts)
    if not runs:
        return

    print("\n=== region correspondence of every model on the same view pairs", flush=True)
    scores = {}  # eval set -> seed -> name -> source -> (top1, windows, per_pair)
    total = sum(len(EVAL_SETS) * (1 + len(results)) for results in runs.values())
    done, t0 = 0, time.time()
    for seed, results in runs.items():
        first = next(iter(results.values()))
        for label, on_train in EVAL_SETS.items():
            # the untrained network of this seed (the runs' common initialisation) first
            models = [("untrained", first["config"], first["opts"], None)]
            models += [(n, r["config"], r["opts"], r["checkpoint"]) for n, r in results.items()]
            for n, c, o, w in models:
                seed_note = "" if seed is None else f" (seed {seed})"
                scores.setdefault(label, {}).setdefault(seed, {})[n] = correspondence(
                    c, o, w, on_train_images=on_train
                )
                done += 1
                eta = (time.time() - t0) / done * (total - done)
                print(
                    f"[correspondence] {done}/{total}: {n}{seed_note} on the {label}  "
                    f"eta {datetime.timedelta(seconds=round(eta))}",
                    flush=True,
                )

    print("\n================ demo summary ================")
    for seed, results in runs.items():
        for name, r in results.items():
            _print_run(name if seed is None else f"{name} (seed {seed})", r)
    for source in SOURCES:
        for label, by_seed in scores.items():
            _summarise(label, by_seed, source)
    print(
        "\nThe intervals cover the choice of view pairs for one trained model, not the randomness "
        "of training: runs that differ only in SEED can differ by more than these intervals "
        "(--seeds trains several). The pre-training photographs' new views show what the "
        "objective learned; the held-out photographs, whether it carries over to other images."
    )
    print(
        "\nNext: python tools/convert.py turns a checkpoint into detectron2 weights "
        "(docs/transfer.md)."
    )


if __name__ == "__main__":
    main()
