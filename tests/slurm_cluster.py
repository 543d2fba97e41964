"""A real Slurm on this machine for tests: two emulated nodes, started and torn down unattended.

Installs Debian's slurmctld/slurmd/munge when ``sbatch`` is missing (root and apt are needed; both
are available on the build and CI machines). Configuration and pitfalls follow
../shared/reference/platform.md: linuxproc process tracking and no task plugin (no cgroups or
systemd here), cons_tres/CR_Core so that jobs share a node, two slurmd daemons with their own ports.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ensure_installed(packages: list[str] = PACKAGES, commands: tuple[str, ...] = ("sbatch", "slurmctld", "munged")) -> None:
    """apt-get install ``packages`` unless every one of ``commands`` is already on PATH."""
    if all(shutil.which(c) for c in commands):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


def _start_munge() -> bool:
    """Start munged unless one runs; whether this call started it (and so stops it at the end)."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return False
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if not Path("/etc/munge/munge.key").is_file():
        subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    return True


class LocalSlurm:
    """``with LocalSlurm(dir) as cluster:`` sets ``SLURM_CONF`` for this process and its children."""

    def __init__(self, workdir: Path, nodes: int = 2):
        self.dir, self.nodes = Path(workdir), nodes
        self.conf = self.dir / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.started_munge = False

    def __enter__(self) -> LocalSlurm:
        ensure_installed()
        self.started_munge = _start_munge()
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        ctl_port, *node_ports = _free_ports(1 + self.nodes)
        cpus = os.cpu_count() or 1
        mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        d = self.dir
        self.conf.write_text("\n".join([
            "ClusterName=floe", "SlurmctldHost=localhost", "SlurmUser=root", f"SlurmctldPort={ctl_port}",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.%n.pid",
            f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none", "MinJobAge=600",
            # Job credentials live 120 s by default, and a requeued job may only restart once its old
            # credential expired (Slurm holds it that long): 10 s keeps the requeue test short.
            "AuthInfo=cred_expire=10", "SchedulerParameters=bf_interval=2,sched_interval=2",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            f"NodeName=node[1-{self.nodes}] NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
            f"CPUs={cpus} RealMemory={mem} Port={','.join(map(str, node_ports))}",
            "PartitionName=debug Nodes=ALL Default=YES State=UP MaxTime=INFINITE", ""]))
        os.environ["SLURM_CONF"] = str(self.conf)
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-f", str(self.conf)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for n in range(1, self.nodes + 1):
            self.procs.append(subprocess.Popen(["slurmd", "-D", "-N", f"node{n}", "-f", str(self.conf)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while time.time() < deadline:
            states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
            if len(states) >= 1 and all(s == "idle" for s in states):
                return self
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"local Slurm did not come up; see {self.dir}/slurmctld.log")

    def __exit__(self, *exc) -> None:
        subprocess.run(["scancel", "--user=root"], capture_output=True)
        subprocess.run(["scontrol", "shutdown"], capture_output=True)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        if self.started_munge:  # the daemon this suite started ends with it
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)
        os.environ.pop("SLURM_CONF", None)
