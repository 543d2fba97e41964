"""Does a campaign given ``campaign.budget: job`` end inside its sbatch job, and inside the job's second run after a
requeue? A real Slurm on this machine (tests/slurm_cluster.py: one emulated node), the recipe's campaign rendered and
submitted by ``floe-dist slurm --template campaign``, its stages launched by srun as on a cluster.

    python benchmarks/bench_job_budget.py --time 00:08:00 --requeue-after 300

Two jobs one after the other: one left alone; one requeued (``scontrol requeue``, as a preemption or a node failure
does) once it has run ``--requeue-after`` seconds, which Slurm restarts with the same ``--time``. Per job run: the
seconds from the moment scontrol first showed it running to the moment it showed it ended (polled every second), the
budget the campaign resolved from the time the job had left (its log), and how the run ended. Result:
benchmarks/results/job_budget.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402
from launcher.slurm import slurm_seconds  # noqa: E402
from tests.slurm_cluster import LocalSlurm  # noqa: E402

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
ARMS = ("left alone", "requeued")
RUNNING = ("RUNNING", "COMPLETING")  # a run's processes are still ending while it is COMPLETING


def state(job: str) -> str:
    """The job's state as scontrol shows it (squeue lists no ended job by default)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return out.split("JobState=")[1].split()[0] if "JobState=" in out else "UNKNOWN"


def submit(out: Path, time_limit: str, args: str) -> str:
    """The campaign's job on one node with all its cores; its id."""
    argv = [sys.executable, "-m", "launcher.cli", "slurm", "--action", "submit", "--template", "campaign", "--nodes",
            "1", "--cpus-per-task", str(os.cpu_count()), "--time", time_limit, "--output", str(out), f"--args={args}"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "FLOE_MASTER_ADDR": "127.0.0.1"})  # emulated node names do not resolve
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return proc.stdout.split("submitted job ")[1].split(";")[0].strip()


def follow(job: str, requeue_after: float | None) -> list[dict]:
    """Each run of ``job``: its seconds as scontrol showed it running, and the state it ended in (a requeued run:
    REQUEUED); ``requeue_after``: requeue the first run once it has run that long."""
    runs, began, requeued = [], None, False
    while True:
        now, s = time.time(), state(job)
        if s == "RUNNING" and began is None:
            began = now
        if began is not None and s not in RUNNING:
            runs.append({"seconds": round(now - began, 1), "ended": s if s in (*ENDED, "UNKNOWN") else "REQUEUED"})
            began = None
        if s in ENDED or s == "UNKNOWN":
            return runs
        if requeue_after is not None and not requeued and began is not None and now - began >= requeue_after:
            subprocess.run(["scontrol", "requeue", job], check=True)
            requeued = True
        time.sleep(1)


def budgets(log: str) -> list[str]:
    """The budget line each run of the campaign printed."""
    return [line.split("] ", 1)[1] for line in log.splitlines() if "campaign.budget job: Slurm job" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smollm2-sst2")
    parser.add_argument("--time", default="00:08:00", help="sbatch --time of both jobs")
    parser.add_argument("--requeue-after", type=float, default=300.0,
                        help="seconds the second job runs before it is requeued")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="which jobs to run")
    parser.add_argument("--result", default="job_budget", help="benchmarks/results/NAME.json")
    ns = parser.parse_args()
    limit = slurm_seconds(ns.time)
    args = f"--config {ns.config} --campaign.budget job"
    with tempfile.TemporaryDirectory() as tmp, LocalSlurm(Path(tmp) / "slurm", nodes=1):
        for arm in ns.arms:
            requeue_after = ns.requeue_after if arm == "requeued" else None
            out = Path(tmp) / arm.replace(" ", "_")
            job = submit(out, ns.time, args)
            runs = follow(job, requeue_after)
            log = (out / f"slurm-{job}.out").read_text(errors="replace")  # a requeue may cut a progress bar's bytes
            summary = json.loads((out / "campaign.json").read_text()) if (out / "campaign.json").is_file() else {}
            for run, line in zip(runs, budgets(log)):
                run["budget_line"] = line
            row = {"arm": arm, "time_limit_s": limit, "requeue_after_s": requeue_after, "runs": runs,
                   "final_state": runs[-1]["ended"] if runs else state(job), "restarts": log.count("[floe-dist] job"),
                   "final_accuracy": summary.get("final_accuracy"), "train_steps": summary.get("train_steps"),
                   "stage_seconds": summary.get("stage_seconds"), "log_tail": log[-1500:] if not summary else ""}
            print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
            write_result(ns.result, [row], merge_key="arm")


if __name__ == "__main__":
    main()
