"""A worker that has no trial to run while others train takes the search's spare work (floe_dist/search/
spare_work.py), on the planted-rank toy (tests/search_toy.py): it takes no trial's place and changes no choice."""
from __future__ import annotations

import json

from floe_dist.search.spare_work import SpareJob
from tests.conftest import recipe_for

TOY = dict(model="tiny", trial_module="tests.search_toy", ranks="1,2,4,8,16", lr="3e-3:3e-2", max_steps=90,
           workers=2, mode="bo", adapter__experts=1, adapter__router="topk", adapter__top_k=1, adapter__alpha=16)


def search(out, spare=(), **settings) -> dict:
    from floe_dist.stages.search import run

    run(recipe_for("search", **{**TOY, **settings}), str(out), list(spare))
    return json.loads((out / "search.json").read_text())


def test_a_worker_with_no_trial_to_run_takes_the_spare_work(tmp_path):
    """One trial for two workers: the second takes the spare work at once, beside the trial."""
    job = SpareJob("toy work", tmp_path / "job", "tests.spare_toy")
    ledger = search(tmp_path / "search", [job], max_trials=1)
    (trial,) = ledger["trials"]
    (done,) = ledger["summary"]["spare_work"]
    assert trial["status"] == "success" and trial["worker"].startswith("warm:0:")
    assert (done["name"], done["status"]) == ("toy work", "success") and done["worker"].startswith("warm:1:")
    assert done["worker"] == f"warm:1:pid{json.loads(job.result.read_text())['pid']}"  # that worker's process


def test_a_worker_whose_wait_is_short_takes_no_spare_work(tmp_path, monkeypatch):
    """Two 4 s trials for two workers, the first 0.4 s longer: the worker that finishes first waits less than its
    grace (a quarter of a trial), so the spare work is left to the campaign, as after any search."""
    monkeypatch.setenv("TOY_DELAY", "4")
    monkeypatch.setenv("TOY_DELAY_TRIAL", "0:0.4")
    job = SpareJob("toy work", tmp_path / "job", "tests.spare_toy")
    ledger = search(tmp_path / "search", [job], max_trials=2)
    assert [t["status"] for t in ledger["trials"]] == ["success", "success"]
    assert ledger["summary"]["spare_work"] == [] and not job.result.exists()


def test_failed_spare_work_costs_the_search_nothing(tmp_path, monkeypatch):
    """Three trials for two workers (2 s each): when the second finishes, the third is running and none is left,
    so that worker takes the spare work after its grace, and it fails; the search's trials and choice are those of
    one without."""
    monkeypatch.setenv("TOY_DELAY", "2")
    plain = search(tmp_path / "plain", max_trials=3)
    monkeypatch.setenv("SPARE_FAIL", "1")
    job = SpareJob("toy work", tmp_path / "job", "tests.spare_toy")
    spared = search(tmp_path / "spared", [job], max_trials=3)
    assert [d["status"] for d in spared["summary"]["spare_work"]] == ["crashed"] and not job.result.exists()
    assert "planted failure of the spare work" in (job.folder / "trial.log").read_text()
    assert [(t["config"], t["budget"], t["status"], t["cost"]) for t in spared["trials"]] == \
        [(t["config"], t["budget"], t["status"], t["cost"]) for t in plain["trials"]]
    assert spared["summary"]["incumbent"]["config"] == plain["summary"]["incumbent"]["config"]


def test_a_spare_evaluation_counts_only_for_the_recipe_it_ran(tmp_path):
    """A resumed campaign takes the zero-shot result a search worker left only if it evaluated the same recipe."""
    from dataclasses import replace

    from floe_dist.recipe import load_recipe
    from floe_dist.search.spare_work import evaluation_job, evaluation_result

    recipe = load_recipe("tiny")
    job = evaluation_job("the zero-shot evaluation", tmp_path / "zero_shot", recipe)
    assert evaluation_result(job.folder, recipe) is None  # not run yet
    job.result.write_text('{"accuracy": 0.5}')
    assert evaluation_result(job.folder, recipe) == {"accuracy": 0.5}
    other = replace(recipe, evaluate=replace(recipe.evaluate, limit=8))
    assert evaluation_result(job.folder, other) is None
    evaluation_job("the zero-shot evaluation", job.folder, other)
    assert not job.result.exists()


def test_under_a_time_limit_spare_work_ends_with_the_trials(tmp_path, monkeypatch):
    """With a time limit the search's seconds are the trials': once none is left, the spare work still running is
    told to stop (a zero-shot evaluation keeps the part it scored). Without one it runs to its end."""
    monkeypatch.setenv("SPARE_UNTIL_STOP", "60")
    job = SpareJob("toy work", tmp_path / "job", "tests.spare_toy")
    ledger = search(tmp_path / "limited", [job], max_trials=1, time_limit=600)
    (done,) = ledger["summary"]["spare_work"]
    assert done["status"] == "success" and json.loads(job.result.read_text())["stopped"]
    monkeypatch.setenv("SPARE_UNTIL_STOP", "3")
    job = SpareJob("toy work", tmp_path / "job2", "tests.spare_toy")
    search(tmp_path / "unlimited", [job], max_trials=1)
    assert not json.loads(job.result.read_text())["stopped"] and not job.stop_file.exists()


def test_under_a_time_limit_spare_work_gives_its_worker_back_to_a_waiting_trial(tmp_path, monkeypatch, capsys):
    """Trials of 2 s, trial 0 of 5 s: trial 1's worker cannot have trial 2 (proposed only once trial 0's result is
    known) and takes the spare work. When trial 0 ends, trials 2 and 3 (both of the initial design) can be proposed:
    its worker takes trial 2, and the spare work, told to stop, gives its worker to trial 3 (it would otherwise run
    60 s)."""
    monkeypatch.setenv("TOY_DELAY", "2")
    monkeypatch.setenv("TOY_DELAY_TRIAL", "0:3")
    monkeypatch.setenv("SPARE_UNTIL_STOP", "60")
    job = SpareJob("toy work", tmp_path / "job", "tests.spare_toy")
    ledger = search(tmp_path / "limited", [job], max_trials=4, time_limit=600, initial_configs=4)
    (done,) = ledger["summary"]["spare_work"]
    assert done["worker"].startswith("warm:1:") and json.loads(job.result.read_text())["stopped"]
    workers = [t["worker"].split(":")[1] for t in ledger["trials"]]
    assert workers == ["0", "1", "0", "1"] and all(t["status"] == "success" for t in ledger["trials"])
    assert done["seconds"] < 30 and "a trial waits for a worker: toy work ends" in capsys.readouterr().out
