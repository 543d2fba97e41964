"""Do the search's rungs rank configurations as the final run's outcome does, now that trials are its first steps?

    python benchmarks/bench_rank_agreement.py    # smollm2-arithmetic, seeds 0 1 2, rungs 8 24, final 320 (~50 min)
    python benchmarks/bench_rank_agreement.py --config smollm2-sst2 --final 400 --result rank_agreement_sst2  # ~1.6 h

Per seed, side by side in one run: ``floe-dist allocate --method uniform`` (the allocation the campaign chose in
every seed of its arithmetic comparison), then the search's own trials in grid mode (warm workers, the recipe's
trial settings: fit split, its batch, scored by the answer loss and the generated number, or the choice
cross-entropy and accuracy on a multiple-choice task, on the first ``val_limit`` validation examples) over rank {4,
16} x lr {3e-4, 9.5e-4, 3e-3} (3 log-spaced points), each a prefix of one ``--final``-step run (warm-up of 8 steps,
then constant, the 1-sqrt cooldown over its last 20%: the recipe's wsd schedule, ``train.steps`` = ``--final``): at
each rung (8 and 24: the halving the arithmetic recipe searched with) and at ``--final`` steps, the whole run with
its cooldown. Each final adapter is then scored on the first ``--outcome`` examples of the validation split (exact
numeric match of the generated answer, or the chosen option on a multiple-choice task, as the campaign scores the
test split; a split smaller than ``--outcome`` is scored whole: SST-2's 150). For comparison, each rung is also run
as a whole run of its own length, its cooldown included ("cooled"): what a trial scored after a decay would rank
(the issue's decayed scoring branch, approximated by a run that decays within the same steps). No test example is
used. Result: benchmarks/results/rank_agreement.json (or ``--result``), one row per seed, written as each seed
finishes; BENCHMARKS.md gives Kendall's tau-b between each rung's ordering and the outcome's, and what picking each
rung's best would have cost.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_search_fidelity import cli  # noqa: E402
from benchmarks.result_file import write_result  # noqa: E402


def grid(config: str, allocation: Path, steps: int, final: int, seed: int, out: Path) -> dict[tuple, dict]:
    """The grid's trials at ``steps``, each the first ``steps`` of a ``final``-step run (``final`` = ``steps``: a
    whole run of its own, cooldown included): {(rank, lr): trial}."""
    cli("search", "--config", config, "--mode", "grid", "--candidates", f"uniform={allocation}", "--ranks", "4,16",
        "--lr", "3e-4:3e-3", "--grid-lr-points", "3", "--max-steps", str(steps), "--train.steps", str(final),
        "--train.warmup_steps", "8", "--trial-accuracy", "true", "--seed", str(seed), "--trial-seed", str(seed),
        "--output", str(out))
    trials = {}
    for t in json.loads((out / "search.json").read_text())["trials"]:
        assert t["status"] == "success", t
        trials[(int(t["config"]["rank"]), round(float(t["config"]["lr"]), 8))] = {
            "cost": t["cost"], "val_accuracy": t["metrics"]["val_accuracy"], "seconds": t["seconds"],
            "adapter": str(out / "lines" / f"{t['id']:04d}" / "train" / "adapter")}
    return trials


def outcome(config: str, adapter: str, limit: int, out: Path) -> dict:
    """The adapter on the first ``limit`` validation examples, scored as the campaign's final evaluation."""
    cli("evaluate", "--config", config, "--model.adapter", adapter, "--evaluate.split", "val", "--evaluate.limit",
        str(limit), "--output", str(out))
    return json.loads(out.read_text())


def one_seed(config: str, seed: int, rungs: list[int], final: int, limit: int) -> dict:
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cli("allocate", "--config", config, "--method", "uniform", "--output", str(out / "uniform.json"))
        per_budget = {steps: grid(config, out / "uniform.json", steps, final, seed, out / f"grid-{steps}")
                      for steps in [*rungs, final]}
        cooled = {steps: grid(config, out / "uniform.json", steps, steps, seed, out / f"cooled-{steps}")
                  for steps in rungs}
        configs = []
        for key, last in per_budget[final].items():
            scored = outcome(config, last["adapter"], limit, out / f"outcome-{key[0]}-{key[1]}.json")
            row = {"rank": key[0], "lr": key[1], f"val_accuracy_{final}": scored["accuracy"],
                   f"val_loss_{final}": scored["loss"], "outcome_examples": scored["examples"]}
            for steps, trials in per_budget.items():
                row[f"cost_{steps}"] = trials[key]["cost"]
                row[f"{'trial_' if steps == final else ''}val_accuracy_{steps}"] = trials[key]["val_accuracy"]
            for steps, trials in cooled.items():
                row[f"cooled_cost_{steps}"] = trials[key]["cost"]
                row[f"cooled_val_accuracy_{steps}"] = trials[key]["val_accuracy"]
            configs.append(row)
    return {"seed": seed, "recipe": config, "budgets": [*rungs, final], "outcome_examples": limit,
            "configs": configs, "wall_s": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smollm2-arithmetic")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rungs", type=int, nargs="+", default=[8, 24], help="the search's trial lengths")
    parser.add_argument("--final", type=int, default=320, help="steps of the final run the trials are prefixes of")
    parser.add_argument("--outcome", type=int, default=300, help="validation examples scoring the final adapters")
    parser.add_argument("--result", default="rank_agreement", help="benchmarks/results/NAME.json")
    ns = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for seed in ns.seeds:
        row = one_seed(ns.config, seed, sorted(ns.rungs), ns.final, ns.outcome)
        for c in row["configs"]:
            costs = ", ".join(f"{s} steps {c[f'cost_{s}']:.4f}" for s in row["budgets"])
            print(f"seed {seed} r={c['rank']:<3} lr {c['lr']:.1e} {costs}; validation accuracy after {ns.final} "
                  f"steps {c[f'val_accuracy_{ns.final}']:.3f}", flush=True)
        write_result(ns.result, [row], merge_key="seed")


if __name__ == "__main__":
    main()
