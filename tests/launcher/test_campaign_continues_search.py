"""A campaign pays for its search: trials are the first steps of the final run, promotions continue their line's
checkpoint, the final run continues the winning line (floe_dist/search/handoff.py), and a budget sets how long
the search and the final run take."""
from __future__ import annotations

import json

import pytest

from floe_dist.recipe import TrainSection, read_recipe
from floe_dist.schedule import warmup_stable_decay
from launcher.campaign import FORKED_START_MARGIN, START_MARGIN, eval_scale
from tests.conftest import read_metrics, run_floe, run_here


def test_a_wsd_schedule_is_the_prefix_of_every_longer_one_and_its_cooldown_ends_above_zero():
    short, long = warmup_stable_decay(50, 5, 10), warmup_stable_decay(400, 5, 80)
    assert [short(s) for s in range(40)] == [long(s) for s in range(40)]
    assert short(0) == 0.2 and short(4) == 1.0 and short(39) == 1.0 and 0 < short(49) < short(40) < 1.0
    assert TrainSection(steps=50).decay_steps(50) == 10 and TrainSection(schedule="cosine").decay_steps(50) == 0


def test_the_final_run_continues_the_winning_trial_and_equals_a_straight_run(tmp_path):
    """The default recipe's path (allocate.method uniform, one process): no score stage; the search's one candidate
    is the allocate stage's, so it tunes the rank and learning rate of adapters on every layer. Without dropout and
    on the split the trials train on, the campaign's final adapter (the winning line's first steps, continued)
    equals one run of its recipe from step 0; no step of the winning line is trained twice."""
    from safetensors.torch import load_file

    from floe_dist.recipe import Recipe

    assert Recipe().allocate.method == "uniform" and Recipe().search.allocations == "uniform"
    out = tmp_path / "c"
    run_floe(["campaign", "--config", "tiny", "--allocate.method", "uniform", "--parallel.nproc", "1",
              "--parallel.zero", "0", "--adapter.dropout", "0", "--train.split", "fit", "--search.min_steps", "1",
              "--search.max_steps", "3", "--output", str(out)])
    assert not (out / "allocate" / "fisher.json").exists()
    assert json.loads((out / "allocate_stage.json").read_text())["layers"] == [0, 1, 2, 3]
    ledger = json.loads((out / "search" / "search.json").read_text())
    summary, trials = ledger["summary"], ledger["trials"]
    assert set(summary["candidates"]) == {"uniform"} and summary["allocation"] == "uniform"
    allocation = json.loads((out / "train" / "allocation.json").read_text())
    assert sorted(map(int, allocation["layers"])) == [0, 1, 2, 3]
    assert {r for mods in allocation["layers"].values() for m in mods.values() for r in m["ranks"]} == \
        {summary["rank"]}
    promoted = [t for t in trials if t["budget"] == 3 and any(
        u["config"] == t["config"] and u["budget"] == 1 for u in trials)]
    assert promoted and all(t["metrics"]["resumed_from"] == 1 for t in promoted)  # continued, not restarted
    assert summary["steps_reused"] == len(promoted)
    assert summary["trained_steps"] == sum(t["budget"] for t in trials) - len(promoted)
    first = min(t["id"] for t in trials if t["config"] == summary["incumbent"]["config"])
    line = out / "search" / "lines" / f"{first:04d}"
    assert summary["line"] == str(line)
    handoff = json.loads((out / "train" / "handoff.json").read_text())
    assert handoff == {"line": str(line / "train"), "step": 3}
    line_steps = [m["step"] for m in read_metrics(line / "train")]
    final_steps = [m["step"] for m in read_metrics(out / "train")]
    assert line_steps == [1, 2, 3] and final_steps == [4, 5, 6]  # every position of the stream once
    campaign = json.loads((out / "campaign.json").read_text())
    assert campaign["steps_reused"] == 3 and campaign["train_steps"] == 6
    assert campaign["method"] == "uniform" and campaign["lr"] == summary["lr"]
    straight = tmp_path / "straight"
    trained = read_recipe(out / "train" / "recipe.yaml")
    assert trained.train.lr == summary["lr"] and trained.train.split == "fit"
    run_floe(["train", "--config", str(out / "train" / "recipe.yaml"), "--output", str(straight)])
    a = load_file(str(out / "train" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].sub(b[key]).abs().max().item() <= 1e-6 * max(1.0, b[key].abs().max().item()), key


def test_a_final_run_the_line_cannot_continue_starts_from_step_0_and_says_why(tmp_path):
    from dataclasses import replace

    from floe_dist.recipe import load_recipe
    from floe_dist.search.handoff import why_not

    """... and the budget: the search is given its share of what allocation left, the final run the rest less the
    final evaluation's time, and the final run sets its length from its own speed (more steps than the recipe's
    nominal 6). The search's one trial leaves its second worker free: that worker runs the zero-shot evaluation,
    which scores what the base model scores alone."""
    out = tmp_path / "c"
    proc = run_floe(["campaign", "--config", "tiny", "--allocate.method", "uniform", "--parallel.nproc", "1",
                     "--parallel.zero", "0", "--search.micro_batch", "1", "--search.max_compute", "1",
                     "--search.min_steps", "3", "--search.workers", "2", "--campaign.budget", "45s",
                     "--output", str(out)])
    handoff = json.loads((out / "train" / "handoff.json").read_text())
    assert handoff["step"] == 0 and "global batch (1) is not the final run's (2)" in handoff["reason"]
    assert "train starts from step 0" in proc.stdout and read_metrics(out / "train")[0]["step"] == 1
    searched, trained = (read_recipe(out / stage / "recipe.yaml") for stage in ("search", "train"))
    assert trained.train.warmup_steps == searched.train.warmup_steps == 1  # fixed before any trial: 10% of 6
    # the split, from the stage times the campaign recorded: the search gets 30% of what allocation left (and a
    # stage's start), the final run the rest, less a final evaluation as long as the zero-shot one took
    summary = json.loads((out / "campaign.json").read_text())
    took, zero_shot = summary["stage_seconds"], json.loads((out / "zero_shot.json").read_text())
    assert summary["start_margin_seconds"] == FORKED_START_MARGIN  # its stages were forked from its zygote
    (spare,) = json.loads((out / "search" / "search.json").read_text())["summary"]["spare_work"]
    assert zero_shot["on_search_worker"] and spare["status"] == "success" and spare["worker"].startswith("warm:1:")
    assert zero_shot["threads"] == 1 and zero_shot["reserve_seconds"] == zero_shot["seconds"]  # as many as here
    left = 45 - took["prepare"] - took["allocate"] - FORKED_START_MARGIN
    assert searched.search.time_limit == pytest.approx(0.3 * left)
    assert trained.train.time_limit == pytest.approx(left - took["search"] - took["zero_shot"] - zero_shot["seconds"]
                                                     - took["imports"])  # the wait for the zygote, before the limit
    run_floe(["evaluate", "--config", str(out / "zero_shot" / "recipe.yaml"), "--output", str(tmp_path / "alone")])
    alone = json.loads((tmp_path / "alone" / "evaluate.json").read_text())
    assert (alone["accuracy"], alone["examples"]) == (zero_shot["accuracy"], zero_shot["examples"])
    assert alone["loss"] == pytest.approx(zero_shot["loss"], abs=1e-6)
    fixed = json.loads((out / "train" / "steps.json").read_text())  # set when its cooldown was due
    steps, cooldown_start = fixed["steps"], fixed["set_at_step"]
    first = fixed["retimed"][0]["from"] if "retimed" in fixed else steps  # the length set (then perhaps moved)
    metrics = read_metrics(out / "train")
    assert steps > 6 and [m["step"] for m in metrics] == list(range(1, steps + 1))
    lrs = [m["lr"] for m in metrics]
    assert first - round(0.2 * first) <= cooldown_start < min(first, steps)
    assert set(lrs[1:cooldown_start]) == {lrs[1]}  # warm-up (1 step), constant, then down to the last step
    assert all(a > b for a, b in zip(lrs[cooldown_start - 1:], lrs[cooldown_start:])) and lrs[-1] > 0
    assert json.loads((out / "campaign.json").read_text())["budget_seconds"] == 45
    chosen = out / "search" / "allocation.json"
    lr = json.loads(chosen.read_text())["meta"]["search"]["config"]["lr"]
    final = load_recipe("tiny", ["--parallel.nproc", "1", "--parallel.zero", "0", "--allocate.file", str(chosen),
                                 "--train.lr", str(lr), "--train.micro_batch", "1"])
    line = out / "search" / "lines" / "0000" / "train"
    assert why_not(line, final, 3) is None
    assert "train.seed (0 -> 5)" in why_not(line, replace(final, train=replace(final.train, seed=5)), 3)
    assert "cooldown" in why_not(line, replace(final, train=replace(final.train, steps=4)), 3)


def test_a_budget_in_an_unknown_unit_or_too_small_is_refused_with_what_works(tmp_path, capsys):
    """An unknown unit, and a budget below the stages' starts, are refused before any stage (nothing written); a
    budget above that floor whose search share cannot start a trial once zero-shot and allocation are measured is
    refused before the search; a resumed campaign whose budget changed says what the stages still to run get."""
    from dataclasses import replace

    from floe_dist.recipe import load_recipe
    from launcher.campaign import budgeted, smallest_budget

    out = tmp_path / "c"
    proc = run_here(["campaign", "--config", "tiny", "--campaign.budget", "2d", "--output", str(out)])
    assert proc.returncode == 2 and "campaign.budget: '2d' is not a duration; write seconds (900), 900s, 45m, 2h" \
        in proc.stderr and "Traceback" not in proc.stderr and not out.exists()
    uniform = ["campaign", "--config", "tiny", "--allocate.method", "uniform", "--parallel.nproc", "1",
               "--parallel.zero", "0", "--output", str(out)]
    recipe = load_recipe("tiny", ["--allocate.method", "uniform"])
    floor = smallest_budget(recipe)  # a trial's start in 30% of what is left, the margin kept back
    assert floor == pytest.approx(START_MARGIN + START_MARGIN / 0.3)
    assert smallest_budget(load_recipe("tiny")) == pytest.approx(floor + START_MARGIN)  # + the scoring stage's start
    no_search = load_recipe("tiny", ["--allocate.method", "uniform", "--search.enabled", "false"])
    assert smallest_budget(no_search) == pytest.approx(3 * START_MARGIN)  # the final run gets all that is left
    proc = run_here([*uniform, "--campaign.budget", "20"])
    assert proc.returncode == 2 and "campaign.budget 20 (20s) cannot hold the smallest trial and a final run" in \
        proc.stderr and f"give at least {floor:.0f}s" in proc.stderr and not out.exists()
    proc = run_here([*uniform, "--campaign.budget", "20", "--print_config"])  # --print_config reports it too
    assert proc.returncode == 2 and "cannot hold the smallest trial" in proc.stderr
    # above the floor, once the earlier stages are measured (zero-shot recorded here, so that no clock decides): an
    # evaluation of 2 s leaves the search at most 30% of 35 - 2 - 2 (kept for the final one) - 8 s, less than a
    # trial's start (allocation's own seconds only lower it)
    out.mkdir()
    (out / "prepare.json").write_text(json.dumps({"_seconds": 0.0}))
    (out / "zero_shot.json").write_text(json.dumps({"accuracy": 0.5, "_seconds": 2.0}))
    proc = run_here([*uniform, "--campaign.budget", "35"])
    assert proc.returncode == 2 and "leaves the search" in proc.stderr and "less than a trial's start" in proc.stderr
    assert "zero_shot: done earlier" in proc.stdout and not (out / "search").exists()
    capsys.readouterr()
    budgeted(replace(recipe, campaign=replace(recipe.campaign, budget="60")), out)  # a rerun with another budget
    spent = 2.0 + json.loads((out / "allocate_stage.json").read_text())["_seconds"]
    assert f"campaign.budget changed from 35 to 60: after the {spent:.0f}s the finished stages took, the stages " \
           f"still to run get {60 - spent:.0f}s instead of {35 - spent:.0f}s" in capsys.readouterr().out


def test_the_final_runs_limit_counts_the_wait_for_the_zygote_as_spent(tmp_path, monkeypatch):
    """A campaign resumed at its final run forks that run's ranks first: the zygote may still be importing the
    stack, a wait that came out of the final run's limit. ``train_time`` waits for it first and counts it."""
    import time
    from dataclasses import replace

    import floe_dist.distributed.forked_ranks as forked_ranks
    from floe_dist.recipe import load_recipe
    from launcher.campaign import Campaign, train_time

    class StillImporting:
        def ready(self) -> bool:
            time.sleep(0.3)
            return True

    monkeypatch.setattr(forked_ranks, "_ZYGOTE", [StillImporting()])
    recipe = load_recipe("tiny")
    c = Campaign(replace(recipe, campaign=replace(recipe.campaign, budget="90")), str(tmp_path))
    c.timings = {"allocate": 7.0, "search": 3.0}  # the finished stages, as a resumed campaign reads them
    left = train_time(c)
    assert c.timings["imports"] >= 0.3
    assert left == pytest.approx(90 - 10.0 - c.timings["imports"] - FORKED_START_MARGIN)


def test_a_final_run_left_no_time_is_refused_naming_the_evaluation_kept_back(tmp_path):
    """Where the final evaluation's reserve outweighs the stages spent (a generative test split: Natural Questions'
    1,128 questions at 600 s, refused after 172 s), the refusal names it and ``evaluate.limit``."""
    from dataclasses import replace

    from floe_dist.recipe import load_recipe
    from launcher.campaign import Campaign, train_time

    recipe = load_recipe("tiny")
    c = Campaign(replace(recipe, campaign=replace(recipe.campaign, budget="100")), str(tmp_path))
    c.timings, c.eval_reserve = {"search": 30.0}, 65.0
    with pytest.raises(ValueError, match=r"after 30s of earlier stages and about 65s kept for the final evaluation; "
                                         r"give at least \d+s .*or evaluate.limit"):
        train_time(c)
    c.timings, c.eval_reserve = {"search": 65.0}, 30.0
    with pytest.raises(ValueError, match=r"campaign.search_share$"):
        train_time(c)


def test_the_final_evaluation_is_kept_back_for_a_root_speed_up_of_the_threads_it_gains():
    """A zero-shot evaluation timed on one thread keeps back 1/sqrt(2) of its seconds for the final one on two (the
    ratio, a half, ran 11-18 s short on Social IQa); on as many threads or more, its own seconds."""
    assert eval_scale(1, 2) == pytest.approx(0.7071, abs=1e-4)
    assert eval_scale(1, 16) == pytest.approx(0.25)
    assert eval_scale(2, 2) == eval_scale(4, 2) == 1.0


@pytest.mark.parametrize("task", ["multiple choice", "arithmetic"])
def test_under_a_budget_the_campaigns_own_zero_shot_evaluation_takes_its_share_at_most(tmp_path, monkeypatch, task):
    """Run by the campaign itself (no spare worker), the zero-shot evaluation ends once ``campaign.zero_shot_share``
    of the budget has passed (a clock that jumps 100 s at every reading: past it when first asked, after the first
    batch) with the part it scored, and keeps back the whole split's seconds for the final one; a generative task's
    too. Without a budget it scores every example."""
    import itertools
    import types
    from dataclasses import replace

    import launcher.campaign
    from floe_dist.recipe import load_recipe
    from launcher.campaign import Campaign, whole_split_seconds

    recipe = load_recipe("tiny")
    recipe = replace(recipe, evaluate=replace(recipe.evaluate, limit=40, batch_size=4, max_new_tokens=2))
    if task == "arithmetic":
        recipe = replace(recipe, data=replace(recipe.data, task="arithmetic"))
    readings = itertools.count(step=100.0)
    monkeypatch.setattr(launcher.campaign, "time", types.SimpleNamespace(time=lambda: next(readings)))
    c = Campaign(replace(recipe, campaign=replace(recipe.campaign, budget="100")), str(tmp_path / "budget"))
    part = c.zero_shot(c.recipe)
    assert (part["examples"], part["examples_of"]) == (4, 40)  # the first batch; then the share had passed
    assert c.eval_reserve == whole_split_seconds(part)
    whole = Campaign(recipe, str(tmp_path / "none")).zero_shot(recipe)
    assert whole["examples"] == 40 and "examples_of" not in whole


def test_a_stopped_evaluation_is_scaled_to_the_whole_split_at_the_faster_of_two_paces():
    """Its loading and reading, then the split's tokens at the pace its finished chunks ran theirs, or every example
    at the trials' validation pace if faster."""
    from launcher.campaign import whole_split_seconds

    part = {"seconds": 12.0, "scoring_seconds": 10.0, "seconds_per_example": 0.5, "examples": 16, "examples_of": 40,
            "scored_tokens": 1000, "split_tokens": 2000}  # 16 examples in 8 s ran 1000 tokens: the split sorted 2000
    assert whole_split_seconds(part) == whole_split_seconds(part, pace=1.0) == 2.0 + 8.0 * 2
    assert whole_split_seconds(part, pace=0.25) == 2.0 + 0.25 * 40
    generative = {k: v for k, v in part.items() if not k.endswith("_tokens")}  # by examples: no tokens counted
    assert whole_split_seconds(generative) == 2.0 + 0.5 * 40
    assert whole_split_seconds({"seconds": 12.0, "examples": 40}) == 12.0  # not stopped: its own seconds


@pytest.mark.parametrize("task", ["multiple choice", "generative"])
def test_a_spare_zero_shot_is_scaled_at_the_trials_pace_only_where_they_score_as_it_does(tmp_path, task):
    """Run on a search worker and stopped: the reserve takes the trials' validation pace where faster for a
    multiple-choice task (a trial scores its choices as the final evaluation does), never for a generative one (a
    trial's validation may score the loss alone, without the generating that takes an evaluation's time)."""
    import torch

    from floe_dist.recipe import load_recipe, write_recipe
    from launcher.campaign import Campaign

    recipe = load_recipe("tiny")
    c = Campaign(recipe, str(tmp_path))
    write_recipe(tmp_path / "zero_shot", recipe)
    scored = {"choice_loss": 0.6} if task == "multiple choice" else {"perplexity": 2.0}
    (tmp_path / "zero_shot" / "result.json").write_text(json.dumps({
        "seconds": 12.0, "scoring_seconds": 10.0, "seconds_per_example": 0.5, "examples": 16, "examples_of": 40,
        "threads": torch.get_num_threads(), "accuracy": 0.5, "loss": 0.6, **scored}))  # this process's: no scaling
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "search.json").write_text(json.dumps(
        {"trials": [{"metrics": {"eval_seconds": 25.0, "val_examples": 100}}]}))  # 0.25 s an example
    result = c.zero_shot(recipe)
    assert result["on_search_worker"] and c.eval_reserve == (2.0 + 0.25 * 40 if task == "multiple choice" else
                                                             2.0 + 0.5 * 40)


def test_the_final_run_may_take_back_the_scoring_part_of_a_generative_tasks_reserve(tmp_path):
    """``train.eval_reserve``: the reserve less the zero-shot evaluation's loading, for a generative task whose final
    run and final evaluation each run in one process; none for multiple choice (its reserve is read at a pace that
    training does not change), on two ranks, or with lm-eval tasks (the trainer times the task's own scoring)."""
    from dataclasses import replace

    from floe_dist.recipe import load_recipe
    from launcher.campaign import Campaign, generation_reserve

    recipe = load_recipe("tiny", ["--parallel.nproc", "1", "--parallel.zero", "0", "--data.task", "arithmetic"])
    c = Campaign(recipe, str(tmp_path))
    c.eval_reserve = 30.0
    generative = {"seconds": 12.0, "scoring_seconds": 10.0, "exact_match": 0.1, "accuracy": 0.1, "examples": 32,
                  "examples_of": 8 * 32}  # stopped after one batch of a split of eight
    assert generation_reserve(c, recipe, generative) == 30.0 - 2.0
    assert generation_reserve(c, recipe, {**generative, "examples_of": 7 * 32}) is None  # too few batches to time one
    assert generation_reserve(c, recipe, {"seconds": 12.0, "scoring_seconds": 10.0, "choice_loss": 0.6}) is None
    two_ranks = replace(recipe, parallel=replace(recipe.parallel, nproc=2))
    with_lm_eval = replace(recipe, evaluate=replace(recipe.evaluate, lm_eval_tasks="arc_easy"))
    assert generation_reserve(c, two_ranks, generative) is generation_reserve(c, with_lm_eval, generative) is None


def test_the_trials_validation_pace_is_their_median_seconds_an_example(tmp_path):
    from launcher.campaign import validation_pace

    search_file = tmp_path / "search.json"
    assert validation_pace(search_file) is None  # no search ran
    trials = [{"metrics": {"eval_seconds": s, "val_examples": 100}} for s in (20.0, 30.0, 25.0)]
    search_file.write_text(json.dumps({"trials": [*trials, {"metrics": None}, {"metrics": {"cost": 1.0}}]}))
    assert validation_pace(search_file) == pytest.approx(0.25)
