"""Run a tool (tools/train_net.py, tools/convert.py) as a child process for the demos: its whole
output (model dump, config dump, detectron2's per-iteration log) goes to a log file, and the
console gets one progress line per logged training iteration, with the run's ETA.

detectron2's ``CommonMetricPrinter`` logs lines like
``... d2.utils.events]:  eta: 0:01:23  iter: 19  total_loss: 5.31  ...``; :func:`progress_line`
turns one into ``iter 20  total_loss 5.310  eta 0:01:23`` (iterations counted from 1).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

__all__ = ["ChildRunError", "progress_line", "run_logged"]

_ITER = re.compile(r"\biter: (\d+)\b")
_ETA = re.compile(r"\beta: (\S+)")
_LOSS = re.compile(r"\btotal_loss: (\S+)")
_INFERENCE = re.compile(r"Inference done (\d+)/(\d+)\..*\bETA=(\S+)")
# a child's log line containing this -> the stage it announces
STAGES = {"Starting training from iteration": "training", "Start inference on": "evaluating"}


class ChildRunError(RuntimeError):
    """A child tool exited with an error; the message names its log file and quotes its end."""


def progress_line(line: str) -> str | None:
    """The progress summary of one line of a child's output: the stage a line of :data:`STAGES`
    announces, the batches done and ETA of an evaluation, the iteration, loss and ETA of
    detectron2's per-iteration metrics line; else None."""
    for marker, stage in STAGES.items():
        if marker in line:
            return stage
    m = _INFERENCE.search(line)
    if m is not None:  # detectron2's inference_on_dataset, every 5 s
        return f"evaluating {m.group(1)}/{m.group(2)}  eta {m.group(3)}"
    m = _ITER.search(line)
    if m is None or "total_loss" not in line:
        return None
    parts = [f"iter {int(m.group(1)) + 1}"]
    loss = _LOSS.search(line)
    if loss:
        try:
            parts.append(f"total_loss {float(loss.group(1)):.3f}")
        except ValueError:  # "nan" parses; anything else is shown as logged
            parts.append(f"total_loss {loss.group(1)}")
    eta = _ETA.search(line)
    if eta:
        parts.append(f"eta {eta.group(1)}")
    return "  ".join(parts)


def run_logged(cmd, log_path, label, env=None, tail_lines=30, out=None, eval_every_s=30.0):
    """Run ``cmd`` with stdout and stderr appended to ``log_path``; print ``[label]`` lines to
    ``out`` (default stdout): the log's path, the stages, one line per logged iteration, an
    evaluation's progress at most every ``eval_every_s`` seconds, and the elapsed time at the end.
    On a non-zero exit raise :class:`ChildRunError` with the log's last ``tail_lines`` lines (the
    log file stays, with everything the child wrote)."""
    out = out or sys.stdout
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")  # lines as they come
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    print(f"[{label}] running; full output in {log_path}", file=out, flush=True)
    t0 = time.time()
    tail = []
    last_eval = -float("inf")
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        )
        for line in proc.stdout:
            log.write(line)
            log.flush()  # the log follows the run (tail -f), and survives this process
            tail = (tail + [line.rstrip("\n")])[-tail_lines:]
            summary = progress_line(line)
            if summary and summary.startswith("evaluating "):
                if time.time() - last_eval < eval_every_s:
                    continue
                last_eval = time.time()
            if summary:
                print(f"[{label}] {summary}", file=out, flush=True)
        rc = proc.wait()
    if rc != 0:
        raise ChildRunError(
            f"[{label}] failed (exit code {rc}); full output in {log_path}; its last lines:\n"
            + "\n".join(tail)
        )
    print(f"[{label}] done in {time.time() - t0:.0f} s", file=out, flush=True)
