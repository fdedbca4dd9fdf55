#!/usr/bin/env python
"""Plot ΔAP against the IoU threshold for several VOC runs (the paper's Figure 4).

Each run is ``NAME=PATH``, PATH being the ``voc_ap_per_iou.json`` that
:class:`resim_d2.evaluation.voc_ap_iou.PascalVOCDetectionEvaluatorAllIoU` wrote (or the folder that
holds it, e.g. ``OUTPUT_DIR/inference``). Every run other than the baseline is drawn as
AP(run) − AP(baseline) at each IoU threshold, and the table is printed::

    python tools/plot_ap_iou.py mocov2=out/mocov2/inference resim_c4=out/resim_c4/inference \
        resim_fpn=out/resim_fpn/inference --baseline mocov2 --max-iou 0.9 -o figure4.png
"""

import argparse
import json
import os
import sys

JSON_NAME = "voc_ap_per_iou.json"  # resim_d2.evaluation.voc_ap_iou.JSON_NAME (kept import-free)


def load_run(path):
    """(thresholds, mAP per threshold) from a voc_ap_per_iou.json file or the folder holding it."""
    if os.path.isdir(path):
        path = os.path.join(path, JSON_NAME)
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    thresholds, ap = record["thresholds"], record["ap"]
    if len(thresholds) != len(ap):
        raise ValueError(f"{path}: {len(thresholds)} thresholds but {len(ap)} AP values")
    return [float(t) for t in thresholds], [float(a) for a in ap]


def parse_runs(specs):
    """{name: path} from ``NAME=PATH`` strings, in order."""
    runs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"run '{spec}' is not NAME=PATH")
        if name in runs:
            raise ValueError(f"run name '{name}' given twice")
        runs[name] = path
    return runs


def delta_ap(runs, baseline, max_iou=1.0):
    """ΔAP of every non-baseline run against ``baseline``.

    Args:
        runs: {name: (thresholds, ap)}, all on the same thresholds.
        baseline: a key of ``runs``.
        max_iou: keep thresholds <= this.
    Returns:
        (thresholds, {name: [AP(name) - AP(baseline) per threshold]}).
    """
    if baseline not in runs:
        raise ValueError(f"baseline '{baseline}' is not one of the runs {list(runs)}")
    base_t, base_ap = runs[baseline]
    keep = [i for i, t in enumerate(base_t) if t <= max_iou + 1e-9]
    deltas = {}
    for name, (t, ap) in runs.items():
        if name == baseline:
            continue
        if [round(x, 6) for x in t] != [round(x, 6) for x in base_t]:
            raise ValueError(f"run '{name}' has thresholds {t}, baseline has {base_t}")
        deltas[name] = [ap[i] - base_ap[i] for i in keep]
    return [base_t[i] for i in keep], deltas


def plot(thresholds, deltas, baseline, output, title=None):
    """Write the ΔAP-vs-IoU figure to ``output`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=150)
    markers = "osD^vP*X"
    for i, (name, d) in enumerate(deltas.items()):
        ax.plot(thresholds, d, marker=markers[i % len(markers)], label=name)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel(f"ΔAP vs {baseline}")
    ax.set_xticks(thresholds)
    ax.set_xticklabels([f"{t:.2f}" for t in thresholds], rotation=45)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or f"VOC ΔAP over {baseline} at each IoU threshold")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, format="png")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=PATH", help="voc_ap_per_iou.json or dir")
    parser.add_argument("--baseline", default=None, help="run the others are compared to (first)")
    parser.add_argument("--max-iou", type=float, default=0.95, help="last threshold drawn")
    parser.add_argument("-o", "--output", default="ap_vs_iou.png", help="PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    paths = parse_runs(args.runs)
    if len(paths) < 2:
        parser.error("need the baseline and at least one other run")
    baseline = args.baseline or next(iter(paths))
    runs = {name: load_run(path) for name, path in paths.items()}
    thresholds, deltas = delta_ap(runs, baseline, args.max_iou)

    header = f"{'IoU':>6} {baseline + ' AP':>14} " + " ".join(f"{'Δ' + n:>12}" for n in deltas)
    print(header)
    base_ap = dict(zip(*runs[baseline]))
    for i, t in enumerate(thresholds):
        row = " ".join(f"{deltas[n][i]:>+12.2f}" for n in deltas)
        print(f"{t:>6.2f} {base_ap[t]:>14.2f} {row}")
    plot(thresholds, deltas, baseline, args.output, args.title)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
