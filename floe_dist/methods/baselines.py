"""Baselines: uniform adapters on every layer, and the same on k random layers (seeded)."""
from __future__ import annotations

import random

from floe_dist.allocation import Allocation
from floe_dist.methods import register
from floe_dist.methods.fisher import default_k


def uniform_on(layers, args, shape, method: str) -> Allocation:
    """Same experts and rank on the given layers (allocate's --budget then rescales the rank)."""
    return Allocation.uniform(shape.num_layers, args.target_list, experts=args.experts, rank=args.rank,
                              router=args.router, top_k=args.top_k, layers=list(layers), alpha=args.alpha,
                              dropout=args.dropout, method=method, top_p=args.top_p,
                              min_k=args.min_k).with_parameter_count(shape.shapes)


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
