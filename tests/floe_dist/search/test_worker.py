"""Warm trial workers (floe_dist/search/worker.py): one process runs trial after trial, computes what a fresh
process computes, and is replaced after a trial that raised or diverged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import recipe_for, run_floe

LM_TRIALS = ["search", "--mode", "grid", "--model", "tiny", "--task", "sst2", "--lr", "1e-3", "--max-steps", "3",
             "--micro-batch", "2", "--val-limit", "16", "--workers", "1"]


def trials(out: Path) -> list[dict]:
    return json.loads((out / "search.json").read_text())["trials"]


def test_a_warm_worker_computes_what_a_fresh_process_does(tmp_path):
    from floe_dist.stages.evaluate import run as evaluate

    run_floe([*LM_TRIALS, "--ranks", "2,4", "--output", str(tmp_path / "warm")])
    warm = trials(tmp_path / "warm")
    assert [t["status"] for t in warm] == ["success", "success"]
    assert warm[0]["worker"] == warm[1]["worker"]  # the rank-4 trial ran second, on the same warm process
    assert warm[1]["metrics"]["train_seconds"] > 0 and warm[1]["metrics"]["eval_seconds"] > 0
    run_floe([*LM_TRIALS, "--ranks", "4", "--trial-workers", "cold", "--output", str(tmp_path / "cold")])
    (cold,) = trials(tmp_path / "cold")
    assert cold["worker"].startswith("local:") and cold["config"] == warm[1]["config"]
    assert cold["cost"] == warm[1]["cost"]  # bit for bit: nothing of trial 0 leaked into trial 1
    # the in-memory validation of the trained modules equals evaluating the exported adapter afresh
    adapter = tmp_path / "warm" / "lines" / "0001" / "train" / "adapter"  # each configuration's own line
    scored = evaluate(recipe_for("evaluate", model="tiny", task="sst2", split="val", adapter=str(adapter), limit=16))
    assert scored["loss"] == pytest.approx(warm[1]["cost"], abs=1e-6)


def test_a_worker_whose_trial_raised_or_diverged_is_replaced(tmp_path):
    toy = ["search", "--mode", "grid", "--model", "tiny", "--trial-module", "tests.search_toy", "--lr", "1e-2",
           "--max-steps", "30", "--workers", "1", "--ranks", "2,4,8", "--output", str(tmp_path)]
    run_floe(toy, env={"TOY_CRASH_RANK": "2", "TOY_NAN_RANK": "4"})
    by_rank = {t["config"]["rank"]: t for t in trials(tmp_path)}
    assert by_rank[2]["status"] == "crashed" and "planted crash" in by_rank[2]["reason"]
    assert by_rank[4]["status"] == "crashed" and "non-finite cost" in by_rank[4]["reason"]
    assert by_rank[8]["status"] == "success"
    workers = [by_rank[r]["worker"] for r in (2, 4, 8)]
    assert len(set(workers)) == 3, workers  # each failure ended its worker; the next trial got a fresh one
    assert "planted crash for rank 2" in (tmp_path / "trials" / "0000" / "trial.log").read_text()
