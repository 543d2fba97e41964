"""LoRA mixture-of-experts around one frozen linear layer.

    y = W0 x + m * sum_e g_e(x) * (alpha / r_e) * B_e A_e dropout(x)

* ``W0`` is the frozen base layer (``nn.Linear`` or bitsandbytes ``Linear4bit``), never touched.
* Expert ``e`` has its own rank ``r_e`` (GuiLoMo/HILO allocate heterogeneous ranks).
* ``router="topk"`` (MoLA/MixLoRA): ``g = renormalised top-k of softmax(W_r x)``; each expert owns its A.
  ``router="dense"`` (HydraLoRA, the FLoE variant): ``g = softmax(W_r x)`` over all heads, one shared A.
  With one expert there is no router and ``g = 1``: the layer is exactly PEFT's LoRA.
* ``m`` is the per-layer *adapter scale* (a Fisher mask or Flexora's alpha-hat), applied once,
  to the adapter output only.

Experts are stored concatenated along the rank axis (``lora_A``: sum(r) x d_in, ``lora_B``:
d_out x sum(r)), so the forward pass is two matmuls whatever the routing: the gate weight of each
expert is broadcast over its rank columns, and experts that were not picked get weight 0. For
LoRA-sized experts that costs the same FLOPs as one LoRA of rank sum(r), and since no expert is
ever skipped, ZeRO-3 sees the same parameter order on every rank (skipping empty experts breaks its
prefetch bookkeeping). Token-sparse dispatch belongs to expert parallelism, applied from outside.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("topk", "dense")


class LoRAMoELinear(nn.Module):
    """A frozen linear layer plus a LoRA mixture of experts; trainable tensors are named ``lora_*``."""

    def __init__(
        self,
        base: nn.Module,
        ranks: Sequence[int],
        router: str = "topk",
        top_k: int = 2,
        alpha: float = 16.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        ranks = [int(r) for r in ranks]
        if not ranks or min(ranks) <= 0:
            raise ValueError(f"every expert needs a rank >= 1, got {ranks}")
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if router == "dense" and len(set(ranks)) != 1:
            raise ValueError(f"a dense (HydraLoRA) router shares one A, so all ranks must match: {ranks}")
        n_experts = len(ranks)
        if router == "topk" and not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be in [1, {n_experts}]")

        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.ranks, self.router, self.alpha = ranks, router, float(alpha)
        self.n_experts = n_experts
        self.top_k = top_k if router == "topk" else n_experts
        self.shared_a = router == "dense" and n_experts > 1
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        # Adapters live on the base layer's device, in fp32 whatever the base dtype (4-bit, bf16):
        # they are small, and fp32 keeps Adam stable. Moving the module would re-quantize a 4-bit base.
        dev = _device_of(base)
        a_rows = ranks[0] if self.shared_a else sum(ranks)
        self.lora_A = nn.Parameter(torch.empty(a_rows, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, sum(ranks), device=dev))
        self.lora_router = (nn.Linear(self.in_features, n_experts, bias=False, device=dev)
                            if n_experts > 1 else None)
        # Column c of lora_B belongs to expert expert_of_col[c] and is scaled by alpha / r_e.
        expert_of_col = torch.repeat_interleave(torch.arange(n_experts), torch.tensor(ranks)).to(dev)
        self.register_buffer("expert_of_col", expert_of_col, persistent=False)
        self.register_buffer("col_scale", self.alpha / torch.tensor(ranks, dtype=torch.float32, device=dev)[
            expert_of_col], persistent=False)
        self.reset_lora_parameters()

        self.adapter_scale: torch.Tensor | Callable[[], torch.Tensor] | None = None
        self.balance_loss: torch.Tensor | None = None  # Switch-style aux loss of the last forward
        self.expert_load: torch.Tensor | None = None  # share of routing weight per expert, last forward

    def reset_lora_parameters(self) -> None:
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B = 0, so the wrapped layer equals the base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.lora_router is not None:
            nn.init.kaiming_uniform_(self.lora_router.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, router={self.router}, top_k={self.top_k}, alpha={self.alpha}"

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights (tokens, E); records the balance loss and the expert load."""
        if self.lora_router is None:
            self.balance_loss, self.expert_load = None, None
            return x.new_ones(x.shape[0], 1)
        probs = F.softmax(self.lora_router(x).float(), dim=-1)  # (T, E)
        if self.router == "dense":
            gates = probs
            self.balance_loss = None  # HydraLoRA trains its dense router without a balance loss
        else:
            top_w, top_i = probs.topk(self.top_k, dim=-1)  # (T, k)
            top_w = top_w / top_w.sum(-1, keepdim=True)
            gates = torch.zeros_like(probs).scatter(-1, top_i, top_w)
            # Switch Transformer: E * sum_i f_i * P_i, equal to 1 under uniform routing.
            slot_share = F.one_hot(top_i, self.n_experts).float().mean(dim=(0, 1))  # f_i
            self.balance_loss = self.n_experts * (slot_share * probs.mean(0)).sum()
        self.expert_load = gates.detach().mean(0)
        return gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lead = x.shape[:-1]
        x2 = self.lora_dropout(x).reshape(-1, self.in_features).to(self.lora_A.dtype)  # (T, d_in)
        h = F.linear(x2, self.lora_A)  # (T, sum r) or (T, r) with a shared A
        if self.shared_a:
            h = h.repeat(1, self.n_experts)  # (T, E*r): every head reads the same A x
        gates = self.route(x2)  # (T, E)
        h = h * (gates[:, self.expert_of_col] * self.col_scale).to(h.dtype)
        delta = F.linear(h, self.lora_B)  # (T, d_out)
        scale = self.adapter_scale() if callable(self.adapter_scale) else self.adapter_scale
        if scale is not None:
            delta = delta * scale
        return y + delta.reshape(*lead, self.out_features).to(y.dtype)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors of this adapter (A, B, router), without the frozen base."""
        return [p for n, p in self.named_parameters() if n.startswith("lora_")]

    def expert_state(self) -> list[dict[str, torch.Tensor]]:
        """Per-expert views (A_e, B_e) of the concatenated tensors: the readable form of the weights."""
        out, start = [], 0
        for e, r in enumerate(self.ranks):
            a = self.lora_A if self.shared_a else self.lora_A[start:start + r]
            out.append({"A": a, "B": self.lora_B[:, start:start + r]})
            start += r
        return out


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def count_lora_parameters(d_in: int, d_out: int, ranks: Sequence[int], router: str) -> int:
    """Trainable parameters of one LoRAMoELinear, without building it."""
    n = len(ranks)
    a = ranks[0] * d_in if (router == "dense" and n > 1) else sum(ranks) * d_in
    return a + sum(ranks) * d_out + (n * d_in if n > 1 else 0)
