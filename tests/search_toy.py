"""A planted-rank objective for search tests: ``python -m tests.search_toy TRIAL_DIR``.

A frozen linear map plus a rank-4 change (singular values 1.5..0.8) is learnt by a rank-r LoRA
(floe-dist's own layer, one expert) from 64 noisy samples; the cost is the error on 1,024 clean
ones. Ranks below 4 cannot represent the change and ranks above it fit the noise, so rank 4 is best
at every learning rate in 3e-3..3e-2 (measured: 0.042 vs 0.083 for r=2 and >= 0.107 for r=8).

Fault injection for the failure tests: ``TOY_CRASH_RANK=r`` makes rank-r trials raise,
``TOY_HANG_RANK=r`` makes them sleep past any time limit, ``TOY_DELAY=s`` makes every trial take
``s`` seconds longer. Every start appends to ``starts.log``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from floe_dist.allocation import write_json_atomic
from floe_dist.modeling.lora_moe import LoRAMoELinear


def planted_rank_data(d: int = 32, n: int = 64, noise: float = 0.5):
    g = torch.Generator().manual_seed(1000)
    w0 = torch.randn(d, d, generator=g) / d ** 0.5
    u = torch.linalg.qr(torch.randn(d, 4, generator=g))[0]
    v = torch.linalg.qr(torch.randn(d, 4, generator=g))[0]
    delta = u @ torch.diag(torch.tensor([1.5, 1.2, 1.0, 0.8])) @ v.T
    x, x_val = torch.randn(n, d, generator=g), torch.randn(1024, d, generator=g)
    y = x @ (w0 + delta).T + noise * torch.randn(n, d, generator=g)
    return w0, x, y, x_val, x_val @ (w0 + delta).T


def toy_cost(rank: int, lr: float, steps: int, seed: int) -> float:
    torch.set_num_threads(1)
    w0, x, y, x_val, y_val = planted_rank_data()
    base = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    base.weight = nn.Parameter(w0, requires_grad=False)
    torch.manual_seed(seed)
    layer = LoRAMoELinear(base, [rank], top_k=1, alpha=16.0)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = ((layer(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((layer(x_val) - y_val) ** 2).mean().item()


def main(trial_dir: Path) -> None:
    spec = json.loads((trial_dir / "trial.json").read_text())
    with open(trial_dir / "starts.log", "a") as f:
        f.write(f"{os.getpid()}\n")
    rank = int(spec["config"]["rank"])
    if str(rank) == os.environ.get("TOY_CRASH_RANK"):
        raise RuntimeError(f"planted crash for rank {rank}")
    if str(rank) == os.environ.get("TOY_HANG_RANK"):
        time.sleep(3600)
    time.sleep(float(os.environ.get("TOY_DELAY", 0)))
    cost = toy_cost(rank, float(spec["config"]["lr"]), int(spec["budget"]), int(spec["seed"]))
    write_json_atomic(trial_dir / "result.json", {"cost": cost})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
