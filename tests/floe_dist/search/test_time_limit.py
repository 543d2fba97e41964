"""A time-limited search prices a trial as a fixed part (loading, validation scoring) plus its trained steps, from
what the finished trials report, so that a short first rung does not make longer trials look dearer than they are."""
from __future__ import annotations

import math
import time

import pytest

from floe_dist.recipe import SearchSection
from floe_dist.search.ledger import Ledger
from floe_dist.search.loop import SearchLoop, trial_prices
from floe_dist.search.proposers import Limits, SmacProposer

# The default SST-2 campaign at a 500 s budget (seed 0), run before trials were priced in two parts: its first
# Hyperband bracket, three 8-step trials and the promotion to 24 steps, which continued from step 8. (wall seconds,
# train_seconds) as its ledger recorded them; it stopped there, with 64 s left on 2 workers.
SST2_FIRST_BRACKET = [(27.4, 9.76), (27.6, 9.93), (23.8, 8.52), (31.8, 17.34)]
SPLIT = (sum(s - t for s, t in SST2_FIRST_BRACKET) / 4, sum(t for _, t in SST2_FIRST_BRACKET) / 40)  # 40 trained
PER_STEP_ONLY = (0.0, sum(s for s, _ in SST2_FIRST_BRACKET) / 40)


def search_args(**kw) -> SearchSection:
    return SearchSection(mode="smac", brackets="hyperband", ranks="2,4,8", lr="1e-4:1e-2", min_steps=8,
                         max_steps=24, initial_configs=3, random_interleave=0.0, seed=0, **kw)


def first_bracket(tmp_path, report_training: bool = True):
    """The proposer and ledger once SST-2's first bracket has finished, with its measured seconds."""
    args = search_args()
    ledger, proposer = Ledger(tmp_path / "search.json", args), SmacProposer(args, tmp_path)
    for i, (seconds, train_seconds) in enumerate(SST2_FIRST_BRACKET):
        trial = proposer.ask(ledger)
        assert trial.budget == (24 if i == 3 else 8)
        trial.status, trial.cost, trial.seconds = "success", 0.5 - 0.01 * i, seconds
        trial.metrics = {"cost": trial.cost, **({"train_seconds": train_seconds} if report_training else {})}
        ledger.save()
        proposer.tell(trial)
    return ledger, proposer


def test_a_trial_is_priced_as_its_fixed_part_plus_its_trained_steps(tmp_path):
    ledger, _ = first_bracket(tmp_path / "split")
    assert ledger.resumes_from(ledger.trials[3]) == 8  # the promotion trained 16 steps
    assert trial_prices(ledger) == pytest.approx(SPLIT)
    assert SPLIT == pytest.approx((16.26, 1.139), abs=0.01)  # SST-2: 1.1 s a step, 16 s of loading and scoring
    ledger, _ = first_bracket(tmp_path / "unreported", report_training=False)  # a trial program that reports none
    assert trial_prices(ledger) == pytest.approx(PER_STEP_ONLY)
    assert trial_prices(Ledger(tmp_path / "empty.json", search_args())) is None  # no result: the first bracket runs


def test_the_second_bracket_starts_when_its_priced_trials_fit_the_seconds_left(tmp_path):
    """Hyperband over 8 and 24 steps: the second bracket is two fresh 24-step trials (48 steps). With 64 s left on
    2 workers (what that campaign had, 128 worker-seconds), priced per step only it needs 2 x 24 x 2.77 = 133 s and
    the search used to stop after one bracket; priced as measured it needs 2 x 16.3 + 48 x 1.14 = 87 s."""
    ledger, proposer = first_bracket(tmp_path)
    room = 64.0 * 2
    assert proposer.fits(ledger, Limits(math.inf, 100, room, *SPLIT))
    assert not proposer.fits(ledger, Limits(math.inf, 100, room, *PER_STEP_ONLY))
    assert not proposer.fits(ledger, Limits(math.inf, 100, 86.0, *SPLIT))  # less than the bracket: it does not start
    assert proposer.fits(ledger, Limits(math.inf, 100, 88.0, *SPLIT))
    assert not proposer.fits(ledger, Limits(48 + 47, 100, room, *SPLIT))  # 48 steps used: the compute cap holds
    trial = proposer.ask(ledger)
    assert trial.budget == 24 and trial.config not in [t.config for t in ledger.trials[:-1]]  # a fresh 24-step trial
    assert proposer.fits(ledger, Limits(math.inf, 100, 16.26 + 24 * 1.139 + 0.1, *SPLIT))  # its sibling's seconds
    assert not proposer.fits(ledger, Limits(math.inf, 100, 16.26 + 24 * 1.139 - 0.1, *SPLIT))


def test_the_seconds_left_are_the_workers_time_less_what_the_running_trials_still_need(tmp_path):
    """A time limit of 100 s, 20 s gone, 2 workers: 160 worker-seconds, less the running promotion's price (16
    trained steps) minus the 10 s it has run."""
    ledger, proposer = first_bracket(tmp_path)
    ledger.trials[3].status = "running"  # the promotion is still training
    loop = SearchLoop(search_args(time_limit=100.0, workers=2), tmp_path, ledger, proposer, spec=None,
                      start=time.time() - 20.0)
    loop.started = {3: time.time() - 10.0}
    per_trial, per_step = trial_prices(ledger)  # from the three 8-step trials
    limits = loop.limits()
    assert (limits.per_trial, limits.per_step) == (per_trial, per_step)
    assert limits.seconds == pytest.approx(80.0 * 2 - (per_trial + 16 * per_step - 10.0), abs=0.5)
    assert (limits.steps, limits.trials) == (loop.args.max_compute * 24, loop.args.max_trials)
    no_limit = SearchLoop(search_args(workers=2), tmp_path, ledger, proposer, spec=None)
    assert no_limit.limits().seconds == math.inf
