"""A campaign inside an sbatch job: ``campaign.budget job`` spends the time the job has left, and a duration that
would outlast the job is refused before any stage (launcher/campaign.py ``budget_in_job``). The job's time left
comes from squeue: a stand-in squeue here, the real one in a job of the local Slurm (test_cluster_ops.py)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from floe_dist.config import duration_seconds
from floe_dist.recipe import load_recipe
from launcher.campaign import JOB_END_MARGIN, budget_in_job
from tests.conftest import run_here


@pytest.fixture
def job(tmp_path, monkeypatch):
    """Inside Slurm job 77, whose squeue reports the time left given to ``job.set_left``; each call is logged."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    left, calls = tmp_path / "left", tmp_path / "calls"
    squeue.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncat {left}\n')
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")

    class Job:
        def set_left(self, text: str) -> None:
            left.write_text(text + "\n")

        def calls(self) -> list[str]:
            return calls.read_text().splitlines() if calls.is_file() else []
    return Job()


def test_slurm_times_are_durations():
    assert duration_seconds("1-02:03:04", "k") == 93784  # squeue's %L and sbatch --time: D-HH:MM:SS
    assert duration_seconds("1-02", "k") == 93600 and duration_seconds("1-02:03", "k") == 93780
    assert duration_seconds("2:03:04", "k") == 7384 and duration_seconds("03:04", "k") == 184


def test_a_job_budget_is_what_the_job_has_left_on_top_of_the_finished_stages(job, tmp_path):
    tiny = load_recipe("tiny", ["--campaign.budget", "job"])
    job.set_left("1:04:00")
    assert budget_in_job(tiny, tmp_path / "fresh").campaign.budget == f"{3840 - JOB_END_MARGIN:.0f}"
    assert job.calls() == ["--noheader --jobs 77 --format %L"]
    requeued = tmp_path / "requeued"  # a requeued job: its earlier run's finished stages count as spent
    requeued.mkdir()
    (requeued / "prepare.json").write_text(json.dumps({"_seconds": 30.0}))
    (requeued / "zero_shot.json").write_text(json.dumps({"accuracy": 0.5, "_seconds": 12.5}))
    job.set_left("1-00:00:00")
    assert float(budget_in_job(tiny, requeued).campaign.budget) == pytest.approx(86400 - JOB_END_MARGIN + 42.5,
                                                                                  abs=0.5)
    fixed = load_recipe("tiny", ["--campaign.budget", "50m"])
    job.set_left("1:00:00")
    assert budget_in_job(fixed, tmp_path / "fresh") is fixed  # fits the job: unchanged
    job.set_left("UNLIMITED")
    assert budget_in_job(fixed, tmp_path / "fresh") is fixed
    with pytest.raises(ValueError, match="Slurm job 77 has no time limit; give a duration"):
        budget_in_job(tiny, tmp_path / "fresh")
    job.set_left("0:50")
    with pytest.raises(ValueError, match="has 50s left, no more than the 60s the campaign keeps to end in"):
        budget_in_job(tiny, tmp_path / "fresh")


def test_a_budget_the_job_cannot_hold_or_a_job_budget_outside_a_job_is_refused_before_any_stage(job, tmp_path,
                                                                                              monkeypatch):
    out = tmp_path / "c"
    tiny = ["campaign", "--config", "tiny", "--output", str(out)]
    job.set_left("1:00:00")
    proc = run_here([*tiny, "--campaign.budget", "2h"])
    assert proc.returncode == 2 and "campaign.budget 2h leaves 7200s to spend, but Slurm job 77 ends in 3600s (60s " \
        "of it kept to end in): give sbatch a longer --time, a smaller budget, or campaign.budget job" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    job.set_left("0:40")  # read, then refused as any budget below the stages' starts is
    proc = run_here([*tiny, "--campaign.budget", "job"])
    assert proc.returncode == 2 and "no more than the 60s" in proc.stderr and not out.exists()
    proc = run_here([*tiny, "--campaign.budget", "job", "--print_config"])  # nothing to judge before the job
    assert proc.returncode == 0 and "budget: job" in proc.stdout
    monkeypatch.delenv("SLURM_JOB_ID")
    proc = run_here([*tiny, "--campaign.budget", "job"])
    assert proc.returncode == 2 and "campaign.budget job spends the time an sbatch job has left: run the campaign " \
        "in one (floe-dist slurm --template campaign), or give a duration such as 2h" in proc.stderr
    assert not out.exists() and len(job.calls()) == 2
    proc = run_here([*tiny, "--campaign.budget", "2d"])
    assert proc.returncode == 2 and "or job (an sbatch job's time left)" in proc.stderr and not out.exists()


def test_an_sbatch_script_whose_time_cannot_hold_the_campaigns_budget_is_refused_when_rendered(tmp_path):
    """Before the job waits in the queue: --time must hold the budget, the campaign's start and its end."""
    render = ["slurm", "--action", "render", "--template", "campaign", "--nodes", "1", "--tasks-per-node", "1",
              "--gpus-per-node", "0", "--output", str(tmp_path)]
    proc = run_here([*render, "--time", "02:00:00", "--args=--config tiny --campaign.budget 2h"])
    assert proc.returncode == 2 and "--time 02:00:00 (7200s) cannot hold campaign.budget 2h (7200s) with the " \
        "campaign's start and end (60s and 60s): give --time 2:02:00 or more, or --campaign.budget job" in proc.stderr
    assert not (tmp_path / "campaign.sbatch").exists()
    proc = run_here([*render, "--time", "30", "--args=--config tiny --campaign.budget 20m"])  # sbatch: 30 minutes
    assert proc.returncode == 0 and "#SBATCH --time=30" in (tmp_path / "campaign.sbatch").read_text()
    for fits in ("--time 2:02:00 --args=--campaign.budget=2h", "--time 1:00:00 --args=--campaign.budget=job"):
        assert run_here([*render, *fits.split()]).returncode == 0
