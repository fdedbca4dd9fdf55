"""Running a test's worker in several gloo processes, and reading back what each one saved."""

import os
import subprocess
import sys
import tempfile
import textwrap

import torch

__all__ = ["run_gloo_workers", "run_without_compat"]


def run_gloo_workers(worker, world: int = 2) -> list:
    """Start ``worker(rank, world, init_file, out_prefix)`` in ``world`` spawned processes (they
    join a gloo group through ``init_file``; each saves its result to ``f"{out_prefix}.{rank}"``
    with ``torch.save``) and return the results in rank order."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            worker,
            args=(world, os.path.join(tmp, "init"), os.path.join(tmp, "r")),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return [torch.load(os.path.join(tmp, f"r.{r}")) for r in range(world)]


def run_without_compat(adaptation: str, code: str, env: dict | None = None):
    """``code`` run after ``import resim_d2`` in a fresh interpreter with the compat
    ``adaptation`` turned off (``RESIM_D2_NO_COMPAT``); the finished ``subprocess`` result."""
    env = dict(os.environ, **(env or {}), RESIM_D2_NO_COMPAT=adaptation)
    return subprocess.run(
        [sys.executable, "-c", "import resim_d2\n" + textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
