"""`floe-dist score`: 1 rank == 2 ZeRO-3 ranks, outputs that load back, resumable warm-up, bad input."""
from __future__ import annotations

import json
import shutil

import pytest

from floe_dist.allocation import Allocation
from tests.conftest import run_floe

COMMON = ["score", "--model", "tiny", "--warmup-steps", "3", "--proxy-examples", "64", "--samples", "64",
          "--score-batch", "8", "--micro-batch", "2", "--zero", "3"]


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """One warm-up + 1-rank scoring; later runs copy its warm-up folder."""
    root = tmp_path_factory.mktemp("score")
    run_floe([*COMMON, "--output", str(root / "one"), "--k", "2"])
    return root


@pytest.mark.parametrize("mode", ["mask", "param"])
def test_two_rank_zero3_scores_equal_one_rank(warm, mode, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(warm / "one" / "warmup", d / "warmup")
    run_floe([*COMMON, "--output", str(one), "--mode", mode, "--k", "2"])
    run_floe([*COMMON, "--output", str(two), "--mode", mode, "--k", "2"], nproc=2)
    a, b = (json.loads((d / "fisher.json").read_text()) for d in (one, two))
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["samples"] == b["samples"] == 64
    for layer, score in a["scores"].items():
        assert abs(score - b["scores"][layer]) <= 1e-5 * abs(score)
    assert a["selected_layers"] == b["selected_layers"]


def test_zero0_scores_equal_zero3_scores(warm, tmp_path):
    """Without ZeRO-3 the scorer runs on the plain module (DeepSpeed's ZeRO-0 engine refuses autograd.grad)."""
    shutil.copytree(warm / "one" / "warmup", tmp_path / "z0" / "warmup")
    run_floe([*COMMON[:-2], "--zero", "0", "--output", str(tmp_path / "z0"), "--k", "2"])
    a, b = (json.loads((d / "fisher.json").read_text()) for d in (warm / "one", tmp_path / "z0"))
    for layer, score in a["scores"].items():
        assert abs(score - b["scores"][layer]) <= 1e-5 * abs(score)


def test_budget_selection_through_the_cli_keeps_the_best_layers_that_fit(warm, tmp_path):
    one = json.loads((warm / "one" / "fisher.json").read_text())
    per_layer = one["trainable_parameters"] // 2  # the same adapter on every layer: each costs the same
    budget = 3 * per_layer + per_layer // 2
    shutil.copytree(warm / "one" / "warmup", tmp_path / "b" / "warmup")
    run_floe([*COMMON, "--output", str(tmp_path / "b"), "--select", "budget", "--budget", str(budget)])
    fisher = json.loads((tmp_path / "b" / "fisher.json").read_text())
    scores = {int(layer): s for layer, s in fisher["scores"].items()}
    assert fisher["selected_layers"] == sorted(sorted(scores, key=scores.get, reverse=True)[:3])
    allocation = Allocation.load(tmp_path / "b" / "allocation.json")
    assert sorted(allocation.layers) == fisher["selected_layers"]
    assert allocation.trainable_parameters == 3 * per_layer <= budget


def test_outputs_load_back_and_warmup_is_reused(warm):
    from PIL import Image

    out = warm / "one"
    fisher = json.loads((out / "fisher.json").read_text())
    assert fisher["mode"] == "mask" and len(fisher["selected_layers"]) == 2
    assert set(fisher["seconds"]) == {"warmup", "score", "total"}
    allocation = Allocation.load(out / "allocation.json")
    assert sorted(allocation.layers) == fisher["selected_layers"]
    assert allocation.method == "floe" and allocation.trainable_parameters == fisher["trainable_parameters"]
    assert Image.open(out / "fisher.png").size[0] > 100
    again = run_floe([*COMMON, "--output", str(out), "--k", "2", "--select", "refine"])
    assert "trained" not in again.stdout  # the warm-up checkpoint was reused, not retrained


def test_bad_inputs_fail_with_clear_errors(warm, tmp_path):
    proc = run_floe([*COMMON, "--output", str(tmp_path / "k"), "--k", "9"], check=False)
    assert proc.returncode == 2 and "k=9 is larger than the number of scored layers (4)" in proc.stderr
    assert not (tmp_path / "k" / "warmup").exists()  # refused before any warm-up work
    proc = run_floe([*COMMON, "--output", str(tmp_path / "few"), "--samples", "4"], check=False)
    assert proc.returncode == 2 and "cannot fill one mini-batch" in proc.stderr
    assert not (tmp_path / "few" / "warmup").exists()
    proc = run_floe([*COMMON, "--output", str(tmp_path / "z"), "--samples", "0"], check=False)
    assert proc.returncode == 2 and "score.samples must be >= 1, got 0" in proc.stderr
    proc = run_floe([*COMMON, "--output", str(warm / "one"), "--warmup-steps", "5"], check=False)
    assert proc.returncode == 2 and "warm-up made with other settings" in proc.stderr


def test_a_warm_up_of_other_steps_is_not_reused_but_one_under_another_zero_stage_is():
    from floe_dist.recipe import load_recipe
    from floe_dist.resume import changed_settings
    from floe_dist.stages.score import WARMUP_MAY_CHANGE, warmup_recipe
    from floe_dist.trainer import HOW_TO_RUN, run_settings

    def changed(*overrides: str) -> set[str]:
        saved, now = (run_settings(warmup_recipe(load_recipe("tiny", list(o)))) for o in ((), overrides))
        return set(changed_settings(saved, now, HOW_TO_RUN | WARMUP_MAY_CHANGE))

    assert changed("--score.warmup_steps", "5") == {"train.steps"}
    assert changed("--parallel.zero", "0", "--parallel.nproc", "1") == set()
    assert changed("--train.steps", "99") == set()  # the final training's length is not the warm-up's
