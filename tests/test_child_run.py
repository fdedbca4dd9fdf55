"""The demos' child runs: the console gets the stages and one line per logged iteration, the log
file everything the child wrote; a failing child names its log and quotes its end."""

import sys

import pytest

from resim_d2.utils.child_run import ChildRunError, progress_line, run_logged

# what tools/train_net.py prints, in detectron2's formats (CommonMetricPrinter, train loop, eval)
CHILD_LINES = [
    "[12/03 17:00:00 d2.engine.defaults]: Model:",
    "ReSim(",
    "  (backbone): ResNet(...)",
    ")",
    "[12/03 17:00:01 d2.engine.train_loop]: Starting training from iteration 0",
    "[12/03 17:00:09 d2.utils.events]:  eta: 0:02:41  iter: 19  total_loss: 8.123  "
    "loss_global: 4.1  time: 0.5381  data_time: 0.0102  lr: 0.0149  max_mem: 0M",
    "[12/03 17:00:19 d2.utils.events]:  eta: 0:02:30  iter: 39  total_loss: 7.5  "
    "loss_global: 3.9  time: 0.5302  data_time: 0.0101  lr: 0.029  max_mem: 0M",
    "[12/03 17:00:20 d2.evaluation.evaluator]: Start inference on 6 batches",
    "[12/03 17:00:22 d2.evaluation.evaluator]: Inference done 3/6. Dataloading: 0.0011 s/iter. "
    "Inference: 0.2 s/iter. Eval: 0.01 s/iter. Total: 0.22 s/iter. ETA=0:00:01",
    "[12/03 17:00:23 d2.evaluation.evaluator]: Inference done 4/6. Dataloading: 0.0011 s/iter. "
    "Inference: 0.2 s/iter. Eval: 0.01 s/iter. Total: 0.22 s/iter. ETA=0:00:00",
    "[12/03 17:00:25 d2.utils.events]:  iter: 299  total_loss: nan  lr: 0.0001",
]


def _child(tmp_path, lines, rc):
    script = tmp_path / "child.py"
    script.write_text(
        "import sys\n"
        f"for line in {lines!r}:\n"
        "    print(line)\n"
        "print('to stderr', file=sys.stderr)\n"
        f"sys.exit({rc})\n"
    )
    return [sys.executable, str(script)]


def test_progress_lines_from_detectron2_formats():
    got = [progress_line(line) for line in CHILD_LINES]
    assert got == [
        None,
        None,
        None,
        None,
        "training",
        "iter 20  total_loss 8.123  eta 0:02:41",  # detectron2 counts from 0
        "iter 40  total_loss 7.500  eta 0:02:30",
        "evaluating",
        "evaluating 3/6  eta 0:00:01",
        "evaluating 4/6  eta 0:00:00",
        "iter 300  total_loss nan",  # no ETA logged: none shown
    ]


def test_console_gets_progress_log_gets_everything(tmp_path, capsys):
    log = tmp_path / "run" / "train_net_output.log"
    run_logged(_child(tmp_path, CHILD_LINES, 0), str(log), "resim")
    console = capsys.readouterr().out.splitlines()
    assert console[0] == f"[resim] running; full output in {log}"
    assert console[1:-1] == [
        "[resim] training",
        "[resim] iter 20  total_loss 8.123  eta 0:02:41",
        "[resim] iter 40  total_loss 7.500  eta 0:02:30",
        "[resim] evaluating",
        "[resim] evaluating 3/6  eta 0:00:01",  # the next one came within eval_every_s
        "[resim] iter 300  total_loss nan",
    ]
    assert console[-1].startswith("[resim] done in ")
    text = log.read_text().splitlines()
    assert text[1:] == CHILD_LINES + ["to stderr"]  # after the command line, all of it in order
    assert "ReSim(" not in "\n".join(console)  # the model dump stays in the log


def test_failing_child_names_its_log_and_keeps_it(tmp_path, capsys):
    log = tmp_path / "train_net_output.log"
    lines = [f"line {i}" for i in range(40)]
    with pytest.raises(ChildRunError) as e:
        run_logged(_child(tmp_path, lines, 3), str(log), "mocov2", tail_lines=5)
    msg = str(e.value)
    assert "exit code 3" in msg and str(log) in msg
    assert msg.splitlines()[1:] == ["line 36", "line 37", "line 38", "line 39", "to stderr"]
    assert log.read_text().splitlines()[1:] == lines + ["to stderr"]
