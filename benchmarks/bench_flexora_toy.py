"""Flexora's scarce-data claim on the planted toy (methods.md §8 C4), against all layers and random layers.

    python benchmarks/bench_flexora_toy.py --seeds 0 1 2 3 4    # writes benchmarks/results/flexora_toy.json

tests/toys.py ``flexora_toy``: 64 noisy training pairs; Flexora searches alpha for 200 steps (Adam lr
0.05) and keeps alpha > 0. A fresh rank-4 LoRA is then trained (300 Adam steps) on the kept layers, on
all 8 layers, and on as many seeded random layers as Flexora kept; lower clean test MSE is better.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402
from tests.toys import flexora_toy_search, retrained_test_mse  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        kept = flexora_toy_search(seed)
        g = torch.Generator().manual_seed(1000 + seed)
        random_layers = sorted(torch.randperm(8, generator=g)[:len(kept)].tolist())
        row = {"seed": seed, "flexora_layers": kept, "random_layers": random_layers,
               "mse_flexora": retrained_test_mse(seed, kept), "mse_all": retrained_test_mse(seed, None),
               "mse_random": retrained_test_mse(seed, random_layers)}
        rows.append(row)
        print(row, flush=True)
    summary = {k: statistics.mean(r[k] for r in rows) for k in ("mse_flexora", "mse_all", "mse_random")}
    wins = {"over_all": sum(r["mse_flexora"] < r["mse_all"] for r in rows),
            "over_random": sum(r["mse_flexora"] < r["mse_random"] for r in rows)}
    print(summary, wins)
    write_result("flexora_toy", rows, mean=summary, wins=wins)


if __name__ == "__main__":
    main()
