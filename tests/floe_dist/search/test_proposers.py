"""SMAC's proposals are a function of the seed and the results it is told, not of the process that asks, and
successive halving's rungs hold distinct configurations."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]  # not tests.conftest's: the driving processes below need no torch


def drive(out: Path, rounds: int = 24, pending: str = "none", watch=None, model_data: str = "budget") -> list:
    """``rounds`` sequential ask/tell rounds of the real SmacProposer on a synthetic cost (best at rank 4, lr 1e-2),
    no training: [[config, budget, origin, cost], ...] in the order asked. ``watch(proposer, ledger)`` is called
    once the proposer exists."""
    from floe_dist.recipe import SearchSection
    from floe_dist.search.ledger import Ledger
    from floe_dist.search.proposers import SmacProposer

    out.mkdir(parents=True)
    args = SearchSection(mode="smac", brackets="sh", random_interleave=0.2, ranks="1,2,4,8,16,32", lr="1e-4:1e-1",
                         min_steps=3, max_steps=27, initial_configs=3, seed=0, pending=pending, model_data=model_data)
    ledger = Ledger(out / "search.json", args)
    proposer = SmacProposer(args, out)
    if watch:
        watch(proposer, ledger)
    for _ in range(rounds):
        trial = proposer.ask(ledger)
        rank, lr = trial.config["rank"], trial.config["lr"]
        trial.cost = abs(math.log2(rank) - 2) + abs(math.log10(lr) + 2) + 1 / trial.budget
        trial.status = "success"
        ledger.save()
        proposer.tell(trial)
    return [[t.config, t.budget, t.origin, t.cost] for t in ledger.trials]


DRIVE = "import json, sys; from pathlib import Path; from tests.floe_dist.search.test_proposers import drive; " \
        "print(json.dumps(drive(Path(sys.argv[1]), rounds=17)))"  # the model proposes from the 14th round on


def proposals(tmp_path, hash_seed: int) -> list:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    proc = subprocess.run([sys.executable, "-c", DRIVE, str(tmp_path / f"hash{hash_seed}")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_smac_proposes_the_same_trials_whatever_the_process_hash_seed(tmp_path):
    """SMAC orders its local search's start points through a set of Configurations (string hashes): without
    ``ordered_maximizer`` these two runs part at the first model proposal."""
    first, second = proposals(tmp_path, 1), proposals(tmp_path, 2)
    assert sum(origin == "model" for _, _, origin, _ in first) >= 4  # the surrogate really proposed
    assert first == second


def test_the_first_rung_is_nine_configurations_and_promotes_its_three_best(tmp_path):
    """Without ``distinct_configs`` SMAC's first random configuration repeats the initial design's first (it seeds
    both samplers alike): the rung held it twice, halving promoted two configurations (the repeat twice), and the
    ninth budget-3 trial came from the next bracket, drawn before the first rung's results were in."""
    trials = drive(tmp_path / "search")
    rung1 = [(json.dumps(config, sort_keys=True), cost) for config, budget, _, cost in trials if budget == 3][:9]
    rung2 = [json.dumps(config, sort_keys=True) for config, budget, *_ in trials if budget == 9][:3]
    assert [budget for _, budget, *_ in trials[:9]] == [3] * 9
    assert len({config for config, _ in rung1}) == 9
    assert sorted(rung2) == sorted(config for config, _ in sorted(rung1, key=lambda item: item[1])[:3])


def test_one_worker_finishes_a_bracket_before_its_successor_is_drawn(tmp_path):
    """One trial at a time, successive halving runs 9, 3 and 1 trials (budgets 3, 9, 27), and the next bracket's
    configurations are drawn only then, from a model that has seen every result of the first. SMAC's pass over its
    rungs used to promote into a stage it had already walked, find nothing to run and draw the next bracket as soon
    as the first rung's results were in; one of its configurations then ran before the top-budget promotion."""
    drawn_after = []  # per configuration SMAC draws: how many trials had finished

    def watch(proposer, ledger):
        intensifier = proposer.smac.intensifier
        inner = intensifier._config_generator

        def counting():
            for config in inner:
                drawn_after.append(len(ledger.finished()))
                yield config

        intensifier._config_generator = counting()

    trials = drive(tmp_path / "search", rounds=14, watch=watch)
    assert [budget for _, budget, *_ in trials] == [3] * 9 + [9] * 3 + [27] + [3]
    assert drawn_after[:9] == [0] * 9 and drawn_after[9:18] == [13] * 9


def test_configurations_drawn_and_not_yet_run_join_the_models_data_as_the_worst_result(tmp_path):
    """Successive halving draws a rung's 9 configurations before any of them runs, so SMAC takes them from one fit.
    With ``pending="worst"`` (a constant liar) every configuration drawn and not yet run is in the model's data at
    the worst cost seen, so that each proposal moves the next away; SMAC's own way (``none``) leaves them out."""
    selectors = {}

    def keep(name):
        return lambda proposer, ledger: selectors.__setitem__(name, proposer.smac._config_selector)

    for name in ("none", "worst"):  # 14 rounds: the first bracket, then one trial of the second bracket's rung
        drive(tmp_path / name, rounds=14, pending=name, watch=keep(name))
    x_plain, y_plain, _ = selectors["none"]._collect_data()
    x_lied, y_lied, _ = selectors["worst"]._collect_data()
    assert x_plain.shape[0] == 3  # the 9-step results, the highest budget with dims + 1 of them
    assert (x_lied[:3] == x_plain).all() and (y_lied[:3] == y_plain).all()
    assert x_lied.shape[0] == 3 + 8 and (y_lied[3:] == y_plain.max()).all()  # the rung's 8 others, not yet run


def test_the_pooled_model_learns_each_configuration_once_at_the_highest_budget_it_reached(tmp_path):
    """``model_data="pooled"``: one row per configuration with a result, its cost that of its highest budget (SMAC's
    own rule learns from one budget: here the 3 results at 9 steps)."""
    import numpy as np
    from ConfigSpace import Configuration

    kept = {}
    trials = drive(tmp_path / "search", rounds=14, model_data="pooled",
                   watch=lambda proposer, ledger: kept.update(selector=proposer.smac._config_selector,
                                                              space=proposer.smac.scenario.configspace))
    highest = {}  # configuration -> (budget, cost) of its highest budget
    for config, budget, _, cost in trials:
        key = json.dumps(config, sort_keys=True)
        if budget >= highest.get(key, (0, None))[0]:
            highest[key] = (budget, cost)
    X, Y, _ = kept["selector"]._collect_data()
    assert X.shape[0] == len(highest) == 10
    by_row = []
    for row in X:
        key = next(k for k in highest if np.allclose(Configuration(kept["space"], values=json.loads(k)).get_array(), row))
        by_row.append(highest[key][1])
    assert list(np.argsort(Y.ravel(), kind="stable")) == list(np.argsort(by_row, kind="stable"))  # a monotone scale
    assert {budget for budget, _ in highest.values()} == {3, 9, 27}


def test_a_free_worker_waits_for_the_result_that_lets_the_model_propose(tmp_path):
    """Two workers, Hyperband over 8 and 24 steps, 3 initial configurations: when the second of them finishes, the
    first bracket has nothing to issue (its third trial runs) and the model has 2 results, one fewer than it needs,
    so asking now would draw the next bracket's configuration at random. The proposer says to wait; once the third
    result is in, the promotion and then a model proposal follow."""
    from floe_dist.recipe import SearchSection
    from floe_dist.search.ledger import Ledger
    from floe_dist.search.proposers import SmacProposer

    def start(name: str):
        out = tmp_path / name
        out.mkdir()
        args = SearchSection(mode="smac", brackets="hyperband", ranks="1,2,4,8,16,32", lr="1e-4:1e-1",
                          min_steps=8, max_steps=24, initial_configs=3, random_interleave=0.0, seed=0)
        return Ledger(out / "search.json", args), SmacProposer(args, out)

    def finish(ledger, proposer, trial) -> None:
        rank, lr = trial.config["rank"], trial.config["lr"]
        trial.cost, trial.status = abs(math.log2(rank) - 2) + abs(math.log10(lr) + 2) + 1 / trial.budget, "success"
        ledger.save()
        proposer.tell(trial)

    def up_to_the_wait(ledger, proposer):
        first, second = proposer.ask(ledger), proposer.ask(ledger)  # both workers busy
        finish(ledger, proposer, first)
        third = proposer.ask(ledger)
        finish(ledger, proposer, second)  # a worker is free; the third trial still runs
        return third

    ledger, proposer = start("waits")
    third = up_to_the_wait(ledger, proposer)
    assert [t.origin for t in ledger.trials] == ["initial design"] * 3
    assert proposer.waits(ledger)
    finish(ledger, proposer, third)
    assert not proposer.waits(ledger)
    promoted, proposed = proposer.ask(ledger), proposer.ask(ledger)
    assert promoted.budget == 24 and promoted.config in [t.config for t in ledger.trials[:3]]
    assert proposed.budget == 24 and proposed.origin == "model"
    assert not proposer.waits(ledger)  # nothing to wait for: the model has its data

    ledger, proposer = start("asks-anyway")  # the same search, asking at the point where the proposer waits
    up_to_the_wait(ledger, proposer)
    assert proposer.ask(ledger).origin == "random"


def test_the_smac_patches_refuse_a_smac_they_were_not_tested_on_and_the_pin_is_that_smac(monkeypatch):
    import importlib.metadata
    import re

    from floe_dist.search import smac_patches

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.5.0")
    with pytest.raises(ImportError, match=r"supports smac 2\.4\.1; smac 2\.5\.0 is installed"):
        smac_patches.check_version()
    pins = re.findall(r'"smac([^"]*)"', (REPO / "pyproject.toml").read_text())
    assert pins == [f"=={v}" for v in smac_patches.SUPPORTED]
