"""A warm trial worker: it starts and loads once, then runs the trials the search hands it until stopped.

    python -m floe_dist.search.worker WORKER_DIR [--trial-module MODULE]            # one process
    torchrun --nproc_per_node 2 -m floe_dist.search.worker WORKER_DIR ...           # a group, for multi-rank trials

The search writes ``WORKER_DIR/task.json`` (``{"seq": n, "trial_dir": ...}``, atomically, before it starts the
worker). Every rank polls it (no collective while idle, so an idle group never hits a communication timeout),
runs each new ``seq`` once through ``MODULE.run_trial(trial_dir, resources)`` (the task's ``module`` when it names
one: spare work, floe_dist/search/spare_work.py) with its output appended to
``<trial_dir>/trial.log``, and rank 0 writes ``<trial_dir>/result.json`` last: the search's sign of success.
The resources (tokenizer, tokenised data, backbone; floe_dist/resources.py) are kept between trials, which
is the point: process start, imports and loading are paid once per worker instead of once per trial.

Isolation: a trial that raises, or whose cost is not finite, ends the worker (exit 1), and the search starts
a fresh one for the next trial, so nothing of a failed trial lives on. A hung trial is killed by the search.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from floe_dist.files import write_json_atomic

TASK = "task.json"


def read_task(worker_dir: Path) -> dict | None:
    try:
        return json.loads((worker_dir / TASK).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def hand_over(worker_dir: Path, seq: int, trial_dir: Path, job: str | None = None, module: str = "") -> None:
    """The search's side: give the worker its next trial (with ``job``: only the Slurm job of that id takes it,
    not a cancelled predecessor that has not died yet; with ``module``: run by that module instead of the trial's)."""
    worker_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(worker_dir / TASK, {"seq": seq, "trial_dir": str(trial_dir), "job": job, "module": module})


@contextmanager
def output_to(log: Path):
    """This process's stdout and stderr (file descriptors, so tqdm and native code too) appended to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def serve(worker_dir: Path, trial_module: str, poll_seconds: float = 0.05) -> int:
    from floe_dist.resources import Resources

    resources = Resources(keep=True)  # the process group, once set up by the first trial, is kept too
    done = -1
    while True:
        task = read_task(worker_dir)
        if task is None or task["seq"] <= done or task.get("job") not in (None, os.environ.get("SLURM_JOB_ID")):
            time.sleep(poll_seconds)
            continue
        done = task["seq"]
        trial_dir = Path(task["trial_dir"])
        with output_to(trial_dir / "trial.log"):
            print(f"[worker {os.getpid()}] trial {trial_dir.name} (task {done}, warm: {len(resources.kept)} kept)",
                  flush=True)
            try:
                result = importlib.import_module(task.get("module") or trial_module).run_trial(trial_dir, resources)
            except BaseException:
                traceback.print_exc()
                return 1
        if result is not None:
            write_json_atomic(trial_dir / "result.json", result)  # last: its presence means success
            if not task.get("module") and not math.isfinite(float(result.get("cost", math.nan))):  # spare: no cost
                return 1  # a diverged trial may have left non-finite state behind: start fresh
        gc.collect()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m floe_dist.search.worker")
    parser.add_argument("worker_dir", type=Path)
    parser.add_argument("--trial-module", required=True, help="search.trial_module: the runner passes the recipe's")
    args, _ = parser.parse_known_args(argv)  # the deepspeed launcher adds --local_rank
    try:
        return serve(args.worker_dir, args.trial_module)
    finally:
        if "torch" in sys.modules:  # a trial that trained: its process group goes (the import costs 1.4 s)
            from floe_dist.distributed.runtime import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
