"""Evaluation and generation on several ranks: a backbone partitioned over 2 ranks (ZeRO-3, each holding about
half of it: under a cap the whole backbone exceeds) scores and writes what one process holding it whole does."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_floe
from tests.floe_dist.test_data_formats import ALPACA_COLUMNS, alpaca_rows, write_jsonl
from tests.floe_dist.test_lm_eval import TASKS, write_tasks

ON_TWO_RANKS = ["--parallel.nproc", "2", "--parallel.zero", "3"]


def evaluated(tmp_path, name: str, args: list[str]) -> dict:
    out = tmp_path / f"{name}.json"
    run_floe(["evaluate", *args, "--output", str(out)])
    return json.loads(out.read_text())


@pytest.mark.parametrize("task, limit", [("sst2", 9), ("arithmetic", 7)])  # odd counts: one rank has one more
def test_two_ranks_holding_half_the_backbone_evaluate_what_one_process_does(uninterrupted_run, tmp_path, task, limit):
    args = ["--model", "tiny", "--adapter", str(uninterrupted_run / "adapter"), "--task", task, "--evaluate.limit",
            str(limit), "--evaluate.batch_size", "2", "--evaluate.max_new_tokens", "4"]
    one = evaluated(tmp_path, "one", args)
    two = evaluated(tmp_path, "two", [*args, *ON_TWO_RANKS])
    cap = 0.55 * one["model_bytes"]  # what a rank may hold: the whole backbone (and adapter) exceeds it
    assert (one["ranks"], one["partitioned"], two["ranks"], two["partitioned"]) == (1, False, 2, True)
    assert two["model_bytes"] == one["model_bytes"] == one["rank_model_bytes"] > cap >= two["rank_model_bytes"]
    assert two["examples"] == one["examples"] == limit
    assert two["accuracy"] == one["accuracy"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    if task == "arithmetic":  # greedy generations, word for word
        assert two["samples"] == one["samples"] and two["generated"] == one["generated"] == limit
    data_parallel = evaluated(tmp_path, "dp", [*args, "--parallel.nproc", "2", "--parallel.zero", "0"])
    assert (data_parallel["partitioned"], data_parallel["rank_model_bytes"]) == (False, one["model_bytes"])
    assert data_parallel["accuracy"] == one["accuracy"]
    assert data_parallel["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_two_ranks_holding_half_the_backbone_generate_what_one_process_does(uninterrupted_run, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", alpaca_rows(5))
    args = ["generate", "--model", "tiny", "--adapter", str(uninterrupted_run / "adapter"), "--input", str(prompts),
            "--columns", ALPACA_COLUMNS, "--generate.max_new_tokens", "5", "--generate.batch_size", "2"]
    run_floe([*args, "--output", str(tmp_path / "one.jsonl")])
    run_floe([*args, *ON_TWO_RANKS, "--output", str(tmp_path / "two.jsonl")])
    one, two = ((tmp_path / f"{n}.jsonl").read_text().splitlines() for n in ("one", "two"))
    assert len(one) == 5 and two == one


def test_lm_eval_tasks_on_two_ranks_score_what_one_process_does(uninterrupted_run, tmp_path):
    """lm-eval's choice, rolling and generation requests (9 documents: one rank has one more) on 2 ranks, ZeRO-3
    (partitioned, forwards kept in step) and ZeRO-0 (each rank holding the backbone whole)."""
    args = ["--model", "tiny", "--adapter", str(uninterrupted_run / "adapter"), "--task", "sst2", "--evaluate.limit",
            "9", "--evaluate.batch_size", "2", "--evaluate.lm_eval_tasks", ",".join(TASKS),
            "--evaluate.lm_eval_include", str(write_tasks(tmp_path))]
    one = evaluated(tmp_path, "one", args)["lm_eval"]
    assert set(one) == set(TASKS) and one["toy_generate"]["chrf,none"] > 0  # scores the text: equal scores compare it
    for layout, partitioned in ((ON_TWO_RANKS, True), (["--parallel.nproc", "2", "--parallel.zero", "0"], False)):
        two = evaluated(tmp_path, f"two-{partitioned}", [*args, *layout])
        assert (two["ranks"], two["partitioned"]) == (2, partitioned)
        for task, metrics in one.items():
            assert two["lm_eval"][task]["sample_len"] == metrics["sample_len"] == 9
            for name, value in metrics.items():
                if isinstance(value, float) and "stderr" not in name:
                    assert two["lm_eval"][task][name] == pytest.approx(value, rel=1e-5), (task, name, partitioned)
