"""SMAC's proposals are a function of the seed and the results it is told, not of the process that asks, and
successive halving's rungs hold distinct configurations."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def drive(out: Path, rounds: int = 24, pending: str = "none") -> list:
    """``rounds`` sequential ask/tell rounds of the real SmacProposer on a synthetic cost (best at rank 4, lr 1e-2),
    no training: [[config, budget, origin, cost], ...] in the order asked."""
    from floe_dist.search.ledger import Ledger
    from floe_dist.search.proposers import SmacProposer
    from floe_dist.stages.search import SearchArgs

    out.mkdir(parents=True)
    args = SearchArgs(output=str(out), mode="smac", ranks="1,2,4,8,16,32", lr="1e-4:1e-1", min_steps=3, max_steps=27,
                      initial_configs=3, seed=0, pending=pending)
    ledger = Ledger(out / "search.json", args)
    proposer = SmacProposer(args, out)
    for _ in range(rounds):
        trial = proposer.ask(ledger)
        rank, lr = trial.config["rank"], trial.config["lr"]
        trial.cost = abs(math.log2(rank) - 2) + abs(math.log10(lr) + 2) + 1 / trial.budget
        trial.status = "success"
        ledger.save()
        proposer.tell(trial)
    return [[t.config, t.budget, t.origin, t.cost] for t in ledger.trials]


DRIVE = "import json, sys; from pathlib import Path; from tests.floe_dist.search.test_proposers import drive; " \
        "print(json.dumps(drive(Path(sys.argv[1]))))"


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


def test_a_rung_drawn_from_one_fit_spreads_when_proposals_not_yet_run_count_as_the_worst(tmp_path):
    """Successive halving draws the second bracket's 9 configurations before any of them runs, so SMAC takes them all
    from one fit. Its own way (``pending="none"``), fitted on the 3 results at 9 steps, proposes the same rank nine
    times; with each drawn configuration counted as the worst result (a constant liar) the rung spreads over several
    ranks and halving carries the best rank (4) to the top budget."""
    def second_bracket(trials):
        rung = [config["rank"] for config, budget, *_ in trials[9:] if budget == 3][:9]
        top = [config["rank"] for config, budget, *_ in trials if budget == 27]
        return rung, top[1]

    plain_rung, plain_top = second_bracket(drive(tmp_path / "none", rounds=27, pending="none"))
    liar_rung, liar_top = second_bracket(drive(tmp_path / "worst", rounds=27, pending="worst"))
    assert len(plain_rung) == len(liar_rung) == 9
    assert len(set(plain_rung)) == 1 and plain_top != 4
    assert len(set(liar_rung)) >= 3 and liar_top == 4
