"""The floe-dist command line: help, argument errors, and the tiny campaign end to end."""
from __future__ import annotations

import json

import pytest

from launcher.cli import build_parser, _stages
from tests.conftest import run_floe


def test_every_sub_command_has_help_and_every_option_a_help_line():
    parser = build_parser(_stages())
    (sub,) = [a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)]
    stages = {"score", "search", "allocate", "train", "evaluate", "export", "campaign", "plan", "slurm"}
    assert stages <= set(sub.choices)
    for name, stage in sub.choices.items():
        with pytest.raises(SystemExit) as done:
            parser.parse_args([name, "--help"])
        assert done.value.code == 0
        silent = [a.option_strings[0] for a in stage._actions if a.option_strings and a.dest != "help"
                  and not (a.help or "").split("(default")[0].strip()]
        assert not silent, f"floe-dist {name}: options without a help line: {silent}"


def test_bad_train_arguments_fail_before_any_work(tmp_path):
    proc = run_floe(["train", "--model", "tiny", "--steps", "0", "--allocation", str(tmp_path / "x.json"),
                     "--output", str(tmp_path / "o")], check=False)
    assert proc.returncode == 2
    assert "--steps must be >= 1" in proc.stderr and "x.json: file not found" in proc.stderr
    assert not (tmp_path / "o").exists()
    proc = run_floe(["train", "--model", "tiny", "--zero", str(tmp_path / "nope.json"),
                     "--output", str(tmp_path / "o")], check=False)
    assert proc.returncode == 2 and "DeepSpeed config not found" in proc.stderr


def test_a_failed_campaign_stage_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "floe-dist/allocation@1", "target_modules": ["q_proj"], "layers": {}}))
    campaign = ["campaign", "--preset", "tiny", "--output", str(tmp_path / "c"), "--allocation", str(bad)]
    proc = run_floe(campaign, check=False)  # the search stage reads the allocation first
    assert proc.returncode == 2 and "empty allocation" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c" / "search" / "trials").exists()
    proc = run_floe([*campaign, "--no-search"], check=False)  # then the train stage (a torchrun group)
    assert proc.returncode == 2
    assert "train stage failed" in proc.stderr and "empty allocation" in proc.stderr
    assert "Traceback" not in proc.stderr.split("train stage failed")[-1]


def test_tiny_campaign_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "campaign"
    proc = run_floe(["campaign", "--preset", "tiny", "--output", str(out)])
    summary = json.loads((out / "campaign.json").read_text())
    assert summary["ranks"] == 2 and summary["trainable_parameters"] > 0
    assert 0.0 <= summary["zero_shot_accuracy"] <= 1.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert set(summary["stage_seconds"]) == {"prepare", "zero_shot", "score", "search", "train", "final_eval"}
    fisher = json.loads((out / "score" / "fisher.json").read_text())
    assert fisher["world_size"] == 2 and len(fisher["selected_layers"]) == 1  # 25% of 4 layers
    search = json.loads((out / "search" / "search.json").read_text())["summary"]
    trained = json.loads((out / "train" / "allocation.json").read_text())
    assert sorted(map(int, trained["layers"])) == fisher["selected_layers"]  # score chose where,
    assert {r for mods in trained["layers"].values() for m in mods.values() for r in m["ranks"]} == {search["rank"]}
    assert json.loads((out / "train" / "train_args.json").read_text())["lr"] == search["lr"] == summary["lr"]
    assert "final accuracy" in proc.stdout
    assert (out / "train" / "adapter" / "adapter_model.safetensors").is_file()
    again = run_floe(["campaign", "--preset", "tiny", "--output", str(out)])
    assert again.stdout.count("done earlier") == 6
