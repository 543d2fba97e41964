"""Fisher layer scores against chance on a toy that a gain-tracking score cannot pass (methods.md §8 C1).

    python benchmarks/bench_fisher_toy.py --seeds 0 1 2 3 4     # writes benchmarks/results/fisher_toy.json

tests/toys.py ``task_signal_toy``: 8 residual blocks, strong (gain 1.0) and weak (0.3) alternating; the
teacher differs by a rank-4 change in two *weak* blocks (3 and 5). Ranking blocks by gain picks strong
ones and finds no planted block. Per seed and warm-up length, FLoE warms 2-expert adapters on every
block and sums Fisher (mask and parameter modes) on held-out samples; precision@2 is the share of the
top-2 blocks that are planted. Baselines: the gain ranking, and random 2 of 8 (expected 0.25; one seeded
draw per seed is reported too).
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
from floe_dist.methods.fisher import select_top_k  # noqa: E402
from tests.toys import TASK_SIGNAL_GAINS, TASK_SIGNAL_PLANTED, task_signal_toy, warm_and_score  # noqa: E402

WARMUPS = (60, 300)


def precision(top: list[int]) -> float:
    return len(set(top) & set(TASK_SIGNAL_PLANTED)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    tops: dict[str, list[list[int]]] = {}
    for warmup in WARMUPS:
        for seed in args.seeds:
            sums = warm_and_score(*task_signal_toy(seed), warmup_steps=warmup)
            for mode in ("mask", "param"):
                tops.setdefault(f"Fisher {mode}, warm-up {warmup} steps", []).append(select_top_k(sums.scores(mode), 2))
    for seed in args.seeds:
        tops.setdefault("block gain (the confound)", []).append(select_top_k(torch.tensor(TASK_SIGNAL_GAINS), 2))
        g = torch.Generator().manual_seed(seed)
        tops.setdefault("random 2 (one draw per seed)", []).append(sorted(torch.randperm(8, generator=g)[:2].tolist()))
    rows = []
    for score, top in tops.items():
        per_seed = [precision(t) for t in top]
        rows.append({"score": score, "top_per_seed": top, "precision_per_seed": per_seed,
                     "precision_mean": statistics.mean(per_seed)})
        print(f"{score:<36} precision@2 {statistics.mean(per_seed):.2f}  per seed {per_seed}  top {top}", flush=True)
    write_result("fisher_toy", rows, seeds=args.seeds, blocks=8, planted=list(TASK_SIGNAL_PLANTED),
                 gains=TASK_SIGNAL_GAINS, chance=2 / 8)


if __name__ == "__main__":
    main()
