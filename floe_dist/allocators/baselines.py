"""Baselines: uniform adapters on every layer, and the same on k random layers (seeded)."""
from __future__ import annotations

import random

from floe_dist.allocation import Allocation
from floe_dist.allocators import register
from floe_dist.fisher import default_k


def uniform_on(layers, args, shape, method: str) -> Allocation:
    """Same experts and rank on the given layers; with --budget, the rank whose count is closest to it."""
    rank = args.rank
    if args.budget:
        rank = rank_for_budget(layers, args, shape)
    return Allocation.uniform(shape.num_layers, args.target_list, experts=args.experts, rank=rank, router=args.router,
                              top_k=args.top_k, layers=list(layers), alpha=args.alpha, dropout=args.dropout,
                              method=method).with_parameter_count(shape.shapes)


def rank_for_budget(layers, args, shape) -> int:
    """The rank whose parameter count is closest to --budget. The count is linear in the rank
    (routers add a constant), so two evaluations give it."""
    def count(r: int) -> int:
        return Allocation.uniform(shape.num_layers, args.target_list, experts=args.experts, rank=r,
                                  router=args.router, top_k=args.top_k, layers=list(layers)).count_parameters(shape.shapes)
    per_rank = count(2) - count(1)
    guess = max(1, round((args.budget - (count(1) - per_rank)) / per_rank))
    return min((r for r in (guess - 1, guess, guess + 1) if r >= 1), key=lambda r: abs(count(r) - args.budget))


def k_layers(args, shape) -> int:
    k = args.k if args.k is not None else default_k(shape.num_layers)
    if not 1 <= k <= shape.num_layers:
        raise ValueError(f"k={k} must be between 1 and the number of layers ({shape.num_layers})")
    return k


@register("uniform")
def uniform(args, shape) -> Allocation:
    return uniform_on(range(shape.num_layers), args, shape, "uniform")


@register("random")
def random_layers(args, shape) -> Allocation:
    layers = sorted(random.Random(args.seed).sample(range(shape.num_layers), k_layers(args, shape)))
    return uniform_on(layers, args, shape, "random")
