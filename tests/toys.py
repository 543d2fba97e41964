"""Planted toys (methods.md §8): a frozen residual MLP stack, and a teacher that differs from it by a
low-rank change in known layers. Half of the blocks are weak (gain 0.05), so layer contributions
really differ, which is the premise of layer selection."""
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

    def __init__(self, seed: int, d: int = 32, hidden: int = 64, n: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(Block(d, hidden, 1.0 if i % 2 else 0.05) for i in range(n))
        self.head = nn.Linear(d, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def planted_toy(seed: int, planted=(1, 5)):
    torch.manual_seed(seed)
    base, teacher = ResidualStack(seed), ResidualStack(seed)
    with torch.no_grad():
        for l in planted:  # teacher = base + a rank-4 change of fc1 in the planted layers
            w = teacher.layers[l].fc1.weight
            w += 0.8 * torch.randn(w.shape[0], 4) @ torch.randn(4, w.shape[1]) / 4
    x = torch.randn(512, 32)
    with torch.no_grad():
        y = teacher(x)
    return base, x, y
