"""The one resume guard: changed settings are named, how-to-run settings may change, nothing else does."""
from __future__ import annotations

import json

import pytest

from floe_dist.resume import guard


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
