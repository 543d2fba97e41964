"""Does the surrogate model earn its keep? SMAC (random forest, Gaussian process) vs random search with the same
fidelities and halving, against the grid, on a planted toy; several seeds, measured side by side in one run.

    python benchmarks/bench_search_methods.py                      # planted toy, 5 seeds, about 15 minutes
    python benchmarks/bench_search_methods.py --preset smollm2 --seeds 3 --methods bohb-rule,random

The toy (tests/search_toy.py): a rank-4 change learnt by LoRA, numpy trials of 30/90/270 steps. The space is
11 ranks (1..32) x learning rate 1e-4..1e-1 (log); at 270 steps only rank 4 with lr >= 3e-3 comes within
5% of the grid's best cost (rank 5: +21%), so a configuration drawn at random qualifies about 1 time in 22.
Per seed and method: the compute (in 270-step trial equivalents, trials counted in the order they were
issued, one worker) until the best 270-step trial is within epsilon of the grid's best, the cost the search
ends with, and who proposed the configurations that reached 270 steps. Result:
benchmarks/results/search_methods.json.

``--preset smollm2``: the real objective, SmolLM2-135M on SST-2 (validation loss on 100 examples, the default
campaign's trials: ranks 2..16, lr 2e-4..3e-3, 8/24 steps, warm workers); epsilon 2% (losses differ little
between ranks). Result: benchmarks/results/search_methods_smollm2.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

PRESETS = {
    "toy": dict(space=["--model", "tiny", "--trial-module", "tests.search_toy", "--ranks", "1,2,3,4,5,6,8,12,16,24,32",
                       "--lr", "1e-4:1e-1", "--workers", "1"],
                min_steps=30, max_steps=270, grid_lr_points=4, epsilon=0.05, max_compute=10.0, result="search_methods"),
    "smollm2": dict(space=["--model", "smollm2-135m", "--task", "sst2", "--ranks", "2,4,8,16", "--lr", "2e-4:3e-3",
                           "--micro-batch", "4", "--val-limit", "100", "--trial-threads", "1", "--workers", "2"],
                    min_steps=8, max_steps=24, grid_lr_points=3, epsilon=0.02, max_compute=6.0,
                    result="search_methods_smollm2"),
}
METHODS = {"smac-default": ("SMAC RF, model on the top budget from 1 result (SMAC's default)",
                            ["--mode", "smac", "--surrogate", "rf", "--model-min-points", "1"]),
           "bohb-rule": ("SMAC RF, model on the highest budget with >= dims+1 results (BOHB's rule, floe-dist's default)",
                         ["--mode", "smac", "--surrogate", "rf", "--model-min-points", "0"]),
           "rf-lie": ("SMAC RF, BOHB's rule, proposals not yet run count as the worst result (constant liar)",
                      ["--mode", "smac", "--surrogate", "rf", "--model-min-points", "0", "--pending", "worst"]),
           "rf-min6": ("SMAC RF, model on the highest budget with >= 6 results",
                       ["--mode", "smac", "--surrogate", "rf", "--model-min-points", "6"]),
           "rf-min9": ("SMAC RF, model on the highest budget with >= 9 results (a first rung)",
                       ["--mode", "smac", "--surrogate", "rf", "--model-min-points", "9"]),
           "twice-bohb": ("SMAC RF, model on the highest budget with >= 2(dims+1) results",
                          ["--mode", "smac", "--surrogate", "rf", "--model-min-points", "2(dims+1)"]),
           "rf-init9": ("SMAC RF, BOHB's rule, initial design = the first rung (9)",
                        ["--mode", "smac", "--surrogate", "rf", "--model-min-points", "dims+1",
                         "--initial-configs", "9"]),
           "rf-interleave0.5": ("SMAC RF, BOHB's rule, half the proposals random",
                                ["--mode", "smac", "--surrogate", "rf", "--model-min-points", "dims+1",
                                 "--random-interleave", "0.5"]),
           "gp": ("SMAC GP, model on the highest budget with >= dims+1 results",
                  ["--mode", "smac", "--surrogate", "gp", "--model-min-points", "dims+1"]),
           "gp-min6": ("SMAC GP, model on the highest budget with >= 6 results",
                       ["--mode", "smac", "--surrogate", "gp", "--model-min-points", "6"]),
           "rf-pooled": ("SMAC RF, the model on every configuration at the highest budget it reached",
                         ["--mode", "smac", "--surrogate", "rf", "--model-min-points", "0", "--model-data", "pooled"]),
           "hb-smac": ("SMAC RF, BOHB's rule, Hyperband brackets (also starting at 90 and 270 steps)",
                       ["--mode", "smac", "--surrogate", "rf", "--model-min-points", "0", "--brackets", "hyperband"]),
           "hb-random": ("random search, the same Hyperband brackets", ["--mode", "random", "--brackets", "hyperband"]),
           "random": ("random search (same halving)", ["--mode", "random"])}


def dimensions(space: list[str]) -> int:
    """The search space's dimensions: rank, and lr unless it is fixed (no candidates or experts here)."""
    lr = space[space.index("--lr") + 1]
    return 1 + (":" in lr)


def search(out: Path, space: list[str], *args: str, fresh: bool = True) -> dict:
    """One search, from scratch; ``fresh=False`` resumes a folder of the same settings (a finished grid is reused)."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    subprocess.run([sys.executable, "-m", "launcher.cli", "search", "--output", str(out), *space, *args],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "search.json").read_text())


def compute_to_target(trials: list[dict], target: float, top: int) -> float | None:
    """Full-trial equivalents issued until a top-budget trial first came within the target; None: never."""
    used = 0
    for t in sorted(trials, key=lambda t: t["id"]):
        used += t["budget"]
        if t["status"] == "success" and t["budget"] == top and t["cost"] <= target:
            return used / top
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="toy")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="calibrate settings on other seeds (100: --result search_methods_calibration) than "
                             "those that validate them (0)")
    parser.add_argument("--methods", default="smac-default,bohb-rule,twice-bohb,gp,random",
                        help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--result", help="result file name (benchmarks/results/NAME.json; default: the preset's)")
    parser.add_argument("--max-compute", type=float, help="budget of each search, in full trials (default: the preset's)")
    parser.add_argument("--max-trials", type=int, default=40,
                        help="trials per search (the search's own default, 40: 3 toy brackets, 39 trials, bind first)")
    parser.add_argument("--initial-configs", type=int, default=5,
                        help="SMAC's initial design, every arm (default: floe-dist's)")
    parser.add_argument("--out", default="runs/bench_search_methods")
    ns = parser.parse_args()
    p = PRESETS[ns.preset]
    space, top, epsilon = [*p["space"], "--max-steps", str(p["max_steps"])], p["max_steps"], p["epsilon"]
    max_compute = ns.max_compute or p["max_compute"]
    out = Path(ns.out) / ns.preset
    grid = search(out / "grid", space, "--mode", "grid", "--grid-lr-points", str(p["grid_lr_points"]), fresh=False)
    grid_best = min(t["cost"] for t in grid["trials"] if t["status"] == "success")
    grid_compute = sum(t["budget"] for t in grid["trials"]) / top
    target = grid_best * (1 + epsilon)
    rows = []
    for key in ns.methods.split(","):
        name, flags = METHODS[key]
        n = dimensions(space)
        flags = [{"dims+1": str(n + 1), "2(dims+1)": str(2 * (n + 1))}.get(f, f) for f in flags]
        if "--initial-configs" not in flags:
            flags = [*flags, "--initial-configs", str(ns.initial_configs)]
        reached, final, model_share = [], [], []
        seeds = range(ns.first_seed, ns.first_seed + ns.seeds)
        for seed in seeds:
            run = search(out / f"{key}-{seed}", space, *flags, "--min-steps", str(p["min_steps"]), "--seed", str(seed),
                         "--max-compute", str(max_compute), "--max-trials", str(ns.max_trials))
            reached.append(compute_to_target(run["trials"], target, top))
            final.append(run["summary"]["incumbent"]["cost"])
            origins = run["summary"]["top_budget_origins"]
            model_share.append(origins.get("model", 0) / max(1, sum(origins.values())))
            print(f"{name[:40]:40s} seed {seed}: within {epsilon:.0%} after "
                  f"{'never' if reached[-1] is None else f'{reached[-1]:.2f} full trials'}, "
                  f"final cost {final[-1]:.4f}, "
                  f"top-budget origins {origins}", flush=True)
        hits = [r for r in reached if r is not None]
        rows.append({"method": name, "key": key, "seeds": ns.seeds, "first_seed": ns.first_seed, "reached": len(hits),
                     "mean_compute_to_target": mean(r if r is not None else max_compute for r in reached),
                     "compute_to_target": reached, "mean_final_cost": mean(final),
                     "final_within_target": sum(c <= target for c in final), "final_costs": final,
                     "model_share_top_budget": mean(model_share)})
    print(f"\n== {ns.preset}: grid best {grid_best:.4f} ({grid_compute:.0f} full trials), target <= {target:.4f} ==")
    for r in rows:
        print(f"{r['method']}\n    reached in {r['reached']}/{r['seeds']} seeds; mean compute to target "
              f"{r['mean_compute_to_target']:.2f} full trials (a miss counts as the whole {max_compute:g}); mean "
              f"final cost {r['mean_final_cost']:.4f}; model share of top-budget configs "
              f"{r['model_share_top_budget']:.0%}")
    write_result(ns.result or p["result"], rows, grid_best=grid_best, grid_full_trials=grid_compute, epsilon=epsilon,
                 max_compute=max_compute, max_trials=ns.max_trials, initial_configs=ns.initial_configs,
                 space=" ".join(space), preset=ns.preset)


if __name__ == "__main__":
    main()
