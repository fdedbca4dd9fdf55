#!/usr/bin/env python
"""End to end on a CPU: pre-train, convert, fine-tune on every transfer target, evaluate, tables.

1. tiny pre-training of ReSim-C4 and of the MoCo-v2 baseline (configs/pretrain/demo_*_cpu.yaml, on
   the photographs scikit-image ships);
2. tools/convert.py of both checkpoints to detectron2 R18-C4 weights (VOC) and R18-FPN weights
   (COCO, Cityscapes, DensePose);
3. fine-tuning from random init, MoCo-v2 and ReSim of
   * Faster R-CNN R18-C4 on the generated VOC-format dataset, in the full and the frozen-backbone
     settings (configs/finetune/demo_synthetic_voc_R18_C4[_frozen].yaml),
   * Mask R-CNN R18-FPN on generated COCO-format data (demo_synthetic_coco_R18_FPN.yaml),
   * Mask R-CNN R18-FPN on generated data in the Cityscapes layout (demo_synthetic_cityscapes_...),
   * DensePose R-CNN R18-FPN on generated DensePose-COCO data (demo_synthetic_densepose_...; needs
     detectron2's DensePose project, skipped with a note without it);
4. each target's evaluator (detectron2's VOC, COCO and Cityscapes evaluators, DensePose's GPS/GPSm)
   and one table per target of its headline metrics.

Everything runs through tools/train_net.py and tools/convert.py in child processes, as a user
would (the console shows each run's progress with its ETA; a run's whole output goes to
train_net_output.log in its output folder, a conversion's report next to the weights); the COCO,
Cityscapes and DensePose sets are written in their real layouts under <output-dir>/datasets and
found through $DETECTRON2_DATASETS. The numbers come from minutes of CPU training on toy data: they
show the pipeline works, not what ReSim is worth.

    python tools/e2e_demo.py [--output-dir output/e2e] [--pretrain-iters 60] [--finetune-iters 80]
                             [--targets voc coco cityscapes densepose] [--target-iters 30]
"""

import argparse
import importlib.util
import json
import os
import sys
import time

from resim_d2 import get_config_file
from resim_d2.utils.child_run import ChildRunError, run_logged

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAIN = {
    "MoCo-v2": "pretrain/demo_mocov2_cpu.yaml",
    "ReSim-C4": "pretrain/demo_resim_c4_cpu.yaml",
}
VOC = {
    "full": "finetune/demo_synthetic_voc_R18_C4.yaml",
    "frozen": "finetune/demo_synthetic_voc_R18_C4_frozen.yaml",
}
# target -> (config, what it is, [(column, task, metric)])
FPN_TARGETS = {
    "coco": (
        "finetune/demo_synthetic_coco_R18_FPN.yaml",
        "Mask R-CNN R18-FPN on the generated COCO-format set (val), COCO AP",
        [("box AP", "bbox", "AP"), ("AP50", "bbox", "AP50"), ("AP75", "bbox", "AP75")]
        + [("mask AP", "segm", "AP"), ("AP50", "segm", "AP50"), ("AP75", "segm", "AP75")],
    ),
    "cityscapes": (
        "finetune/demo_synthetic_cityscapes_R18_FPN.yaml",
        "Mask R-CNN R18-FPN on the generated Cityscapes-layout set (val), Cityscapes mask AP",
        [("mask AP", "segm", "AP"), ("AP50", "segm", "AP50")],
    ),
    "densepose": (
        "finetune/demo_synthetic_densepose_R18_FPN.yaml",
        "DensePose R-CNN R18-FPN on the generated DensePose-COCO set (minival)",
        [("box AP", "bbox", "AP"), ("GPS AP", "densepose_gps", "AP")]
        + [("GPSm AP", "densepose_gpsm", "AP"), ("AP50", "densepose_gpsm", "AP50")]
        + [("AP75", "densepose_gpsm", "AP75")],
    ),
}
TARGETS = ("voc", *FPN_TARGETS)
LOG_NAME = "train_net_output.log"  # a child's whole output, in its run's output folder
EVAL_TASKS = {"bbox", "segm", "densepose_gps", "densepose_gpsm", "densepose_segm"}


def _run(cmd, log_path, label, env=None):
    """``cmd`` in a child process, its output to ``log_path``, its progress to the console."""
    try:
        run_logged(cmd, log_path, label, env=env)
    except ChildRunError as e:
        sys.exit(str(e))


def _train(config, opts, label, env=None):
    """tools/train_net.py in its own process, as a user would (its output in OUTPUT_DIR/
    train_net_output.log); its last evaluation, as {task: {metric: value}}."""
    cmd = [sys.executable, os.path.join(HERE, "train_net.py"), "--config-file"]
    out = opts[opts.index("OUTPUT_DIR") + 1]
    print(f"\n=== {label}", flush=True)
    _run(cmd + [get_config_file(config)] + opts, os.path.join(out, LOG_NAME), label, env)
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in rows if any(k.split("/")[0] in EVAL_TASKS for k in r)]
    res = {}
    for key, value in (evals[-1] if evals else {}).items():
        task, _, metric = key.partition("/")
        if metric:
            res.setdefault(task, {})[metric] = value
    return res


def _convert(checkpoint, out, target, config):
    """tools/convert.py of ``checkpoint`` to ``out``; its report goes to ``out``.log."""
    cmd = [sys.executable, os.path.join(HERE, "convert.py"), checkpoint, out, "--target", target]
    label = f"convert {os.path.basename(out)}"
    print(f"\n=== {label}", flush=True)
    _run(cmd + ["--config", get_config_file(config)], out + ".log", label)
    return out


def _table(title, header, rows):
    widths = [max(6, len(h)) for h in header]
    lines = ["", title, ""]
    lines.append(
        f"{'setting':8s} {'initialisation':14s} "
        + " ".join(f"{h:>{w}s}" for h, w in zip(header, widths))
    )
    for (setting, name), values in rows.items():
        cells = " ".join(f"{v:{w}.1f}" for v, w in zip(values, widths))
        lines.append(f"{setting:8s} {name:14s} {cells}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default="output/e2e")
    p.add_argument("--pretrain-iters", type=int, default=60)
    p.add_argument("--finetune-iters", type=int, default=80, help="VOC fine-tuning iterations")
    p.add_argument("--target-iters", type=int, default=30, help="COCO/Cityscapes/DensePose ones")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    p.add_argument(
        "--images",
        type=int,
        nargs=2,
        default=(32, 8),
        metavar=("TRAIN", "TEST"),
        help="generated COCO/Cityscapes/DensePose images per training and test split",
    )
    a = p.parse_args()
    t0 = time.time()
    targets = list(a.targets)
    if "densepose" in targets and importlib.util.find_spec("densepose") is None:
        print(
            "\nNOTE: detectron2's DensePose project is not installed: the DensePose target is "
            "skipped (bash run.sh setup --densepose adds it).",
            flush=True,
        )
        targets.remove("densepose")

    pretrained = {}
    for name, config in PRETRAIN.items():
        out = os.path.join(a.output_dir, "pretrain", name)
        it = str(a.pretrain_iters)
        opts = ["OUTPUT_DIR", out, "SOLVER.MAX_ITER", it, "TEST.EVAL_PERIOD", it]
        _train(config, opts, f"pre-train {name}")
        pretrained[name] = os.path.join(out, "model_final.pth")

    tables, results = [], {}
    inits = ["random init", *PRETRAIN]
    if "voc" in targets:
        weights = {"random init": ""}
        for name, ckpt in pretrained.items():
            weights[name] = _convert(
                ckpt, os.path.join(a.output_dir, f"{name}_d2.pth"), "c4", VOC["full"]
            )
        rows = {}
        for setting, config in VOC.items():
            for name in inits:
                out = os.path.join(a.output_dir, "finetune", setting, name.replace(" ", "_"))
                it = str(a.finetune_iters)
                res = _train(
                    config,
                    ["OUTPUT_DIR", out, "MODEL.WEIGHTS", weights[name], "SOLVER.MAX_ITER", it]
                    + ["SEED", "1"],
                    f"fine-tune VOC {setting} from {name}",
                )
                box = res.get("bbox", {})
                rows[(setting, name)] = [box.get(k, float("nan")) for k in ("AP", "AP50", "AP75")]
        title = (
            "Faster R-CNN R18-C4 on the generated VOC-format shapes (test split), VOC07 11-point "
            f"AP\npre-training {a.pretrain_iters} iterations, fine-tuning {a.finetune_iters} "
            "iterations"
        )
        tables += _table(title, ["AP", "AP50", "AP75"], rows)
        results["voc"] = {f"{s}/{n}": v for (s, n), v in rows.items()}

    fpn_targets = [t for t in targets if t in FPN_TARGETS]
    if fpn_targets:
        from resim_d2.utils.synthetic_transfer import write_transfer_datasets

        root = os.path.abspath(os.path.join(a.output_dir, "datasets"))
        train, test = a.images
        write_transfer_datasets(root, fpn_targets, train=train, test=test)
        env = dict(os.environ, DETECTRON2_DATASETS=root)
        weights = {"random init": ""}
        for name, ckpt in pretrained.items():  # the ResNet into backbone.bottom_up (no FPN trained)
            weights[name] = _convert(  # (the three FPN demo detectors share the backbone)
                ckpt,
                os.path.join(a.output_dir, f"{name}_d2_fpn.pth"),
                "fpn",
                FPN_TARGETS["coco"][0],
            )
        for target in fpn_targets:
            config, what, columns = FPN_TARGETS[target]
            rows = {}
            for name in inits:
                out = os.path.join(a.output_dir, "finetune", target, name.replace(" ", "_"))
                opts = ["OUTPUT_DIR", out, "MODEL.WEIGHTS", weights[name], "SEED", "1"]
                opts += ["SOLVER.MAX_ITER", str(a.target_iters)]
                opts += ["SOLVER.STEPS", f"({a.target_iters * 4 // 5},)"]
                res = _train(config, opts, f"fine-tune {target} from {name}", env)
                rows[("full", name)] = [
                    res.get(task, {}).get(metric, float("nan")) for _, task, metric in columns
                ]
            title = f"{what}\nfine-tuning {a.target_iters} iterations"
            tables += _table(title, [c for c, _, _ in columns], rows)
            results[target] = {
                f"full/{n}": dict(zip([f"{t}/{m}" for _, t, m in columns], v))
                for (_, n), v in rows.items()
            }

    tables.append(
        f"\n(total {time.time() - t0:.0f} s; toy data and minutes of CPU: not a benchmark)"
    )
    text = "\n".join(tables)
    print(text)
    os.makedirs(a.output_dir, exist_ok=True)
    with open(os.path.join(a.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(a.output_dir, "results.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
