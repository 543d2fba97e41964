"""Cluster operations against a real local 2-node Slurm: rendered sbatch scripts, requeue, bad inputs."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from launcher.cluster import parse_hostfile, render_hostfile, slurm_hosts
from tests.conftest import RESUMABLE_RUN, read_metrics, run_floe

EMULATED = {"FLOE_MASTER_ADDR": "127.0.0.1"}  # emulated node names do not resolve


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return out.split("JobState=")[1].split()[0] if "JobState=" in out else "UNKNOWN"


def wait_for(job_id: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {job_state(job_id)} after {timeout}s")


def submit(out: Path, *flags: str) -> str:
    proc = run_floe(["slurm", "--action", "submit", "--output", str(out), *flags], env=EMULATED)
    return proc.stdout.split("submitted job ")[1].split(";")[0].strip()


def test_rendered_campaign_runs_as_a_two_node_job(slurm, tmp_path):
    job = submit(tmp_path, "--template", "campaign", "--nodes", "2", "--args=--preset tiny --no-search")
    state = wait_for(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "on node[1-2]" in log
    summary = json.loads((tmp_path / "campaign.json").read_text())
    assert summary["ranks"] == 2 and 0 <= summary["final_accuracy"] <= 1
    assert json.loads((tmp_path / "train" / "train.json").read_text())["world_size"] == 2
    assert (tmp_path / "train" / "adapter" / "export.json").is_file()


def test_requeued_training_resumes_the_same_loss_curve(slurm, uninterrupted_run, tmp_path):
    """`scontrol requeue` mid-training: the rerun script resumes from the last checkpoint and the
    curve equals an uninterrupted 2-rank run's (dropout on)."""
    job = submit(tmp_path, "--template", "train", "--nodes", "2", f"--args={shlex.join(RESUMABLE_RUN)}")
    deadline = time.time() + 300
    while not (tmp_path / "metrics.jsonl").is_file() or len(read_metrics(tmp_path)) < 12:
        if time.time() > deadline or job_state(job) not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise TimeoutError(f"job {job} is {job_state(job)} and has not reached step 12")
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", job], check=True)
    state = wait_for(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "restart 1" in log and "resumed from" in log
    requeued, uninterrupted = read_metrics(tmp_path), read_metrics(uninterrupted_run)
    assert [m["step"] for m in requeued] == list(range(1, 41))
    for a, b in zip(uninterrupted, requeued):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])


def test_hostfile_from_a_slurm_node_list(slurm, tmp_path):
    assert slurm_hosts("node[1-2]") == ["node1", "node2"]
    path = tmp_path / "hostfile"
    run_floe(["slurm", "--action", "hostfile", "--nodelist", "node[1-2]", "--slots", "4", "--hostfile", str(path)])
    assert parse_hostfile(path) == {"node1": 4, "node2": 4}


def test_rendered_deepspeed_launch_runs_over_two_nodes(slurm, tmp_path):
    """train.sbatch with --launch deepspeed: a hostfile from the allocation, then the deepspeed
    launcher's slurm backend starts one rank per node."""
    job = submit(tmp_path, "--template", "train", "--nodes", "2", "--launch", "deepspeed",
                 "--args=--model tiny --steps 2 --micro-batch 2")
    state = wait_for(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert parse_hostfile(tmp_path / "hostfile") == {"node1": 1, "node2": 1}
    assert json.loads((tmp_path / "train.json").read_text())["world_size"] == 2


def test_rendered_deepspeed_launch_uses_the_hostfile(tmp_path):
    run_floe(["slurm", "--action", "render", "--template", "train", "--nodes", "2", "--tasks-per-node", "8",
              "--gpus-per-node", "8", "--launch", "deepspeed", "--partition", "gpu", "--output", str(tmp_path),
              "--args=--model x --zero 3"])
    script = (tmp_path / "train.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --requeue" in script
    assert f"--hostfile {tmp_path}/hostfile" in script and "--launcher slurm" in script
    assert "--slots 8" in script and f"--output {tmp_path}" in script


@pytest.mark.parametrize("text,message", [
    ("node1 slots=4\nnode2 slots=x\n", "line 2"),
    ("node1:4\n", "is not 'hostname slots=N'"),
    ("node1 slots=4\nnode1 slots=2\n", "listed twice"),
    ("# only a comment\n", "no hosts"),
], ids=["slots", "syntax", "duplicate", "empty"])
def test_bad_hostfiles_are_refused(tmp_path, text, message):
    path = tmp_path / "hostfile"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_hostfile(path)


def test_bad_cluster_inputs_fail_clearly(tmp_path):
    cases = [
        (["slurm", "--nodes", "0", "--output", str(tmp_path / "a")], "--nodes must be >= 1"),
        (["slurm", "--time", "soon", "--output", str(tmp_path / "b")], "is not [D-]HH:MM:SS"),
        (["slurm", "--args=--output elsewhere", "--output", str(tmp_path / "c")], "must not set --output"),
        (["slurm", "--launch", "deepspeed", "--output", str(tmp_path / "f")], "applies to the train template"),
        (["campaign", "--nodes", "2", "--output", str(tmp_path / "d")], "needs --launcher srun"),
    ]
    for argv, message in cases:
        proc = run_floe(argv, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    no_slurm = {"PATH": "/usr/bin/nonexistent"}
    proc = run_floe(["slurm", "--action", "submit", "--output", str(tmp_path / "e")], check=False, env=no_slurm)
    assert proc.returncode == 2 and "`sbatch` is not on PATH" in proc.stderr
    with pytest.raises(ValueError, match="not host names"):
        render_hostfile(["node 1"], 2)
    assert not os.path.exists(tmp_path / "a")
