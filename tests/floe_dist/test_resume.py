"""The one resume guard: changed settings are named, how-to-run settings may change, nothing else does; and one
live run per output folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from floe_dist.files import LOCK_NAME, exclusive
from floe_dist.resume import guard
from tests.conftest import REPO, run_floe


def test_the_guard_names_changed_keys_and_lets_how_to_run_settings_change(tmp_path):
    saved = tmp_path / "args.json"
    guard(saved, {"rank": 4, "lr": 1e-3, "steps": 10}, what="a run", may_change={"steps"})
    assert json.loads(saved.read_text()) == {"rank": 4, "lr": 1e-3, "steps": 10}
    guard(saved, {"rank": 4, "lr": 1e-3, "steps": 20}, what="a run", may_change={"steps"})  # longer: fine
    with pytest.raises(ValueError, match=r"holds a run made with other settings: lr \(0.001 -> 0.01\), rank \(4 -> 8\)"):
        guard(saved, {"rank": 8, "lr": 1e-2, "steps": 20}, what="a run", may_change={"steps"})
    assert json.loads(saved.read_text())["steps"] == 20  # a refused rerun leaves the saved settings alone


def test_without_work_to_resume_the_guard_only_records(tmp_path):
    saved = tmp_path / "args.json"
    guard(saved, {"rank": 4}, what="a run")
    guard(saved, {"rank": 8}, what="a run", active=False)  # nothing to resume: the new settings stand
    assert json.loads(saved.read_text()) == {"rank": 8}
    guard(saved, {"rank": 2}, what="a run", active=False, write=False)
    assert json.loads(saved.read_text()) == {"rank": 8}


def test_a_setting_added_since_the_work_was_saved_counts_as_changed_only_when_turned_on(tmp_path):
    saved = tmp_path / "args.json"
    saved.write_text(json.dumps({"rank": 4}))  # written by a version without "pack" and "top_ks"
    guard(saved, {"rank": 4, "pack": False, "top_ks": ""}, what="a run")  # off: what the older run did
    saved.write_text(json.dumps({"rank": 4}))
    with pytest.raises(ValueError, match=r"pack \(None -> True\)"):
        guard(saved, {"rank": 4, "pack": True}, what="a run")


def test_a_run_made_without_a_budget_resumes_with_one_where_its_warm_up_is_the_same(tmp_path):
    """A campaign given a budget only when it resumes fixes the warm-up in steps (``budgeted``, and the trainer under
    a time limit) where the run made without one read ``warmup_ratio`` x ``train.steps``: the same 8 steps, so that
    run's checkpoints resume (they were refused: "train.warmup_steps (None -> 8)"); another count is still refused."""
    from dataclasses import replace

    from floe_dist.recipe import load_recipe
    from floe_dist.trainer import RESUME_MAY_CHANGE, UNSET, run_settings, same_warmup

    recipe = load_recipe("tiny", ["--train.steps", "400", "--train.warmup_ratio", "0.02"])
    saved = tmp_path / "train_args.json"
    saved.write_text(json.dumps(run_settings(recipe)))  # the run without a budget
    assert json.loads(saved.read_text())["train.warmup_steps"] is None

    def resume(warmup_steps: int) -> None:
        budgeted = replace(recipe.train, warmup_steps=warmup_steps, time_limit=300.0, steps=UNSET)
        guard(saved, run_settings(replace(recipe, train=budgeted)), what="checkpoints of a run", write=False,
              may_change=RESUME_MAY_CHANGE | same_warmup(saved, budgeted))

    resume(8)
    with pytest.raises(ValueError, match=r"train.warmup_steps \(None -> 20\)"):
        resume(20)


HOLD = ("import sys, time; from floe_dist.files import exclusive; hold = exclusive(sys.argv[1]); hold.__enter__(); "
        "print('held', flush=True); time.sleep(600)")


def test_a_second_run_on_a_live_output_folder_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    folder = tmp_path / "train"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"{folder} is in use by another floe-dist run \(pid {holder.pid} on "):
            with exclusive(folder, wait=0.5):
                pass
        proc = run_floe(["train", "--config", "tiny", "--output", str(folder), "--train.steps", "2"], check=False)
        assert proc.returncode == 2 and f"is in use by another floe-dist run (pid {holder.pid}" in proc.stderr
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing there
    finally:
        holder.kill()
        holder.wait()
    with exclusive(folder, wait=0):  # kill -9 released it: nothing stale to clean up
        assert (folder / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")


def test_a_run_that_waits_for_the_lock_takes_it_when_the_holder_ends(tmp_path):
    folder = tmp_path / "search"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.replace("time.sleep(600)", "time.sleep(1); hold.__exit__("
                               "None, None, None); time.sleep(600)"), str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with exclusive(folder, wait=60):  # the holder's file goes as it ends: this run locks the one now there
            assert (folder / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
            assert holder.poll() is None  # the holder process lives on: the lock, not its exit, was released
    finally:
        holder.kill()
        holder.wait()
