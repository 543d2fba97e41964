"""Choices made beyond noise: the lowest validation cost wins only where the paired per-example costs separate it
from a cheaper configuration (floe_dist/search/report.py ``decide``)."""
from __future__ import annotations

from floe_dist.recipe import SearchSection
from floe_dist.search.ledger import Ledger
from floe_dist.search.report import decide


def ledger_of(tmp_path, trials: list[tuple[int, int, list[float]]]) -> Ledger:
    """(rank, budget, per-example costs) per trial, all successful."""
    ledger = Ledger(tmp_path / "search.json", SearchSection())
    for rank, budget, costs in trials:
        t = ledger.add({"rank": rank, "lr": 1e-3}, budget)
        t.status, t.cost, t.metrics = "success", sum(costs) / len(costs), {"example_costs": costs}
    return ledger


def rank(trial) -> int:
    return trial.config["rank"]


def test_a_cheaper_configuration_within_noise_of_the_lowest_cost_is_chosen(tmp_path):
    noisy = [0.2, 0.9, 0.1, 0.8, 0.3, 0.7, 0.4, 0.6]  # the rank-8 trial's costs, example by example
    shifted = [c + d for c, d in zip(noisy, [0.3, -0.2, 0.25, -0.25, 0.2, -0.2, 0.1, -0.1])]  # +0.0125, noisy
    ledger = ledger_of(tmp_path, [(8, 24, noisy), (2, 24, shifted), (4, 8, [0.0] * 8)])
    chosen, tied = decide(ledger, rank, separation=2.0)
    assert ledger.incumbent().config["rank"] == 8  # the lowest cost at the top budget
    assert chosen.config["rank"] == 2 and {t.config["rank"] for t in tied} == {2, 8}  # the 8-step trial is not
    assert decide(ledger, rank, separation=0.0)[0].config["rank"] == 8


def test_a_margin_beyond_noise_keeps_the_lowest_cost(tmp_path):
    costs = [0.2, 0.9, 0.1, 0.8, 0.3, 0.7, 0.4, 0.6]
    ledger = ledger_of(tmp_path, [(8, 24, costs), (2, 24, [c + 0.05 for c in costs])])  # worse on every example
    chosen, tied = decide(ledger, rank, separation=2.0)
    assert chosen.config["rank"] == 8 and tied == [chosen]
