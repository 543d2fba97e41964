"""BENCHMARKS.md's tables are the ones benchmarks/report.py generates from the committed result files."""
from __future__ import annotations

import json
import subprocess
import sys

from benchmarks import report
from tests.conftest import REPO


def test_every_table_matches_its_result_file_and_none_is_unmarked():
    proc = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_fails_on_a_changed_figure_and_on_an_unmarked_table(tmp_path, monkeypatch):
    text = report.BENCHMARKS.read_text()
    for path in report.RESULTS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    data = report.load("foundation")
    data["step_ratio"] += 0.5
    (tmp_path / "foundation.json").write_text(json.dumps(data))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    regenerated = report.regenerate(text)
    assert regenerated != text and f"**{data['step_ratio']:.3f}**" in regenerated
    assert report.unmarked_tables(text + "\n| a | b |\n|---|---|\n| 1 | 2 |\n") == ["| a | b |"]
    assert report.unmarked_tables(text) == []


def test_every_result_file_names_its_script_command_and_machine():
    for path in sorted(report.RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        assert (REPO / data["script"]).is_file(), path.name
        assert data["command"] and data["machine"] and data["provenance"] and "rows" in data, path.name
