"""The README's demo commands, shrunk to a few iterations (minutes: select with -m slow), and the
demo's choice of CPU precision."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_precision_options(monkeypatch, load_tool):
    demo = load_tool("demo")
    assert demo.cpu_speed_opts("fp32") == ([], "fp32")  # float32: the default layout
    opts, precision = demo.cpu_speed_opts("bf16")
    assert precision == "bf16" and opts[-2:] == ["RESIM.SPEED.AMP_DTYPE", "bfloat16"]
    # auto: bf16 only where the CPU multiplies bfloat16 natively
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert demo.cpu_speed_opts("auto")[1] == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert demo.cpu_speed_opts("auto")[1] == "bf16"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert demo.cpu_speed_opts("auto")[1] == "fp32"  # a torch without the probes


@pytest.mark.slow
def test_demo_pretrains_and_scores_correspondence(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--output-dir", str(tmp_path)]
    cmd += ["--iters", "3", "--eval-pairs", "6", "--seeds", "0", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "demo summary" in out and "Region correspondence" in out
    # all three models scored on the same pairs, paired differences with intervals, per seed
    for line in ("untrained", "resim minus mocov2", "mocov2 minus untrained", "seed 1:"):
        assert line in out, line
    assert "95% interval" in out
    assert "across the 2 seeds" in out and "resim ahead in" in out
    assert "held-out photographs" in out and "pre-training photographs" in out
    assert "region head, what the region loss trains" in out  # the head's output scored too
    for seed in (0, 1):
        for name in ("resim", "mocov2"):
            run = tmp_path / f"seed{seed}" / name
            assert os.path.isfile(run / "model_final.pth")
            # detectron2's dumps go to the run's log file, the console gets progress lines
            log = (run / "train_net_output.log").read_text()
            assert "Starting training from iteration 0" in log and "Running with full config" in log
            assert f"full output in {run / 'train_net_output.log'}" in out
    assert "Running with full config" not in out and "[resim] iter 3  total_loss" in out


@pytest.mark.slow
def test_e2e_demo_prints_a_table_per_target(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "tools", "e2e_demo.py")]
    cmd += ["--output-dir", str(tmp_path), "--pretrain-iters", "2", "--finetune-iters", "4"]
    cmd += ["--target-iters", "2", "--images", "4", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "initialisation" in out
    with open(tmp_path / "results.json") as f:
        tables = json.load(f)
    has_densepose = importlib.util.find_spec("densepose") is not None
    assert set(tables) == {"voc", "coco", "cityscapes"} | (
        {"densepose"} if has_densepose else set()
    )
    inits = ("random init", "MoCo-v2", "ReSim-C4")
    assert set(tables["voc"]) == {f"{s}/{n}" for s in ("full", "frozen") for n in inits}
    assert all(len(v) == 3 for v in tables["voc"].values())
    headline = {
        "coco": "segm/AP",
        "cityscapes": "segm/AP",
        "densepose": "densepose_gpsm/AP",
    }
    for target, metric in headline.items():
        if target in tables:
            assert set(tables[target]) == {f"full/{n}" for n in inits}
            assert all(metric in row for row in tables[target].values())
    for title in ("COCO-format", "Cityscapes-layout"):
        assert title in out
    assert "Running with full config" not in out and "[pre-train ReSim-C4] iter 2" in out
    log = tmp_path / "finetune" / "full" / "ReSim-C4" / "train_net_output.log"
    assert "Running with full config" in log.read_text()
