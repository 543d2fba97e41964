"""The suite's forked runs (tests/forked_cli.py) stand for fresh processes: same results, output and exit status."""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import _forked_cli, clean_env, read_metrics, run_floe

TRAIN = ["train", "--model", "tiny", "--steps", "2", "--micro-batch", "2", "--zero", "3"]


def test_forked_ranks_train_as_torchrun_ranks_and_a_failed_rank_fails_the_run(tmp_path):
    assert _forked_cli(clean_env(2)) is not None  # these runs are forked, not fresh
    forked = run_floe([*TRAIN, "--output", str(tmp_path / "forked")], nproc=2)
    run_floe([*TRAIN, "--output", str(tmp_path / "torchrun")], nproc=2, torchrun=True)
    losses = {name: [m["loss"] for m in read_metrics(tmp_path / name)] for name in ("forked", "torchrun")}
    assert losses["forked"] == losses["torchrun"]
    assert "for 2 steps on 2 rank(s)" in forked.stdout
    bad = run_floe([*TRAIN, "--rank", "2", "--output", str(tmp_path / "forked")], nproc=2, check=False)
    assert bad.returncode == 1  # as torchrun reports a failed rank
    assert "holds checkpoints of a run made with other settings: adapter.rank (4 -> 2)" in bad.stderr


def test_a_forked_process_exits_and_prints_as_a_fresh_one(tmp_path):
    bad = [*TRAIN, "--zero", "7", "--output", str(tmp_path / "x")]
    forked, fresh = run_floe(bad, check=False), run_floe(bad, check=False, torchrun=True)
    assert forked.returncode == fresh.returncode == 2
    assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1] == (
        "floe-dist train: error: DeepSpeed config not found: 7")


def test_a_forked_run_past_its_time_limit_is_killed(tmp_path):
    slow = {"TOY_DELAY": "60"}
    assert _forked_cli({**clean_env(1), **slow}) is not None
    with pytest.raises(subprocess.TimeoutExpired):
        run_floe(["search", "--model", "tiny", "--trial-module", "tests.search_toy", "--mode", "grid", "--ranks", "4",
                  "--lr", "1e-2", "--max-steps", "30", "--output", str(tmp_path / "s")], timeout=5, env=slow)
