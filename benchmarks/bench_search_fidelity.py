"""Do the search's short trials rank the candidates as a long training does?

    python benchmarks/bench_search_fidelity.py                 # SST-2, seeds 0 1 2, 8/24/400 steps (~25 min a seed)

The default campaign chooses between the Fisher top-8 layers and uniform LoRA on every layer, and a rank, from
trials of 8 and 24 steps, then trains its choice for the recipe's steps. If the trials' ranking of the candidates
did not hold at the final length, the search would be choosing on the wrong evidence whatever its optimiser. Per
seed, side by side in one run: the campaign's own score stage (its warm-up and Fisher pass, seeded) gives the
Fisher top-8 allocation; ``floe-dist allocate --method uniform`` the uniform one. Then the search's own trials, in
grid mode (warm workers, the recipe's trial settings: fit split, micro-batch, the first ``val_limit`` validation
examples), run every candidate x rank {4, 16} at one learning rate (1e-3, PEFT's default in the other benchmarks)
at 8, 24 and 400 steps; each 400-step trial's adapter is also scored on the whole test split. Result:
benchmarks/results/search_fidelity.json, one row per seed (the four configurations' costs per budget and
test accuracies), written as each seed finishes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402


def cli(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "launcher.cli", *argv], cwd=REPO, check=True)


def grid(config: str, candidates: str, ranks: str, lr: float, steps: int, seed: int, out: Path) -> list[dict]:
    """One grid search at ``steps``: every candidate x rank, the recipe's trial settings; its trials."""
    start = time.time()
    cli("search", "--config", config, "--mode", "grid", "--candidates", candidates, "--ranks", ranks,
        "--lr", str(lr), "--max-steps", str(steps), "--trial-accuracy", "true", "--seed", str(seed),
        "--trial-seed", str(seed),
        "--output", str(out))
    ledger = json.loads((out / "search.json").read_text())
    trials = []
    for t in ledger["trials"]:
        assert t["status"] == "success", t
        trials.append({"allocation": t["config"]["allocation"], "rank": int(t["config"]["rank"]),
                       "steps": int(t["budget"]), "cost": t["cost"],
                       "val_accuracy": t["metrics"]["val_accuracy"],
                       "adapter": str(out / "trials" / f"{t['id']:04d}" / "train" / "adapter")})
    print(f"grid at {steps} steps: {time.time() - start:.0f}s", flush=True)
    return trials


def accuracy_on_test(config: str, adapter: str) -> float:
    """The adapter's accuracy on the recipe's whole test split, evaluated as the campaign's final evaluation."""
    from dataclasses import replace

    from floe_dist.evaluation import evaluate
    from floe_dist.recipe import load_recipe

    recipe = load_recipe(config, [])
    return evaluate(replace(recipe, model=replace(recipe.model, adapter=adapter)))["accuracy"]


def one_seed(config: str, seed: int, budgets: list[int], ranks: str, lr: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.time()
        cli("score", "--config", config, "--seed", str(seed), "--output", str(out / "allocate"))
        cli("allocate", "--config", config, "--method", "uniform", "--output", str(out / "uniform.json"))
        floe = json.loads((out / "allocate" / "allocation.json").read_text())
        candidates = f"floe={out / 'allocate' / 'allocation.json'},uniform={out / 'uniform.json'}"
        per_budget = {steps: grid(config, candidates, ranks, lr, steps, seed, out / f"grid-{steps}")
                      for steps in budgets}
        longest = max(budgets)
        configs = []
        for trial in per_budget[longest]:
            key = (trial["allocation"], trial["rank"])
            row = {"allocation": key[0], "rank": key[1], "test_accuracy": accuracy_on_test(config, trial["adapter"])}
            for steps, trials in per_budget.items():
                same = next(t for t in trials if (t["allocation"], t["rank"]) == key)
                row[f"cost_{steps}"], row[f"val_accuracy_{steps}"] = same["cost"], same["val_accuracy"]
            configs.append(row)
    return {"seed": seed, "recipe": config, "lr": lr, "budgets": budgets,
            "floe_layers": sorted(map(int, floe["layers"])), "configs": configs, "wall_s": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smollm2-sst2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[8, 24, 400], help="trial steps; the last is long")
    parser.add_argument("--ranks", default="4,16")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--result", default="search_fidelity", help="benchmarks/results/NAME.json")
    ns = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for seed in ns.seeds:
        row = one_seed(ns.config, seed, sorted(ns.budgets), ns.ranks, ns.lr)
        for c in row["configs"]:
            costs = ", ".join(f"{s} steps {c[f'cost_{s}']:.4f}" for s in row["budgets"])
            print(f"seed {seed} {c['allocation']:>8} r={c['rank']:<3} {costs}; test {c['test_accuracy']:.4f}",
                  flush=True)
        write_result(ns.result, [row], merge_key="seed")


if __name__ == "__main__":
    main()
