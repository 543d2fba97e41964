"""Per-layer Fisher information of LoRA-MoE adapters, and the layer selections built on it (FLoE).

Following the reconstruction in ../shared/reference/methods.md §2.3 (Kwon et al. 2022 at layer
granularity): every adapted layer l gets a scalar mask ``m_l`` (= 1) multiplying its total adapter
output. For each mini-batch b the gradient ``g_b = dL_b/dm`` is taken at m = 1 and

* ``mask``   (default)  F_l  = sum_b g_{b,l}^2                      (diagonal empirical Fisher)
* block               F_lk = sum_b g_{b,l} g_{b,k}                 (for ``refine``)
* ``taylor``          T_l  = |sum_b g_{b,l}|                       (first-order score, reviewers' ablation)
* ``param``           P_l  = sum_b sum_{theta in layer l} (dL_b/dtheta)^2   (optionally / #params)

Only sums are kept, so ranks that score disjoint batches combine their statistics with one
all-reduce at the end (``FisherSums.reduce``) and N ranks give the scores of one process that saw
all the batches. This module is single-process maths; the stage that drives it is floe_dist/stages/score.py.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from floe_dist.modeling.lora_moe import LoRAMoELinear

MODES = ("mask", "param", "taylor")


class LayerMasks:
    """One scalar per adapted layer, wired into every adapter of that layer through ``adapter_scale``."""

    def __init__(self, adapters_by_layer: dict[int, list[LoRAMoELinear]], device: torch.device | str = "cpu"):
        self.layers = sorted(adapters_by_layer)
        self.values = torch.ones(len(self.layers), device=device, requires_grad=True)
        for i, layer in enumerate(self.layers):
            for module in adapters_by_layer[layer]:
                module.adapter_scale = lambda i=i: self.values[i]  # indexed anew on every forward

    def detach(self, adapters_by_layer: dict[int, list[LoRAMoELinear]]) -> None:
        for modules in adapters_by_layer.values():
            for module in modules:
                module.adapter_scale = None


@dataclass
class FisherSums:
    """Running sums over mini-batches; everything here adds up across batches and ranks."""

    n_layers: int
    with_param: bool = False
    diag: torch.Tensor = field(init=False)
    block: torch.Tensor = field(init=False)
    signed: torch.Tensor = field(init=False)
    param: torch.Tensor = field(init=False)
    batches: int = 0
    samples: int = 0

    def __post_init__(self):
        self.diag = torch.zeros(self.n_layers, dtype=torch.float64)
        self.block = torch.zeros(self.n_layers, self.n_layers, dtype=torch.float64)
        self.signed = torch.zeros(self.n_layers, dtype=torch.float64)
        self.param = torch.zeros(self.n_layers, dtype=torch.float64)

    def add(self, mask_grad: torch.Tensor, samples: int, param_sq: torch.Tensor | None = None) -> None:
        g = mask_grad.detach().to("cpu", torch.float64)
        if not torch.isfinite(g).all() or (param_sq is not None and not torch.isfinite(param_sq).all()):
            raise FloatingPointError(f"non-finite Fisher gradient in batch {self.batches}: check the warm-up "
                                     f"adapter and the data (lower the warm-up lr?)")
        self.diag += g * g
        self.block += torch.outer(g, g)
        self.signed += g
        if param_sq is not None:
            self.param += param_sq.detach().to("cpu", torch.float64)
        self.batches += 1
        self.samples += samples

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> FisherSums:
        """Sum the statistics of all ranks with one collective (a no-op function in one process)."""
        flat = torch.cat([self.diag, self.block.flatten(), self.signed, self.param,
                          torch.tensor([self.batches, self.samples], dtype=torch.float64)])
        flat = all_reduce_sum(flat)
        n = self.n_layers
        out = FisherSums(n, self.with_param)
        out.diag, out.block = flat[:n], flat[n:n + n * n].reshape(n, n)
        out.signed, out.param = flat[n + n * n:2 * n + n * n], flat[2 * n + n * n:3 * n + n * n]
        out.batches, out.samples = int(flat[-2].item()), int(flat[-1].item())
        return out

    def scores(self, mode: str, param_counts: torch.Tensor | None = None) -> torch.Tensor:
        if mode == "mask":
            return self.diag.clone()
        if mode == "taylor":
            return self.signed.abs()
        if mode == "param":
            if not self.with_param:
                raise ValueError("param scores were not collected (score with mode='param')")
            return self.param / param_counts if param_counts is not None else self.param.clone()
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def accumulate_fisher(model: torch.nn.Module, adapters_by_layer: dict[int, list[LoRAMoELinear]],
                      batches: Iterable[dict[str, torch.Tensor]], loss_fn: Callable[[dict], torch.Tensor],
                      with_param: bool = False, device: torch.device | str = "cpu",
                      progress: Callable[[Iterable], Iterable] = lambda it: it) -> FisherSums:
    """Accumulate this process's Fisher sums over ``batches`` (``loss_fn(batch) -> scalar``).

    Gradients are taken with ``torch.autograd.grad`` on the masks (and adapter parameters for
    ``param``), so nothing accumulates in ``.grad`` and no optimizer or gradient reduction runs.
    """
    masks = LayerMasks(adapters_by_layer, device)
    layer_params = [[p for m in adapters_by_layer[l] for p in m.adapter_parameters()] for l in masks.layers]
    flat_params = [p for ps in layer_params for p in ps]
    sums = FisherSums(len(masks.layers), with_param)
    try:
        for batch in progress(batches):
            loss = loss_fn(batch)
            grads = torch.autograd.grad(loss, [masks.values, *flat_params] if with_param else [masks.values])
            param_sq = None
            if with_param:
                it = iter(grads[1:])
                param_sq = torch.stack([sum(next(it).double().pow(2).sum() for _ in ps) for ps in layer_params])
            sums.add(grads[0], samples=int(batch["input_ids"].shape[0]), param_sq=param_sq)
    finally:
        masks.detach(adapters_by_layer)
    return sums


# --------------------------------------------------------------------------- selection
def default_k(num_layers: int) -> int:
    """FLoE's headline setting: adapters on a quarter of the layers (8 of 32)."""
    return max(1, round(0.25 * num_layers))


def select_top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices (into ``scores``) of the k largest, ties broken by lower index."""
    n = len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of scored layers ({n})")
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def predicted_loss_increase(block: torch.Tensor, dropped: list[int]) -> float:
    """0.5 * sum_{i,j in dropped} F_ij: the second-order estimate of switching those adapters off."""
    if not dropped:
        return 0.0
    idx = torch.tensor(dropped)
    return 0.5 * float(block[idx][:, idx].sum())


def select_budget(scores: torch.Tensor, costs: list[int], budget: int) -> list[int]:
    """Keep the set with the smallest predicted loss increase (0.5 * sum F over dropped layers)
    whose adapter parameters fit ``budget``: a 0/1 knapsack maximising kept Fisher, solved exactly
    by dynamic programming over the (few) distinct layer costs."""
    if budget < min(costs):
        raise ValueError(f"budget {budget} is smaller than the cheapest layer's adapter ({min(costs)} parameters)")
    unit = _gcd(costs)
    cap = budget // unit
    w = [c // unit for c in costs]
    best = {0: (0.0, ())}  # used capacity -> (kept score, kept set)
    for i, (wi, si) in enumerate(zip(w, scores.tolist())):
        for used, (val, kept) in list(best.items()):
            u = used + wi
            if u <= cap and (u not in best or best[u][0] < val + si):
                best[u] = (val + si, kept + (i,))
    return sorted(max(best.values(), key=lambda v: (v[0], -len(v[1])))[1])


def refine_with_block(block: torch.Tensor, kept: list[int]) -> list[int]:
    """Swap kept/dropped pairs while the block-Fisher prediction of the loss increase drops."""
    n = block.shape[0]
    kept = sorted(kept)
    improved = True
    while improved:
        improved = False
        dropped = [i for i in range(n) if i not in kept]
        current = predicted_loss_increase(block, dropped)
        for a in list(kept):
            for b in dropped:
                trial = sorted([i for i in dropped if i != b] + [a])
                if predicted_loss_increase(block, trial) < current - 1e-12:
                    kept = sorted([i for i in kept if i != a] + [b])
                    improved = True
                    break
            if improved:
                break
    return kept


def _gcd(values: list[int]) -> int:
    from math import gcd

    out = 0
    for v in values:
        out = gcd(out, int(v))
    return max(out, 1)
