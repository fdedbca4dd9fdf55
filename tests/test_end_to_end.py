"""The README's demo commands, shrunk to a few iterations (minutes: select with -m slow)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_pretrains_and_scores_correspondence(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--output-dir", str(tmp_path)]
    cmd += ["--iters", "4", "--eval-pairs", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "demo summary" in out and "Region correspondence" in out
    # all three models scored on the same pairs, paired differences with intervals
    for line in ("untrained", "resim minus mocov2", "mocov2 minus untrained"):
        assert line in out, line
    assert "95% interval" in out
    for name in ("resim", "mocov2"):
        assert os.path.isfile(tmp_path / name / "model_final.pth")


@pytest.mark.slow
def test_e2e_demo_prints_the_table(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "tools", "e2e_demo.py")]
    cmd += ["--output-dir", str(tmp_path), "--pretrain-iters", "2", "--finetune-iters", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "initialisation" in out
    with open(tmp_path / "results.json") as f:
        table = json.load(f)
    assert set(table) == {
        f"{s}/{n}" for s in ("full", "frozen") for n in ("random init", "MoCo-v2", "ReSim-C4")
    }
    assert all(len(v) == 3 for v in table.values())
