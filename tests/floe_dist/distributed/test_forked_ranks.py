"""A zygote's launches stand for fresh processes: their status, a failed rank, a time limit, and a started process
that is polled, stopped as a group and logged as ``subprocess.Popen``'s would be
(floe_dist/distributed/forked_ranks.py). Every campaign and search test runs its stages and workers through it."""
from __future__ import annotations

import json

from tests.conftest import run_python


def test_a_zygote_launches_as_fresh_processes_and_its_started_processes_act_as_popen(tmp_path):
    out = run_python(["tests/floe_dist/distributed/zygote_probe.py", str(tmp_path)], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"ready": True, "version": 0, "refused": 2, "one_rank_of_two_fails": 1, "past_its_time": None,
                     "running": None, "own_group": True, "stopped": -15, "log": True}
