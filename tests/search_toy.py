"""A planted-rank objective for search tests: ``python -m tests.search_toy TRIAL_DIR``.

A frozen linear map plus a rank-4 change (singular values 1.5..0.8) is learnt by a rank-r LoRA
(A uniform in +-1/sqrt(d), B zero, scale 16/r, Adam: the update floe-dist's layer makes, written in
numpy so that a trial process starts in a fraction of a second instead of importing torch) from 96
noisy samples; the cost is the error on 1,024 clean ones. Ranks below 4 cannot represent the change
and ranks above it fit the noise, so rank 4 is best at every learning rate in 3e-3..3e-2 at 90 and
270 steps, and at 270 steps its cost hardly depends on the rate (measured: 0.0232-0.0235 vs 0.066 for
r=2 and >= 0.0446 for r=8).

Fault injection for the failure tests: ``TOY_CRASH_RANK=r`` makes rank-r trials raise,
``TOY_HANG_RANK=r`` makes them sleep past any time limit, ``TOY_NAN_RANK=r`` makes them cost NaN,
``TOY_DELAY=s`` makes every trial take ``s`` seconds longer, ``TOY_DELAY_RANK=r:s`` rank-r trials,
``TOY_DELAY_TRIAL=i:s`` trial i, ``TOY_WORSE_ALLOCATION=NAME`` adds 0.05 to the cost of trials on the search
candidate NAME, ``TOY_BEST_TOP_K=k`` adds 0.01 to trials whose searched top_k is
not k. Every start appends to ``starts.log``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def planted_rank_data(d: int = 32, n: int = 96, noise: float = 0.4):
    g = np.random.default_rng(1000)
    w0 = g.standard_normal((d, d)) / d ** 0.5
    u = np.linalg.qr(g.standard_normal((d, 4)))[0]
    v = np.linalg.qr(g.standard_normal((d, 4)))[0]
    delta = u @ np.diag([1.5, 1.2, 1.0, 0.8]) @ v.T
    x, x_val = g.standard_normal((n, d)), g.standard_normal((1024, d))
    y = x @ (w0 + delta).T + noise * g.standard_normal((n, d))
    return w0, x, y, x_val, x_val @ (w0 + delta).T


def toy_cost(rank: int, lr: float, steps: int, seed: int, alpha: float = 16.0) -> float:
    w0, x, y, x_val, y_val = planted_rank_data()
    d = x.shape[1]
    a = np.random.default_rng(seed).uniform(-1 / d ** 0.5, 1 / d ** 0.5, (rank, d))
    b = np.zeros((d, rank))
    scale, params = alpha / rank, [a, b]
    moments = [[np.zeros_like(p), np.zeros_like(p)] for p in params]
    base = x @ w0.T
    for t in range(1, steps + 1):
        h = x @ a.T
        d_pred = 2 * (base + scale * h @ b.T - y) / y.size  # d mean-squared-error / d prediction
        grads = ((scale * d_pred @ b).T @ x, scale * d_pred.T @ h)
        for p, g, (m, v) in zip(params, grads, moments):  # Adam (torch's defaults), in place
            m[:] = 0.9 * m + 0.1 * g
            v[:] = 0.999 * v + 0.001 * g * g
            p -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    return float(np.mean((x_val @ (w0 + scale * b @ a).T - y_val) ** 2))


def write_result(trial_dir: Path, result: dict) -> None:
    tmp = trial_dir / ".result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, trial_dir / "result.json")  # atomic, as the search expects of every trial


def run_trial(trial_dir: Path, resources=None) -> dict:
    """The toy's trial, as a warm worker calls it (floe_dist/search/worker.py)."""
    spec = json.loads((trial_dir / "trial.json").read_text())
    with open(trial_dir / "starts.log", "a") as f:
        f.write(f"{os.getpid()}\n")
    rank = int(spec["config"]["rank"])
    if str(rank) == os.environ.get("TOY_CRASH_RANK"):
        raise RuntimeError(f"planted crash for rank {rank}")
    if str(rank) == os.environ.get("TOY_HANG_RANK"):
        time.sleep(3600)
    time.sleep(float(os.environ.get("TOY_DELAY", 0)))
    slow_rank, _, seconds = os.environ.get("TOY_DELAY_RANK", "").partition(":")
    if slow_rank == str(rank):
        time.sleep(float(seconds))
    slow_trial, _, seconds = os.environ.get("TOY_DELAY_TRIAL", "").partition(":")
    if slow_trial and int(slow_trial) == int(trial_dir.name):
        time.sleep(float(seconds))
    if str(rank) == os.environ.get("TOY_NAN_RANK"):
        return {"cost": float("nan")}
    worse = Path(spec["base_allocation"]).stem == os.environ.get("TOY_WORSE_ALLOCATION")
    off_k = "TOY_BEST_TOP_K" in os.environ and str(spec["config"].get("top_k")) != os.environ["TOY_BEST_TOP_K"]
    cost = toy_cost(rank, float(spec["config"]["lr"]), int(spec["budget"]), int(spec["seed"]))
    return {"cost": cost + 0.05 * worse + 0.01 * off_k}


def main(trial_dir: Path) -> None:
    write_result(trial_dir, run_trial(trial_dir))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
