"""Allocators: where adapters go and how big they are. Every method returns the same Allocation.

Each allocator is a plain function ``fn(recipe: Recipe, shape: ModelShape) -> Allocation`` (it reads the adapter and allocate sections)
registered by name with ``@register("name")``; ``floe-dist allocate --allocate.method NAME`` calls it. Methods
that need a training signal read it from files written by earlier stages (FLoE: ``fisher.json``).
"""
from __future__ import annotations

from collections.abc import Callable

REGISTRY: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    if name != name.lower() or name in REGISTRY:
        raise ValueError(f"allocator names are lower-case and unique: {name!r}")

    def wrap(fn: Callable) -> Callable:
        REGISTRY[name] = fn
        return fn

    return wrap


def get(name: str) -> Callable:
    if name not in REGISTRY:
        raise ValueError(f"unknown allocation method {name!r}: choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]


from floe_dist.methods import baselines, flexora, floe, guilomo, hilo  # noqa: E402,F401  (registration)
