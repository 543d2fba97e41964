"""HILO (Cong et al., arXiv 2502.03884): per-layer number *and* rank of adapter experts.

Confirmed by the abstract: expert count and rank are both set per layer, to match each layer's
complexity. A documented assumption (methods.md §4.2, not checked against the paper): schedules
are written MoLA-style, one digit per equal group of consecutive layers, so "2468" over 32 layers
means 2 for layers 0-7, 4 for 8-15, 6 for 16-23 and 8 for 24-31 (higher layers get more). The
activation policy is top-k, or top-p with min/max experts (``--top-p``, ``--min-k``, ``--top-k``; an
assumption too: methods.md §4.2 reads "dynamic activation" as threshold routing). ``--budget`` is the
budget-driven schedule: every rank scaled by one factor until the count matches (allocate.py).
Active parameters per token are reported next to trainable ones (allocate, evaluate).
"""
from __future__ import annotations

from floe_dist.allocation import Allocation, ModuleAllocation
from floe_dist.methods import register


def schedule(spec: str, num_layers: int, default: int) -> list[int]:
    """Per-layer values from a digit schedule ("2468"), or ``default`` everywhere for "uniform"."""
    if spec == "uniform":
        return [default] * num_layers
    if not spec.isdigit() or "0" in spec:
        raise ValueError(f"schedule must be digits 1-9 such as '2468', or 'uniform'; got {spec!r}")
    values = [int(c) for c in spec]
    return [values[layer * len(values) // num_layers] for layer in range(num_layers)]


@register("hilo")
def hilo(recipe, shape) -> Allocation:
    a, h = recipe.adapter, recipe.allocate.hilo
    experts = schedule(h.expert_schedule, shape.num_layers, a.experts)
    ranks = schedule(h.rank_schedule, shape.num_layers, a.rank)
    layers = {}
    for layer in range(shape.num_layers):
        e, r = experts[layer], ranks[layer]
        top_k = min(a.top_k, e)
        module = ModuleAllocation(e, (r,) * e, "topk", top_k, a.top_p if e > 1 else 0.0, min(a.min_k, top_k))
        layers[layer] = {name: module for name in a.target_list}
    return Allocation(method="hilo", target_modules=a.target_list, layers=layers, alpha=a.alpha,
                      dropout=a.dropout, meta={"expert_schedule": h.expert_schedule,
                                                  "rank_schedule": h.rank_schedule}
                      ).with_parameter_count(shape.shapes)
