"""One local 2-node Slurm for every launcher test that needs it (started once, torn down at the end),
and Debian's Open MPI beside the MPICH wheel of the venv."""
from __future__ import annotations

import shutil

import pytest

from tests.slurm_cluster import LocalSlurm, ensure_installed


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def openmpi_bin(tmp_path_factory):
    """A folder whose ``mpirun`` is Open MPI's (the venv's own mpirun is MPICH's): put it first on PATH."""
    ensure_installed(["openmpi-bin"], ("mpirun.openmpi",))
    folder = tmp_path_factory.mktemp("openmpi-bin")
    (folder / "mpirun").symlink_to(shutil.which("mpirun.openmpi"))
    return folder
