"""The allocation file: where adapters go and how big they are.

Every allocator writes this file and every trainer reads it (format ``floe-dist/allocation@1``)::

    {"format": "floe-dist/allocation@1", "method": "uniform", "target_modules": ["q_proj", "v_proj"],
     "alpha": 16.0, "dropout": 0.05,
     "layers": {"0": {"q_proj": {"experts": 4, "ranks": [2, 2, 2, 2], "router": "topk", "top_k": 2}, ...}},
     "trainable_parameters": 123456, "meta": {...}}

A ``topk`` module may add ``"top_p"`` and ``"min_k"`` (top-p activation, see LoRAMoELinear).
Layers absent from ``layers`` get no adapter. ``trainable_parameters`` is the exact count of adapter
parameters (experts + routers) on the model it was made for; it is checked against the built model.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from floe_dist.files import write_json_atomic

FORMAT = "floe-dist/allocation@1"
ROUTERS = ("topk", "dense")  # LoRAMoELinear's routers (floe_dist/modeling/lora_moe.py)


def count_active_parameters(d_in: int, d_out: int, ranks: Sequence[int], router: str, top_k: int) -> int:
    """Most adapter parameters one token can use: the router plus its top_k largest experts."""
    n = len(ranks)
    router_params = n * d_in if n > 1 else 0
    if router == "dense" and n > 1:
        return router_params + ranks[0] * d_in + sum(ranks) * d_out
    return router_params + sum(sorted(ranks)[-top_k:]) * (d_in + d_out)


def count_lora_parameters(d_in: int, d_out: int, ranks: Sequence[int], router: str) -> int:
    """Trainable parameters of one LoRAMoELinear, without building it."""
    n = len(ranks)
    a = ranks[0] * d_in if (router == "dense" and n > 1) else sum(ranks) * d_in
    return a + sum(ranks) * d_out + (n * d_in if n > 1 else 0)


class AllocationError(ValueError):
    """An allocation that cannot be applied; the message lists every problem found."""


@dataclass(frozen=True)
class ModuleAllocation:
    experts: int
    ranks: tuple[int, ...]
    router: str = "topk"
    top_k: int = 1
    top_p: float = 0.0  # > 0: top-p activation capped at top_k, at least min_k experts (HILO)
    min_k: int = 1

    def to_json(self) -> dict[str, Any]:
        out = {"experts": self.experts, "ranks": list(self.ranks), "router": self.router, "top_k": self.top_k}
        if self.top_p:
            out.update(top_p=self.top_p, min_k=self.min_k)
        return out


@dataclass
class Allocation:
    method: str
    target_modules: list[str]
    layers: dict[int, dict[str, ModuleAllocation]]
    alpha: float = 16.0
    dropout: float = 0.0
    trainable_parameters: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- building
    @classmethod
    def uniform(cls, num_layers: int, target_modules: list[str], experts: int = 1, rank: int = 8,
                router: str = "topk", top_k: int = 1, layers: list[int] | None = None,
                alpha: float = 16.0, dropout: float = 0.0, method: str = "uniform", top_p: float = 0.0,
                min_k: int = 1) -> Allocation:
        """Same experts and rank on every chosen layer (all layers by default)."""
        chosen = range(num_layers) if layers is None else sorted(layers)
        top_k = min(top_k, experts)
        module = ModuleAllocation(experts, (rank,) * experts, router, top_k,
                                  top_p if experts > 1 and router == "topk" else 0.0, min(min_k, top_k))
        return cls(method=method, target_modules=list(target_modules),
                   layers={i: {m: module for m in target_modules} for i in chosen}, alpha=alpha, dropout=dropout)

    def resized(self, rank: int, experts: int | None = None, method: str | None = None) -> Allocation:
        """The same layers and modules with every expert at ``rank`` (and ``experts`` per module if
        given): how a rank search applies its choice to the layers that scoring selected."""
        def resize(m: ModuleAllocation) -> ModuleAllocation:
            n = m.experts if experts is None else experts
            top_k = min(m.top_k, n)
            return ModuleAllocation(n, (rank,) * n, m.router, top_k, m.top_p if n > 1 else 0.0, min(m.min_k, top_k))

        return Allocation(method=method or self.method, target_modules=list(self.target_modules),
                          layers={i: {name: resize(m) for name, m in mods.items()} for i, mods in self.layers.items()},
                          alpha=self.alpha, dropout=self.dropout, meta=dict(self.meta))

    def with_top_k(self, top_k: int) -> Allocation:
        """Every top-k-routed module with several experts routing each token to ``top_k`` of them (at most
        its expert count); ranks, experts and dense modules unchanged: how a search applies a top-k choice."""
        def route(m: ModuleAllocation) -> ModuleAllocation:
            if m.router != "topk" or m.experts < 2:
                return m
            k = min(top_k, m.experts)
            return replace(m, top_k=k, min_k=min(m.min_k, k))

        return replace(self, meta=dict(self.meta), trainable_parameters=None,
                       layers={i: {n: route(m) for n, m in mods.items()} for i, mods in self.layers.items()})

    @property
    def routes_top_k(self) -> bool:
        """Some module picks among several experts per token: a top-k choice changes something."""
        return any(m.router == "topk" and m.experts > 1 for mods in self.layers.values() for m in mods.values())

    @property
    def is_uniform(self) -> bool:
        """Every module the same: one expert count and one rank everywhere."""
        return len({(m.experts, *m.ranks) for mods in self.layers.values() for m in mods.values()}) == 1

    def rank_scaled(self, rank: int, method: str | None = None) -> Allocation:
        """Every rank times ``rank / largest rank``: the largest becomes ``rank`` and the shape (which
        layers and experts get more) is kept; a uniform allocation ends with every rank = ``rank``.
        How a rank search applies its choice without flattening a HILO or GuiLoMo allocation."""
        largest = max(r for mods in self.layers.values() for m in mods.values() for r in m.ranks)
        scale = lambda m: replace(m, ranks=tuple(max(1, round(r * rank / largest)) for r in m.ranks))
        return replace(self, method=method or self.method, meta=dict(self.meta), trainable_parameters=None,
                       layers={i: {n: scale(m) for n, m in mods.items()} for i, mods in self.layers.items()})

    def scaled_to_budget(self, budget: int, shapes: Mapping[str, tuple[int, int]]) -> Allocation:
        """Every rank times one factor f (rounded, at least 1), f chosen so the parameter count is closest
        to ``budget``: the shape of a schedule (which layers and experts get more) is kept, its size is
        matched. The count never decreases as f grows, so bisection finds the two counts around it."""
        if budget <= 0:
            raise ValueError(f"budget must be a positive parameter count, got {budget}")

        def scaled(f: float) -> Allocation:
            def scale(m: ModuleAllocation) -> ModuleAllocation:
                return replace(m, ranks=tuple(max(1, round(r * f)) for r in m.ranks))
            return replace(self, layers={i: {n: scale(m) for n, m in mods.items()} for i, mods in self.layers.items()},
                           meta=dict(self.meta))

        lo, hi = 1e-6, 1.0
        while scaled(hi).count_parameters(shapes) < budget and hi < 1e6:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if scaled(mid).count_parameters(shapes) < budget else (lo, mid)
        best = min((scaled(lo), scaled(hi)), key=lambda a: abs(a.count_parameters(shapes) - budget))
        best.meta["budget"] = budget
        return best.with_parameter_count(shapes)

    def with_parameter_count(self, shapes: Mapping[str, tuple[int, int]]) -> Allocation:
        self.trainable_parameters = self.count_parameters(shapes)
        return self

    def count_parameters(self, shapes: Mapping[str, tuple[int, int]]) -> int:
        """Exact adapter parameter count, given ``{module name: (d_in, d_out)}``."""
        return sum(count_lora_parameters(*shapes[name], m.ranks, m.router)
                   for mods in self.layers.values() for name, m in mods.items())

    def count_active_parameters(self, shapes: Mapping[str, tuple[int, int]]) -> int:
        """Most adapter parameters one token can use (routers + its top-k largest experts per module);
        with top-p routing or unequal ranks the measured mean is lower (see evaluate)."""
        return sum(count_active_parameters(*shapes[name], m.ranks, m.router, m.top_k)
                   for mods in self.layers.values() for name, m in mods.items())

    # ------------------------------------------------------------ (de)serialise
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "method": self.method, "target_modules": list(self.target_modules),
            "alpha": self.alpha, "dropout": self.dropout,
            "layers": {str(i): {n: m.to_json() for n, m in mods.items()} for i, mods in sorted(self.layers.items())},
            "trainable_parameters": self.trainable_parameters, "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic write (temp file + rename): a crash never leaves a half-written allocation."""
        return write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Allocation:
        problems: list[str] = []
        if not isinstance(data, Mapping):
            raise AllocationError("allocation must be a JSON object")
        if data.get("format") != FORMAT:
            problems.append(f"format must be {FORMAT!r}, got {data.get('format')!r}")
        targets = data.get("target_modules")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            problems.append("target_modules must be a non-empty list of module names")
            targets = []
        raw_layers = data.get("layers")
        layers: dict[int, dict[str, ModuleAllocation]] = {}
        if not isinstance(raw_layers, Mapping) or not raw_layers:
            problems.append("empty allocation: 'layers' names no layer, so nothing would be trained")
            raw_layers = {}
        for key, mods in raw_layers.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                problems.append(f"layer key {key!r} is not an integer index")
                continue
            if not isinstance(mods, Mapping) or not mods:
                problems.append(f"layer {key}: expected a non-empty mapping of module name -> spec")
                continue
            layers[idx] = {}
            for name, spec in mods.items():
                parsed = _parse_module(f"layer {key} module {name!r}", spec, problems)
                if parsed is not None:
                    layers[idx][name] = parsed
        count = data.get("trainable_parameters")
        if count is not None and (not isinstance(count, int) or count < 0):
            problems.append(f"trainable_parameters must be a non-negative integer, got {count!r}")
        if problems:
            raise AllocationError("invalid allocation:\n  - " + "\n  - ".join(problems))
        return cls(method=str(data.get("method", "unknown")), target_modules=list(targets), layers=layers,
                   alpha=float(data.get("alpha", 16.0)), dropout=float(data.get("dropout", 0.0)),
                   trainable_parameters=count, meta=dict(data.get("meta") or {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Allocation:
        path = Path(path)
        if not path.is_file():
            raise AllocationError(f"allocation file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise AllocationError(f"allocation file {path} is not valid JSON: {err}") from None
        return cls.from_json(data)

    # --------------------------------------------------------------- checking
    def validate(self, num_layers: int, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Check this allocation against a model: layer range, module names, parameter count."""
        problems = []
        unknown_targets = sorted(set(self.target_modules) - set(shapes))
        if unknown_targets:
            problems.append(f"unknown target module(s) {unknown_targets}; the model has {sorted(shapes)}")
        for idx, mods in sorted(self.layers.items()):
            if not 0 <= idx < num_layers:
                problems.append(f"layer {idx} is out of range: the model has layers 0..{num_layers - 1}")
            for name in mods:
                if name not in self.target_modules:
                    problems.append(f"layer {idx}: module {name!r} is not in target_modules {self.target_modules}")
                elif name not in shapes:
                    problems.append(f"layer {idx}: unknown module name {name!r}; the model has {sorted(shapes)}")
        if not problems and self.trainable_parameters is not None:
            real = self.count_parameters(shapes)
            if real != self.trainable_parameters:
                problems.append(f"trainable_parameters says {self.trainable_parameters} but this model "
                                f"would have {real}: the file was made for another model")
        if problems:
            raise AllocationError("allocation does not fit the model:\n  - " + "\n  - ".join(problems))

    @property
    def is_plain_lora(self) -> bool:
        """One expert per adapted module: exportable as a standard PEFT LoRA adapter."""
        return all(m.experts == 1 for mods in self.layers.values() for m in mods.values())


def _parse_module(where: str, spec: Any, problems: list[str]) -> ModuleAllocation | None:
    if not isinstance(spec, Mapping):
        problems.append(f"{where}: expected an object with experts/ranks/router/top_k")
        return None
    ranks = spec.get("ranks")
    experts = spec.get("experts", len(ranks) if isinstance(ranks, list) else None)
    router = spec.get("router", "topk")
    top_k = spec.get("top_k", 1)
    top_p, min_k = spec.get("top_p", 0.0), spec.get("min_k", 1)
    before = len(problems)
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, int) for r in ranks):
        problems.append(f"{where}: ranks must be a non-empty list of integers")
    elif min(ranks) <= 0:
        problems.append(f"{where}: ranks must be >= 1, got {ranks}")
    elif experts != len(ranks):
        problems.append(f"{where}: experts={experts} but {len(ranks)} ranks given")
    if router not in ROUTERS:
        problems.append(f"{where}: router must be one of {list(ROUTERS)}, got {router!r}")
    elif router == "dense" and isinstance(ranks, list) and len(set(ranks)) > 1:
        problems.append(f"{where}: a dense router shares one A, so all ranks must be equal, got {ranks}")
    if not isinstance(top_k, int) or top_k < 1:
        problems.append(f"{where}: top_k must be an integer >= 1, got {top_k!r}")
    elif isinstance(experts, int) and top_k > experts:
        problems.append(f"{where}: top_k={top_k} is larger than experts={experts}")
    if not isinstance(top_p, (int, float)) or not 0 <= top_p <= 1:
        problems.append(f"{where}: top_p must be a number in [0, 1] (0 = plain top-k), got {top_p!r}")
    elif top_p and (router != "topk" or not isinstance(min_k, int) or not 1 <= min_k <= top_k):
        problems.append(f"{where}: top_p needs router 'topk' and min_k in [1, top_k={top_k}], got "
                        f"router={router!r} min_k={min_k!r}")
    if len(problems) > before:
        return None
    return ModuleAllocation(experts=experts, ranks=tuple(ranks), router=router, top_k=top_k,
                            top_p=float(top_p), min_k=min_k)
