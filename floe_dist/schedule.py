"""Learning-rate schedules: the multiplier of the peak rate at each optimizer step (a torch LambdaLR's factor)."""
from __future__ import annotations

import math


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.1):
    """lr multiplier for step s: linear warmup to 1 (the first step already learns), cosine to min_ratio."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def warmup_stable_decay(total_steps: int, warmup_steps: int, decay_steps: int):
    """lr multiplier for step s: linear warmup to 1, constant, then a (1 - sqrt) cooldown towards 0 over the last
    ``decay_steps`` (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations"). Before the cooldown the factor does not depend on ``total_steps``: a run of any length is the
    prefix of a longer one, which is what lets the search's trials become the final run."""
    decay_start = total_steps - decay_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step < decay_start:
            return 1.0
        return max(0.0, 1.0 - math.sqrt((step - decay_start + 1) / (decay_steps + 1)))  # the last step learns
    return factor


def retimed(factor, length: int, retimings: list[tuple[int, int]]):
    """The multiplier of a run of ``length`` steps whose end moved to ``steps`` at step ``at``, for each
    ``(at, steps)`` in order: the curve's rest, from step ``at`` to its end, is stretched or squeezed onto the new steps
    left, so the rate goes on from that step's and keeps falling towards where the curve ended (a move at the last
    step too). A redraw at the new length would instead raise the rate of a longer run at the step it moved."""
    for at, steps in retimings:
        factor, length = _moved_end(factor, at, length, steps), steps
    return factor


def _moved_end(factor, at: int, end: int, new_end: int):
    scale = (end - at) / (new_end - at)

    def moved(step: int) -> float:
        return factor(step) if step <= at else factor(at + (step - at) * scale)
    return moved


def schedule(name: str, total_steps: int, warmup_steps: int, decay_steps: int):
    """The lr multiplier of ``train.schedule``."""
    if name == "wsd":
        return warmup_stable_decay(total_steps, warmup_steps, decay_steps)
    return warmup_cosine(total_steps, warmup_steps)
