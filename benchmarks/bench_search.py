"""Search benchmarks, measured side by side in one run (issue: SMAC rank allocation).

    python benchmarks/bench_search.py --preset tiny       # tiny random Llama, a few minutes
    python benchmarks/bench_search.py --preset smollm2    # SmolLM2-135M on SST-2, about an hour on 2 cores

1. Throughput: the same small grid (identical trials) with 1 and with 2 concurrent workers,
   one CPU thread per trial; prints trials per hour and the ratio (goal >= 1.7x).
2. Compute: the full grid and a SMAC multi-fidelity search over the same space; prints the steps
   each spent, the steps SMAC spent until it first reached its incumbent, and both choices.
Results go to ``--out``/bench_search_<preset>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

PRESETS = {
    "tiny": dict(model="tiny", micro_batch=2, val_limit=32, throughput=dict(ranks="2,4", lr="1e-3:1e-2", steps=6),
                 space=dict(ranks="2,4,8,16", lr="1e-3:1e-2", min_steps=2, max_steps=18, max_compute=4.0)),
    "smollm2": dict(model="smollm2-135m", micro_batch=4, val_limit=100,
                    throughput=dict(ranks="2,4", lr="3e-4:2e-3", steps=8),
                    space=dict(ranks="2,4,8,16", lr="2e-4:3e-3", min_steps=8, max_steps=24, max_compute=4.0)),
}


def search(out: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    start = time.time()
    subprocess.run([sys.executable, "-m", "launcher.cli", "search", "--output", str(out), *args],
                   cwd=REPO, env=env, check=True)
    data = json.loads((out / "search.json").read_text())
    data["wall"] = time.time() - start
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", default="runs/bench_search")
    parser.add_argument("--allocation", default=None, help="layers to search on (default: q,v on every layer)")
    ns = parser.parse_args()
    p = PRESETS[ns.preset]
    out = Path(ns.out) / ns.preset
    common = ["--model", p["model"], "--task", "sst2", "--micro-batch", str(p["micro_batch"]),
              "--val-limit", str(p["val_limit"]), "--trial-threads", "1"]
    if ns.allocation:
        common += ["--allocation", ns.allocation]

    t = p["throughput"]
    rates = {}
    for workers in (1, 2):
        run = search(out / f"throughput_w{workers}", "--mode", "grid", "--ranks", t["ranks"], "--lr", t["lr"],
                     "--grid-lr-points", "2", "--max-steps", str(t["steps"]), "--workers", str(workers), *common)
        rates[workers] = len(run["trials"]) / run["wall"] * 3600
    ratio = rates[2] / rates[1]

    s = p["space"]
    space = ["--ranks", s["ranks"], "--lr", s["lr"], "--grid-lr-points", "3", "--max-steps", str(s["max_steps"]),
             "--workers", "2", *common]
    grid = search(out / "grid", "--mode", "grid", *space)
    smac = search(out / "smac", "--mode", "smac", "--min-steps", str(s["min_steps"]),
                  "--max-compute", str(s["max_compute"]), *space)
    grid_steps = sum(t["budget"] for t in grid["trials"])
    smac_steps = sum(t["budget"] for t in smac["trials"])
    incumbent = smac["summary"]["incumbent"]
    to_incumbent = sum(t["budget"] for t in smac["trials"] if t["id"] <= incumbent["id"])
    grid_best = min((t for t in grid["trials"] if t["status"] == "success"), key=lambda t: t["cost"])
    grid_of_rank = {r: min(t["cost"] for t in grid["trials"] if t["config"]["rank"] == r and t["status"] == "success")
                    for r in {t["config"]["rank"] for t in grid["trials"]}}
    result = {
        "preset": ns.preset, "trials_per_hour": rates, "parallel_speedup": ratio,
        "grid": {"trials": len(grid["trials"]), "steps": grid_steps, "wall": grid["wall"],
                 "best": grid_best["config"], "best_cost": grid_best["cost"], "best_cost_per_rank": grid_of_rank},
        "smac": {"trials": len(smac["trials"]), "steps": smac_steps, "steps_to_incumbent": to_incumbent,
                 "wall": smac["wall"], "incumbent": incumbent["config"], "incumbent_cost": incumbent["cost"],
                 "incumbent_budget": incumbent["budget"]},
    }
    (out / f"bench_search_{ns.preset}.json").write_text(json.dumps(result, indent=2))
    print(f"\n== search benchmark: {ns.preset} ==")
    print(f"throughput   1 worker {rates[1]:7.1f} trials/h   2 workers {rates[2]:7.1f} trials/h   "
          f"ratio {ratio:.2f}x (goal >= 1.7x)")
    print(f"grid         {len(grid['trials'])} trials, {grid_steps} steps, {grid['wall']:.0f}s; best rank "
          f"{grid_best['config']['rank']} lr {grid_best['config']['lr']:.2e} cost {grid_best['cost']:.4f}")
    print(f"smac         {len(smac['trials'])} trials, {smac_steps} steps ({smac_steps / grid_steps:.0%} of grid), "
          f"{smac['wall']:.0f}s; incumbent reached after {to_incumbent} steps ({to_incumbent / grid_steps:.0%}); "
          f"rank {incumbent['config']['rank']} lr {incumbent['config']['lr']:.2e} cost {incumbent['cost']:.4f} "
          f"at {incumbent['budget']} steps")
    print("grid's best cost per rank: " + ", ".join(f"r={r}: {c:.4f}" for r, c in sorted(grid_of_rank.items())))
    label = {"tiny": "tiny", "smollm2": "SmolLM2-135M"}[ns.preset]
    budgets = "/".join(sorted({str(t["budget"]) for t in smac["trials"]}, key=int))
    write_result("search_throughput", [{
        "preset": label, "trial": f"{t['steps']} steps, micro-batch {p['micro_batch']}, {p['val_limit']} val examples",
        "one_worker_per_h": rates[1], "two_workers_per_h": rates[2], "ratio": ratio}], merge_key="preset")
    point = lambda c: f"r={c['rank']}, lr {c['lr']:.1e}"  # noqa: E731
    write_result("search_compute", [{
        "preset": label, "budgets": budgets, "grid_steps": grid_steps, "grid_wall_s": round(grid["wall"]),
        "grid_best": point(grid_best["config"]), "grid_best_cost": grid_best["cost"], "smac_steps": smac_steps,
        "smac_share": smac_steps / grid_steps, "smac_wall_s": round(smac["wall"]),
        "smac_note": f"incumbent reached after {to_incumbent} steps ({to_incumbent / grid_steps:.0%})",
        "smac_incumbent": point(incumbent["config"]), "smac_cost": incumbent["cost"],
        "grid_cost_at_smac_rank": grid_of_rank[incumbent["config"]["rank"]]}], merge_key="preset")


if __name__ == "__main__":
    main()
