"""Multi-node launch glue: hosts of a Slurm allocation, DeepSpeed hostfiles, per-stage launch lines.

Four ways to put one stage (score, train) on several nodes, all reading the same rank variables
(floe_dist/distributed/runtime.py):

* ``srun`` (default under Slurm): one task per rank; ranks come from SLURM_PROCID/SLURM_NTASKS and
  MASTER_ADDR/MASTER_PORT from the sbatch script (first host of the allocation).
* ``deepspeed --hostfile H --master_addr A --launcher pdsh|slurm|openmpi|mpich``: the DeepSpeed
  launcher over a hostfile written here (``host slots=N`` per line); slurm/train.sbatch renders it.
* ``torchrun`` on one node (local processes), as the campaign does without Slurm.
* ``mpirun``/``mpiexec`` straight onto ``python -m launcher.cli``: mpi4py gives the ranks their layout
  and rank 0's address (runtime.py).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

DeepSpeedLauncher = Literal["pdsh", "slurm", "openmpi", "mpich"]  # deepspeed --launcher choices for multi-node
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\d+)$")


def need_command(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"`{name}` is not on PATH: {hint}")
    return path


def slurm_hosts(nodelist: str | None = None) -> list[str]:
    """Host names of a Slurm node list (``node[1-4]``), expanded by ``scontrol show hostnames``."""
    nodelist = nodelist or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("no node list: run inside a Slurm allocation (SLURM_JOB_NODELIST) or pass --nodelist")
    scontrol = need_command("scontrol", "expanding a Slurm node list needs the Slurm client")
    proc = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True)
    hosts = proc.stdout.split()
    if proc.returncode != 0 or not hosts:
        raise ValueError(f"scontrol could not expand node list {nodelist!r}: {proc.stderr.strip()}")
    return hosts


def job_seconds_left(job_id: str | None = None) -> float | None:
    """Seconds the Slurm job (this one, ``SLURM_JOB_ID``) has left before its time limit, as squeue reports it
    (``%L``: a limit raised with ``scontrol update`` counts); None for a job without a limit."""
    from floe_dist.config import duration_seconds

    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise ValueError("not inside a Slurm job (SLURM_JOB_ID is unset)")
    squeue = need_command("squeue", "reading the job's time left needs the Slurm client")
    proc = subprocess.run([squeue, "--noheader", "--jobs", job_id, "--format", "%L"], capture_output=True, text=True)
    left = proc.stdout.strip()
    if proc.returncode != 0 or not left:
        raise ValueError(f"squeue could not tell the time Slurm job {job_id} has left: {proc.stderr.strip()}")
    if left in ("UNLIMITED", "NOT_SET"):
        return None
    return duration_seconds(left, f"the time Slurm job {job_id} has left (squeue)")


def render_hostfile(hosts: list[str], slots: int) -> str:
    """DeepSpeed's hostfile: ``host slots=N`` per line."""
    if slots < 1:
        raise ValueError(f"slots per host must be >= 1, got {slots}")
    bad = [h for h in hosts if not _HOST.match(h)]
    if bad or not hosts:
        raise ValueError(f"not host names: {bad or hosts}")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """{host: slots} of a DeepSpeed hostfile; every line that is not ``host slots=N`` is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hostfile {path} not found")
    hosts: dict[str, int] = {}
    problems = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOSTFILE_LINE.match(line)
        if not match or not _HOST.match(match["host"]):
            problems.append(f"line {number}: {raw.strip()!r} is not 'hostname slots=N'")
        elif int(match["slots"]) < 1:
            problems.append(f"line {number}: slots must be >= 1")
        elif match["host"] in hosts:
            problems.append(f"line {number}: host {match['host']} listed twice")
        else:
            hosts[match["host"]] = int(match["slots"])
    if not hosts and not problems:
        problems.append("no hosts")
    if problems:
        raise ValueError(f"bad hostfile {path}:\n  - " + "\n  - ".join(problems))
    return hosts


def srun_stage_command(stage_argv: list[str], nodes: int, tasks_per_node: int) -> list[str]:
    """One Slurm task per rank; the ranks find each other through MASTER_ADDR/MASTER_PORT."""
    return [need_command("srun", "the srun launcher runs inside a Slurm allocation"),
            f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--kill-on-bad-exit=1",
            "--gpu-bind=none", "--export=ALL", sys.executable, "-m", "launcher.cli", *stage_argv]


def local_ranks_command(stage_argv: list[str], nproc: int) -> list[str]:
    """torchrun with nproc ranks on this machine, on a free port; one rank is the stage's process itself (a world of
    one needs no rendezvous, and torchrun's agent would cost an interpreter start)."""
    from floe_dist.distributed.runtime import free_port

    if nproc == 1:
        return [sys.executable, "-m", "launcher.cli", *stage_argv]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "launcher.cli", *stage_argv]


def run_local_ranks(stage_argv: list[str], nproc: int, env: dict[str, str]) -> int:
    """``floe-dist STAGE_ARGV`` on nproc ranks of this machine, to completion: forked from this process's zygote
    when it has one (floe_dist/distributed/forked_ranks.py), else ``local_ranks_command``. Either way the ranks die
    with this process."""
    from floe_dist.distributed.forked_ranks import zygote
    from floe_dist.distributed.runtime import die_with_parent

    if zygote() is not None:
        return zygote().launch(["-m", "launcher.cli", *stage_argv], env, nproc)
    return subprocess.call(local_ranks_command(stage_argv, nproc), env=env, preexec_fn=die_with_parent)


def threads_per_rank(nproc: int) -> str:
    """OMP_NUM_THREADS for nproc ranks on this machine: its cores shared out."""
    return str(max(1, (os.cpu_count() or 1) // nproc))


def ranks_to_start(parallel) -> int:
    """How many local ranks a stage run alone starts itself, as the campaign would (0: it runs in this process).
    Under a launcher (torchrun, deepspeed, srun, mpirun) the launcher's world must be the recipe's ``parallel``
    layout when the recipe asks for more than one rank; a ValueError says what differs."""
    from floe_dist.distributed.runtime import discover, mpi_launched

    wanted, env = parallel.nproc * parallel.nodes, os.environ
    if "RANK" in env or "SLURM_STEP_ID" in env or mpi_launched():
        world = discover().world_size
        if wanted > 1 and world != wanted:
            raise ValueError(f"parallel.nproc x parallel.nodes = {parallel.nproc} x {parallel.nodes} ranks, but the "
                             f"launcher started {world}: set them to the launch's layout, or launch {wanted}")
        return 0
    if parallel.nodes > 1:
        raise ValueError(f"parallel.nodes = {parallel.nodes}: start this stage on the nodes with srun or deepspeed "
                         f"(`floe-dist slurm --action render --template train` writes the sbatch script)")
    return parallel.nproc if parallel.nproc > 1 else 0
