"""Planted toys (methods.md §8): a frozen residual MLP stack, and a teacher that differs from it by a
low-rank change in known layers. Half of the blocks are weak (gain 0.05), so layer contributions
really differ, which is the premise of layer selection.

``planted_toy`` plants the change in strong blocks, so a score that only tracks block gain can look
right on it; ``task_signal_toy`` plants it in weak blocks, so only a score that sees the task signal
can find them (a gain-tracking score scores 0 there)."""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, hidden: int, gain: float):
        super().__init__()
        self.norm, self.fc1, self.fc2, self.gain = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d), gain

    def forward(self, x):
        return x + self.gain * self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class ResidualStack(nn.Module):
    """8 residual MLP blocks; half of them weak (gain 0.05), so layer contributions really differ."""

    def __init__(self, seed: int, d: int = 32, hidden: int = 64, n: int = 8, gains=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        gains = gains or [1.0 if i % 2 else 0.05 for i in range(n)]
        self.layers = nn.ModuleList(Block(d, hidden, gain) for gain in gains)
        self.head = nn.Linear(d, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def planted_toy(seed: int, planted=(1, 5), gains=None, strength: float = 0.8):
    torch.manual_seed(seed)
    base, teacher = ResidualStack(seed, gains=gains), ResidualStack(seed, gains=gains)
    with torch.no_grad():
        for l in planted:  # teacher = base + a rank-4 change of fc1 in the planted layers
            w = teacher.layers[l].fc1.weight
            w += strength * torch.randn(w.shape[0], 4) @ torch.randn(4, w.shape[1]) / 4
    x = torch.randn(512, 32)
    with torch.no_grad():
        y = teacher(x)
    return base, x, y


TASK_SIGNAL_GAINS = [1.0, 0.3, 1.0, 0.3, 1.0, 0.3, 1.0, 0.3]  # strong even blocks, weak odd ones
TASK_SIGNAL_PLANTED = (3, 5)  # weak blocks: their gain ranks them below every strong block


def task_signal_toy(seed: int):
    """The teacher's change sits in two weak blocks; the four strong blocks carry more output but no task
    signal, so ranking layers by gain (or by how much a layer moves the output) finds no planted block."""
    return planted_toy(seed, planted=TASK_SIGNAL_PLANTED, gains=TASK_SIGNAL_GAINS, strength=2.0)


def warm_and_score(base, x, y, warmup_steps: int = 60):
    """FLoE on a toy: warm up 2-expert HydraLoRA adapters on every block's fc1 over 256 proxy samples,
    then sum Fisher over the other 256 (16 batches of 16). Returns the FisherSums."""
    from floe_dist.allocation import Allocation
    from floe_dist.methods.fisher import accumulate_fisher
    from floe_dist.modeling.inject import inject_adapters

    adapters = inject_adapters(base, Allocation.uniform(len(base.layers), ["fc1"], experts=2, rank=4, router="dense"))
    opt = torch.optim.Adam([p for p in base.parameters() if p.requires_grad], lr=3e-3)
    for step in range(warmup_steps):
        idx = torch.arange(step * 32, step * 32 + 32) % 256
        loss = (base(x[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    batches = [{"input_ids": x[i:i + 16], "y": y[i:i + 16]} for i in range(256, 512, 16)]
    return accumulate_fisher(base, adapters, batches, lambda b: (base(b["input_ids"]) - b["y"]).pow(2).mean(),
                             with_param=True)


def flexora_toy(seed: int, layers=None):
    """methods.md §8 C4: planted_toy with scarce noisy data. Returns the model with rank-4 LoRA on ``layers``
    (all by default), its adapters, 64 noisy training pairs, 64 noisy validation pairs and 384 clean test pairs."""
    from floe_dist.allocation import Allocation
    from floe_dist.modeling.inject import inject_adapters

    base, x, y = planted_toy(seed)
    noisy = y + 0.3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(100 + seed))
    torch.manual_seed(seed)
    adapters = inject_adapters(base, Allocation.uniform(8, ["fc1"], rank=4, layers=layers))
    return base, adapters, (x[:64], noisy[:64]), (x[64:128], noisy[64:128]), (x[128:], y[128:])


def flexora_toy_search(seed: int, steps: int = 200) -> list[int]:
    """Flexora's alpha search on the C4 toy (Adam lr 0.05 on alpha); the layers it keeps."""
    import itertools

    from floe_dist.methods.flexora import flexora_search

    base, adapters, (x, y), (xv, yv), _ = flexora_toy(seed)
    batches = ({"x": x[(s * 16) % 64:(s * 16) % 64 + 16], "y": y[(s * 16) % 64:(s * 16) % 64 + 16]}
               for s in itertools.count())
    val = lambda: [{"x": xv[:32], "y": yv[:32]}, {"x": xv[32:], "y": yv[32:]}]  # noqa: E731
    weights = flexora_search(base, adapters, batches, val, lambda b: (base(b["x"]) - b["y"]).pow(2).mean(),
                             steps=steps, lr_model=3e-3, lr_alpha=0.05)
    return weights.selected()


def retrained_test_mse(seed: int, layers) -> float:
    """Fresh rank-4 LoRA on ``layers`` (None: all), 300 Adam steps on the 64 noisy pairs; clean test MSE."""
    base, _, (x, y), _, (xt, yt) = flexora_toy(seed, layers)
    opt = torch.optim.Adam([p for p in base.parameters() if p.requires_grad], lr=3e-3)
    for s in range(300):
        i = torch.arange(s * 16, s * 16 + 16) % 64
        loss = (base(x[i]) - y[i]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (base(xt) - yt).pow(2).mean().item()
