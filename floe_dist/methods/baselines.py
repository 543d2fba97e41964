"""Baselines: uniform adapters on every layer, and the same on k random layers (seeded)."""
from __future__ import annotations

import random

from floe_dist.allocation import Allocation
from floe_dist.methods import register
from floe_dist.methods.fisher import default_k


def uniform_on(layers, recipe, shape, method: str) -> Allocation:
    """The adapter section's experts and rank on the given layers (allocate.budget then rescales the rank)."""
    a = recipe.adapter
    return Allocation.uniform(shape.num_layers, a.target_list, experts=a.experts, rank=a.rank, router=a.router,
                              top_k=a.top_k, layers=list(layers), alpha=a.alpha, dropout=a.dropout, method=method,
                              top_p=a.top_p, min_k=a.min_k).with_parameter_count(shape.shapes)


def k_layers(recipe, shape) -> int:
    k = recipe.allocate.k if recipe.allocate.k is not None else default_k(shape.num_layers)
    if not 1 <= k <= shape.num_layers:
        raise ValueError(f"k={k} must be between 1 and the number of layers ({shape.num_layers})")
    return k


@register("uniform")
def uniform(recipe, shape) -> Allocation:
    return uniform_on(range(shape.num_layers), recipe, shape, "uniform")


@register("random")
def random_layers(recipe, shape) -> Allocation:
    layers = sorted(random.Random(recipe.allocate.seed).sample(range(shape.num_layers), k_layers(recipe, shape)))
    return uniform_on(layers, recipe, shape, "random")
