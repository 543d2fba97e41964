"""Where a search trial's time goes: fresh process per trial (cold) vs warm workers, 1 vs 2 workers.

    python benchmarks/bench_search_workers.py                    # SmolLM2-135M on SST-2, about 12 minutes on 2 cores
    python benchmarks/bench_search_workers.py --preset tiny      # tiny random Llama, about a minute
    python benchmarks/bench_search_workers.py --lr-points 4 --arms warm-1,warm-2 --result search_workers_12
                                                                 # 12 trials: each warm worker loads once for more

The same grid of trials (identical work: same ranks, rates, steps, validation examples) runs three ways, side
by side in one run: cold (one process per trial, 1 worker), warm with 1 worker, warm with 2 workers; one CPU
thread per trial. Overhead share = 1 - (sum over trials of in-trial training-step and validation seconds) /
(workers x search wall time): process start, imports, loading, tokenising, engine set-up, checkpoint and
export writes, and idle workers all count as overhead. Result: benchmarks/results/search_workers_PRESET.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

PRESETS = {
    "smollm2": dict(model="smollm2-135m", micro_batch=4, val_limit=100, steps=8, ranks="2,4,8", lr="3e-4:2e-3"),
    "tiny": dict(model="tiny", micro_batch=2, val_limit=32, steps=6, ranks="2,4,8", lr="1e-3:1e-2"),
}
ARMS = (("cold", 1), ("warm", 1), ("warm", 2))


def search(out: Path, p: dict, workers: str, n_workers: int, lr_points: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    start = time.time()
    subprocess.run([sys.executable, "-m", "launcher.cli", "search", "--output", str(out), "--mode", "grid",
                    "--model", p["model"], "--task", "sst2", "--ranks", p["ranks"], "--lr", p["lr"],
                    "--grid-lr-points", str(lr_points), "--max-steps", str(p["steps"]),
                    "--micro-batch", str(p["micro_batch"]),
                    "--val-limit", str(p["val_limit"]), "--trial-threads", "1", "--workers", str(n_workers),
                    "--trial-workers", workers], cwd=REPO, env=env, check=True)
    wall = time.time() - start
    trials = json.loads((out / "search.json").read_text())["trials"]
    assert all(t["status"] == "success" for t in trials), [t["reason"] for t in trials]
    useful = sum(t["metrics"]["train_seconds"] + t["metrics"]["eval_seconds"] for t in trials)
    return {"trials": len(trials), "wall_s": wall, "trials_per_h": len(trials) / wall * 3600,
            "train_eval_s": useful, "overhead_share": 1 - useful / (n_workers * wall),
            "mean_trial_s": sum(t["seconds"] for t in trials) / len(trials),
            "costs": {f"r={t['config']['rank']},lr={t['config']['lr']:.2e}": t["cost"] for t in trials}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    parser.add_argument("--out", default="runs/bench_search_workers")
    parser.add_argument("--lr-points", type=int, default=2, help="grid learning rates per rank (3 ranks)")
    parser.add_argument("--arms", default="cold-1,warm-1,warm-2", help="comma-separated, from cold-1,warm-1,warm-2")
    parser.add_argument("--result", help="result file name (default: search_workers_PRESET)")
    ns = parser.parse_args()
    p = PRESETS[ns.preset]
    arms = [(mode, n) for mode, n in ARMS if f"{mode}-{n}" in ns.arms.split(",")]
    runs = {f"{mode}-{n}": search(Path(ns.out) / ns.preset / f"{mode}-{n}", p, mode, n, ns.lr_points)
            for mode, n in arms}
    same = len({json.dumps(r["costs"], sort_keys=True) for r in runs.values()}) == 1
    label = {"tiny": "tiny", "smollm2": "SmolLM2-135M"}[ns.preset]
    trial = f"{p['steps']} steps, micro-batch {p['micro_batch']}, {p['val_limit']} val examples"
    cold = runs.get("cold-1")
    rows = [{"preset": label, "arm": f"{mode}, {n} worker{'s' * (n > 1)}", "trial": trial, **runs[f"{mode}-{n}"],
             "vs_cold_1": runs[f"{mode}-{n}"]["trials_per_h"] / cold["trials_per_h"] if cold else None}
            for mode, n in arms]
    for row in rows:
        row.pop("costs")
    two_vs_one = (runs["warm-2"]["trials_per_h"] / runs["warm-1"]["trials_per_h"]
                  if {"warm-1", "warm-2"} <= set(runs) else None)
    print(f"\n== search workers: {label}, {rows[0]['trials']} trials of {trial} ==")
    for row in rows:
        print(f"{row['arm']:16s} wall {row['wall_s']:6.0f}s  {row['trials_per_h']:6.1f} trials/h  "
              f"overhead share {row['overhead_share']:.0%}")
    if two_vs_one is not None:
        print(f"warm 2 workers vs 1: {two_vs_one:.2f}x trials/h")
    print(f"identical costs in every arm: {same}")
    write_result(ns.result or f"search_workers_{ns.preset}", rows, identical_costs=same,
                 two_vs_one_workers=two_vs_one)


if __name__ == "__main__":
    main()
