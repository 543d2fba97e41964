"""Cluster operations against a real local 2-node Slurm: rendered sbatch scripts, requeue, bad inputs."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from floe_dist.distributed.runtime import free_port
from launcher.campaign import JOB_END_MARGIN
from launcher.cluster import parse_hostfile, render_hostfile, slurm_hosts
from tests.conftest import REPO, RESUMABLE_RUN, clean_env, read_metrics, run_floe, run_here

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
    # uniform: no score stage; the train stage is the srun-launched group this checks
    job = submit(tmp_path, "--template", "campaign", "--nodes", "2",
                 "--args=--config tiny --search.enabled false --allocate.method uniform")
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
    while not (tmp_path / "metrics.jsonl").is_file() or len(read_metrics(tmp_path)) < 6:
        if time.time() > deadline or job_state(job) not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise TimeoutError(f"job {job} is {job_state(job)} and has not reached step 6")
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", job], check=True)
    state = wait_for(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "restart 1" in log and "resumed from" in log
    requeued, uninterrupted = read_metrics(tmp_path), read_metrics(uninterrupted_run)
    assert [m["step"] for m in requeued] == list(range(1, 25))
    for a, b in zip(uninterrupted, requeued):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])


def test_a_job_budget_reads_the_time_the_job_has_left(slurm, tmp_path):
    """``campaign.budget job`` inside a real job of 5 minutes: squeue's time left, less the minute kept to end in."""
    code = ("from pathlib import Path; from floe_dist.recipe import load_recipe; from launcher.campaign import "
            "budget_in_job; from launcher.cluster import job_seconds_left; left = job_seconds_left(); "
            "print('left', left); print('budget', budget_in_job(load_recipe('tiny', ['--campaign.budget', 'job']), "
            "Path('none')).campaign.budget)")
    log = tmp_path / "job.out"
    proc = subprocess.run(["sbatch", "--parsable", "--time=00:05:00", f"--chdir={REPO}", f"--output={log}",
                           f"--wrap={shlex.quote(sys.executable)} -c {shlex.quote(code)}"],
                          capture_output=True, text=True, check=True)
    state = wait_for(proc.stdout.strip().split(";")[0])
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    left, budget = (float(text.split(f"{key} ")[-1].split()[0]) for key in ("left", "budget"))
    assert 0 < left <= 300 and "campaign.budget job: Slurm job" in text, text  # squeue read the job's --time
    assert left - JOB_END_MARGIN - budget in (0, 1), text  # read again a moment later: the same second or the next


def test_hostfile_from_a_slurm_node_list(slurm, tmp_path):
    assert slurm_hosts("node[1-2]") == ["node1", "node2"]
    path = tmp_path / "hostfile"
    run_floe(["slurm", "--action", "hostfile", "--nodelist", "node[1-2]", "--slots", "4", "--hostfile", str(path)])
    assert parse_hostfile(path) == {"node1": 4, "node2": 4}


@pytest.mark.parametrize("backend", ["slurm", "mpich"])
def test_rendered_deepspeed_launch_runs_over_two_nodes(slurm, tmp_path, backend):
    """train.sbatch with --launch deepspeed: a hostfile from the allocation, then the deepspeed
    launcher's slurm backend (srun) or mpich backend (MPICH's mpirun, which starts its proxies
    through Slurm) puts one rank on each node."""
    job = submit(tmp_path, "--template", "train", "--nodes", "2", "--launch", "deepspeed",
                 "--deepspeed-launcher", backend, "--args=--model tiny --steps 2 --micro-batch 2")
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
        (["campaign", "--parallel.nodes", "2", "--output", str(tmp_path / "d")], "needs parallel.launcher srun"),
        (["campaign", "--nodes", "2", "--output", str(tmp_path / "g")], "--nodes is now --parallel.nodes"),
        (["campaign", "--nodez", "2", "--output", str(tmp_path / "g")], "bad settings: unrecognized arguments: --nodez"),
        # the search's settings are checked before the first stage, not after zero-shot and scoring
        (["campaign", "--search.model_data", "all", "--output", str(tmp_path / "h")],
         "search.model_data: expected one of 'budget', 'pooled', got all"),
    ]
    for argv, message in cases:
        proc = run_here(argv)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    no_slurm = {"PATH": "/usr/bin/nonexistent"}
    proc = run_floe(["slurm", "--action", "submit", "--output", str(tmp_path / "e")], check=False, env=no_slurm)
    assert proc.returncode == 2 and "`sbatch` is not on PATH" in proc.stderr
    with pytest.raises(ValueError, match="not host names"):
        render_hostfile(["node 1"], 2)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "h")


def test_mpi_and_pdsh_launches_train_like_torchrun(tmp_path, openmpi_bin, local_sshd):
    """Two ranks started four more ways give torchrun's loss curve: bare `mpiexec -n 2` of MPICH (PyPI)
    and of Open MPI (Debian), where mpi4py supplies the layout and rank 0's address; and `deepspeed
    --launcher openmpi|pdsh` over a hostfile (deepspeed's mpich backend runs through Slurm in
    test_rendered_deepspeed_launch_runs_over_two_nodes); pdsh logs in over ssh, so the ranks get
    their variables from DS_ENV_FILE. The reference is two forked ranks of tests/forked_cli.py, which
    tests/test_forked_cli.py checks equal to torchrun's on this same run."""
    from tests.test_forked_cli import TRAIN as train

    run_floe([*train, "--output", str(tmp_path / "forked")], nproc=2)
    expected = [m["loss"] for m in read_metrics(tmp_path / "forked")]
    venv_bin = Path(sys.executable).parent
    mpich = {**clean_env(2), "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    openmpi = {**clean_env(2), "PATH": f"{openmpi_bin}:{venv_bin}:{os.environ['PATH']}", "MPI4PY_MPIABI": "openmpi",
               "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(render_hostfile(["localhost"], 2))

    ssh_port, ssh_options = local_sshd
    (tmp_path / "ds_env").write_text("".join(f"{k}={v}\n" for k, v in clean_env(2).items()
                                             if k in ("FLOE_DIST_CACHE", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")))
    pdsh = {**mpich, "DS_ENV_FILE": str(tmp_path / "ds_env"), "PDSH_SSH_ARGS_APPEND": ssh_options}

    def deepspeed(backend: str, *flags: str) -> list[str]:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--force_multi",
                "--no_ssh_check", *flags, "--launcher", backend, "--master_addr", "127.0.0.1",
                f"--master_port={free_port()}", str(REPO / "launcher" / "cli.py")]

    launches = {"mpiexec-mpich": (["mpiexec", "-n", "2", sys.executable, "-m", "launcher.cli"], mpich),
                "mpirun-openmpi": (["mpirun", "-n", "2", sys.executable, "-m", "launcher.cli"], openmpi),
                "deepspeed-openmpi": (deepspeed("openmpi"), openmpi),
                "deepspeed-pdsh": (deepspeed("pdsh", "--ssh_port", str(ssh_port)), pdsh)}
    for name, (launch, env) in launches.items():
        proc = subprocess.run([*launch, *train, "--output", str(tmp_path / name)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{name}:\n{proc.stderr[-3000:]}"
        assert json.loads((tmp_path / name / "train.json").read_text())["world_size"] == 2, name
        assert [m["loss"] for m in read_metrics(tmp_path / name)] == pytest.approx(expected, rel=1e-6), name


def test_mpirun_without_mpi4py_names_the_missing_rendezvous(tmp_path, monkeypatch):
    """Started by mpirun with no MASTER_PORT and no mpi4py: a clear error, not a hang."""
    from floe_dist.distributed import runtime

    monkeypatch.setattr(runtime, "mpi4py_available", lambda: False)
    launched = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_PROCID")}
    monkeypatch.setattr(os, "environ", {**launched, "PMI_RANK": "0", "PMI_SIZE": "2"})
    with pytest.raises(RuntimeError, match="mpirun with mpi4py installed"):
        runtime.init_distributed()


def test_mpi4py_on_another_mpi_is_refused_clearly(monkeypatch):
    """An mpi4py that sees a world of one under a 2-rank mpirun (it runs on another MPI): a clear
    error that names the fix, not a rendezvous waiting for a rank that never comes."""
    import types

    from floe_dist.distributed import runtime

    world = types.SimpleNamespace(Get_size=lambda: 1, Get_rank=lambda: 0)
    mpi = types.SimpleNamespace(COMM_WORLD=world, Get_library_version=lambda: "Other MPI 1.0\n")
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))
    monkeypatch.setattr(runtime, "mpi4py_available", lambda: True)
    launched = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_PROCID")}
    monkeypatch.setattr(os, "environ", {**launched, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="sees 1 rank.*started 2.*MPI4PY_MPIABI"):
        runtime.init_distributed()


def test_more_local_ranks_than_gpus_is_refused_before_nccl(monkeypatch):
    """Two ranks on a one-GPU node: set_device would fail on the missing GPU; the error names the layout
    and the fix first. (tests/gpu runs the same on a real GPU.)"""
    import torch

    from floe_dist.distributed import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    launched = {k: v for k, v in os.environ.items() if k not in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")}
    monkeypatch.setattr(os, "environ", {**launched, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                        "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"})
    with pytest.raises(RuntimeError, match=r"local rank 1 needs GPU 1, but this node has 1 GPU\(s\)"):
        runtime.init_distributed()
