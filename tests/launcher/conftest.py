"""One local 2-node Slurm for every launcher test that needs it (started once, torn down at the end)."""
from __future__ import annotations

import pytest

from tests.slurm_cluster import LocalSlurm


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
