"""LoRA mixture-of-experts around one frozen linear layer.

    y = W0 x + m * sum_e g_e(x) * (alpha / r_e) * B_e A_e dropout(x)

* ``W0`` is the frozen base layer (``nn.Linear`` or bitsandbytes ``Linear4bit``), never touched.
* Expert ``e`` has its own rank ``r_e`` (GuiLoMo/HILO allocate heterogeneous ranks).
* ``router="topk"`` (MoLA/MixLoRA): ``g = renormalised top-k of softmax(W_r x)``; each expert owns its A.
  With ``top_p`` > 0 (HILO's activation policy) a token takes the fewest of its top-k experts whose
  probability mass reaches ``top_p``, but at least ``min_k``: easy tokens use fewer experts.
  ``router="dense"`` (HydraLoRA, the FLoE variant): ``g = softmax(W_r x)`` over all heads, one shared A.
  With one expert there is no router and ``g = 1``: the layer is exactly PEFT's LoRA.
* ``m`` is the per-layer *adapter scale* (a Fisher mask or Flexora's alpha-hat), applied once,
  to the adapter output only.

Experts are stored concatenated along the rank axis (``lora_A``: sum(r) x d_in, ``lora_B``:
d_out x sum(r)), so the forward pass is two matmuls whatever the routing: the gate weight of each
expert is broadcast over its rank columns, and experts that were not picked get weight 0. For
LoRA-sized experts that costs the same FLOPs as one LoRA of rank sum(r), and since no expert is
ever skipped, ZeRO-3 sees the same parameter order on every rank (skipping empty experts breaks its
prefetch bookkeeping). Token-sparse dispatch belongs to expert parallelism, applied from outside
(floe_dist.distributed.expert_parallel) through ``expert_dispatch``.

Fused router (opt-in): the router's elementwise work (softmax, top-k, renormalise, gate scatter, routing
counts, balance loss) and the gate broadcast can run as ``torch.compile`` kernels (``fuse_router``, or
``FLOE_DIST_FUSED_ROUTER=1``): eager, each small op is a kernel launch, and a GPU waits on the CPU launching
them. It is off by default everywhere until a GPU run of tests/gpu has passed with it (it has never run on
CUDA); on CPU it is tested equal to the eager path.
Routing and gate broadcast are one compiled function (``route_and_mix``), the balance loss a second one
after the ranks' routing stats are summed between them: two compiled calls forward, two backward.
The eager functions below are the CPU path and the reference the compiled ones are tested against.
``FLOE_DIST_FUSED_ROUTER=1`` turns it on (on CPU each process then pays the compile, tens of seconds on two
cores, and gains nothing measurable), ``=0`` or unset leaves it off; any other value is an error.

Capacity policy: no token is dropped unless ``capacity_factor`` > 0. Then each expert takes at most
``ceil(capacity_factor * tokens * top_k / n_experts)`` of this rank's assignments, in token order;
the rest get gate 0 (their adapter contribution is lost, the base output is kept) and are counted
in ``dropped``. The rule lives here, so replicated and expert-parallel runs drop the same tokens.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from floe_dist.allocation import ROUTERS


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
        top_p: float = 0.0,
        min_k: int = 1,
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
        if not 0.0 <= top_p <= 1.0 or (top_p > 0 and not 1 <= min_k <= top_k):
            raise ValueError(f"top_p={top_p} must be in [0, 1] (0 = off) and min_k={min_k} in [1, top_k={top_k}]")

        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.ranks, self.router, self.alpha = ranks, router, float(alpha)
        self.n_experts = n_experts
        self.top_k = top_k if router == "topk" else n_experts
        self.top_p, self.min_k = (float(top_p), int(min_k)) if router == "topk" and n_experts > 1 else (0.0, 1)
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
        self.register_buffer("expert_ranks", torch.tensor(ranks, dtype=torch.float32, device=dev), persistent=False)
        self.register_buffer("expert_scale", self.alpha / self.expert_ranks, persistent=False)  # alpha / r_e
        self.register_buffer("col_scale", self.expert_scale[expert_of_col], persistent=False)
        self.uniform_rank = len(set(ranks)) == 1
        self.reset_lora_parameters()

        self.adapter_scale: torch.Tensor | Callable[[], torch.Tensor] | None = None
        self.capacity_factor = 0.0  # 0 = no-drop (see the module docstring)
        self.fuse_router: bool | None = None  # None: FLOE_DIST_FUSED_ROUTER, else eager (module docstring)
        # Sums routing counts over all ranks, so the balance loss sees the global token distribution
        # (set by the trainer when there are several ranks; None = this rank's tokens only).
        self.routing_stats_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Replaces the dense expert computation (expert parallelism): (x, gates, top_i, kept) -> delta.
        self.expert_dispatch: Callable[..., torch.Tensor] | None = None
        self.balance_loss: torch.Tensor | None = None  # Switch-style aux loss of the last forward
        self.expert_load: torch.Tensor | None = None  # share of routing weight per expert, last forward
        self.dropped: torch.Tensor | None = None  # assignments dropped by the capacity rule, last forward
        self.top_i: torch.Tensor | None = None  # (T, k) experts picked per token, last forward
        self.kept: torch.Tensor | None = None  # (T, k) False where top-p or the capacity rule dropped the pick
        # Running sums for the active-parameter report (reset_activity / active_parameters_per_token).
        self.routed_tokens = torch.zeros((), dtype=torch.float64, device=dev)
        self.active_rank_sum = torch.zeros((), dtype=torch.float64, device=dev)

    def reset_lora_parameters(self) -> None:
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B = 0, so the wrapped layer equals the base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.lora_router is not None:
            nn.init.kaiming_uniform_(self.lora_router.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        top_p = f", top_p={self.top_p}, min_k={self.min_k}" if self.top_p else ""
        return f"ranks={self.ranks}, router={self.router}, top_k={self.top_k}{top_p}, alpha={self.alpha}"

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights (T, E); records the balance loss, expert load and the top-k picks."""
        self.top_i = self.kept = self.dropped = None
        if self.lora_router is None:
            self.balance_loss, self.expert_load = None, None
            self._count_activity(x.new_ones(x.shape[0], 1))
            return x.new_ones(x.shape[0], 1)
        logits = self.router_logits(x)
        if self.router == "dense":
            gates = F.softmax(logits.float(), dim=-1)
            self.balance_loss = None  # HydraLoRA trains its dense router without a balance loss
            return self._record(gates)
        routed = self._kernel(topk_route, logits)(logits, self.top_k, self.top_p, self.min_k, self.capacity_factor)
        return self._record_topk(*routed)

    def _route_and_mix(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``route(x)`` and the gate broadcast over ``h`` (equal ranks, top-k router) as one function: fused,
        one compiled graph forward and one backward instead of two each (each call has a fixed host cost)."""
        logits = self.router_logits(x)
        h, *routed = self._kernel(route_and_mix, logits)(
            logits, h, self.expert_scale, self.top_k, self.top_p, self.min_k, self.capacity_factor)
        self._record_topk(*routed)
        return h

    def _record_topk(self, gates, prob_sum, top_i, kept, dropped, stats) -> torch.Tensor:
        """Keep the top-k router's picks and its balance loss, over all ranks when there is a reducer."""
        self.top_i, self.kept, self.dropped = top_i, kept, dropped
        if self.routing_stats_reducer is not None:
            stats = self.routing_stats_reducer(stats)
        self.balance_loss = self._kernel(balance_loss, prob_sum)(prob_sum, stats)
        return self._record(gates)

    def _record(self, gates: torch.Tensor) -> torch.Tensor:
        self.expert_load = gates.detach().mean(0)
        self._count_activity(gates)
        return gates

    def _fused(self, t: torch.Tensor) -> bool:
        """Whether this call runs the compiled router: ``fuse_router`` if set, else the environment's
        choice, else not (opt-in until a GPU run of tests/gpu passes with it)."""
        if self.fuse_router is not None:
            return self.fuse_router
        # read per call, not at import: a process forked from one that imported this module has its own environment
        env = os.environ.get("FLOE_DIST_FUSED_ROUTER")
        if env not in (None, "0", "1"):
            raise ValueError(f"FLOE_DIST_FUSED_ROUTER must be 0 (op by op) or 1 (compiled), got {env!r}")
        return env == "1"

    def _kernel(self, fn: Callable, t: torch.Tensor) -> Callable:
        """``fn`` itself (eager) or compiled, as ``_fused`` decides for a call on ``t``."""
        return compiled(fn) if self._fused(t) else fn

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(T, E) router logits; GuiLoMo's search adds its expert mask here (floe_dist/methods/guilomo.py)."""
        return self.lora_router(x)

    def down_weight(self) -> torch.Tensor:
        """The stacked A actually applied; GuiLoMo's search scales its rows (rank mask)."""
        return self.lora_A

    def _count_activity(self, gates: torch.Tensor) -> None:
        """Add this batch to the running count of ranks used per token (the active-parameter report);
        in eval mode only, to keep the training step free of it."""
        if self.training:
            return
        with torch.no_grad():
            used = gates.detach() > 0  # (T, E)
            self.routed_tokens += gates.shape[0]
            self.active_rank_sum += (used.double() @ self.expert_ranks.double()).sum()

    def reset_activity(self) -> None:
        self.routed_tokens.zero_()
        self.active_rank_sum.zero_()

    def active_parameters_per_token(self) -> float:
        """Adapter parameters one token actually used, averaged over the tokens routed in eval mode since
        the last ``reset_activity``: the router plus the A and B of the experts it was sent to (a shared A once)."""
        tokens = float(self.routed_tokens)
        if tokens == 0:
            raise ValueError("no token routed since reset_activity(): run a forward pass in eval mode first")
        mean_rank = float(self.active_rank_sum) / tokens
        router = self.n_experts * self.in_features if self.lora_router is not None else 0
        if self.shared_a:
            return router + self.ranks[0] * self.in_features + mean_rank * self.out_features
        return router + mean_rank * (self.in_features + self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        lead = x.shape[:-1]
        x2 = self.lora_dropout(x).reshape(-1, self.in_features).to(self.adapter_dtype)  # (T, d_in)
        if self.expert_dispatch is not None:
            delta = self.expert_dispatch(x2, self.route(x2), self.top_i, self.kept)
        else:
            delta = self.dense_delta(x2)
        scale = self.adapter_scale() if callable(self.adapter_scale) else self.adapter_scale
        if scale is not None:
            delta = delta * scale
        return y + delta.reshape(*lead, self.out_features).to(y.dtype)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """fp32 as built; bf16 once a DeepSpeed bf16 engine has cast the trainable tensors."""
        return (self.lora_router.weight if self.lora_router is not None else self.lora_A).dtype

    def dense_delta(self, x: torch.Tensor) -> torch.Tensor:
        """sum_e g_e (alpha/r_e) B_e A_e x for every token (T, d_out): two matmuls, no expert skipped.

        With equal ranks the gate is broadcast over a (T, E, r) view, by the top-k router in the call that
        routes; heterogeneous ranks gather it per column, whose backward is an accumulating index_put (a sort
        on CUDA).
        """
        h = F.linear(x, self.down_weight())  # (T, sum r) or (T, r) with a shared A
        if not self.uniform_rank:
            h = h * (self.route(x)[:, self.expert_of_col] * self.col_scale).to(h.dtype)
        elif self.router == "topk" and self.lora_router is not None:
            h = self._route_and_mix(x, h)
        else:
            h = self._kernel(broadcast_gates, h)(h, self.route(x), self.expert_scale, self.shared_a)
        return F.linear(h, self.lora_B)  # (T, d_out)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors of this adapter (A, B, router), without the frozen base."""
        return [p for n, p in self.named_parameters() if n.startswith("lora_")]

    def expert_state(self) -> list[dict[str, torch.Tensor]]:
        """Per-expert views (A_e, B_e) of the concatenated tensors: the readable form of the weights."""
        out, start = [], 0
        for r in self.ranks:
            a = self.lora_A if self.shared_a else self.lora_A[start:start + r]
            out.append({"A": a, "B": self.lora_B[:, start:start + r]})
            start += r
        return out


def topk_route(logits: torch.Tensor, top_k: int, top_p: float, min_k: int, capacity_factor: float):
    """The top-k router's tensor work, pure so that ``torch.compile`` can fuse it.

    Returns gates (T, E), the router probabilities summed over tokens (E,), the picks top_i (T, k), kept
    (T, k; None when every pick is used), dropped (the capacity rule's count; None without one) and the
    routing stats to reduce over ranks: picks per expert (E,), then this rank's token count, then 1 (it
    sums to the number of ranks).
    """
    probs = F.softmax(logits.float(), dim=-1)  # (T, E)
    n_experts = probs.shape[-1]
    top_w, top_i = probs.topk(top_k, dim=-1)  # (T, k), descending
    active = top_p_active(top_w, top_p, min_k) if top_p else None
    if active is not None:
        top_w = top_w * active
    top_w = top_w / top_w.sum(-1, keepdim=True)
    kept, dropped = active, None
    if capacity_factor > 0:
        within = within_capacity(top_i, active, capacity_factor, n_experts)
        dropped = (within.logical_not() if active is None else active & ~within).sum()
        kept = within if active is None else active & within
    if kept is not None:
        top_w = top_w * kept
    gates = torch.zeros_like(probs).scatter(-1, top_i, top_w)
    onehot = F.one_hot(top_i, n_experts)  # (T, k, E)
    if active is not None:  # top-p: only the slots a token used count as picks
        onehot = onehot * active.unsqueeze(-1)
    picks = onehot.sum((0, 1)).float()  # (E,)
    # new_full, not new_tensor([...]): a list is copied from pageable host memory, which on CUDA
    # synchronises the stream in every MoE layer's forward
    stats = torch.cat([picks, picks.new_full((1,), probs.shape[0]), picks.new_ones(1)])
    return gates, probs.sum(0), top_i, kept, dropped, stats


def balance_loss(prob_sum: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Switch Transformer: E * sum_i f_i * P_i (1 under uniform routing), f_i and P_i over all ranks.

    ``stats`` is ``topk_route``'s, summed over the ranks. f_i (share of the used picks) is a count and has
    no gradient. P_i (mean router probability) is made global exactly: this rank contributes
    ``n_ranks * sum_local(p) / T_global``, so the ranks' mean, which data parallelism differentiates, is
    the global value whatever each rank's T.
    """
    picks, n_tokens, n_ranks = stats[:-2], stats[-2], stats[-1]
    share = picks / picks.sum()  # f_i
    prob_mean = prob_sum * (n_ranks / n_tokens)  # P_i, this rank's part
    return prob_sum.shape[-1] * (share * prob_mean).sum()


def route_and_mix(logits: torch.Tensor, h: torch.Tensor, expert_scale: torch.Tensor, top_k: int, top_p: float,
                  min_k: int, capacity_factor: float):
    """``topk_route``, then its gates broadcast over h (``broadcast_gates``): the mixed h, then ``topk_route``'s
    outputs. One function, so that the fused path compiles routing and mixing into one graph."""
    routed = topk_route(logits, top_k, top_p, min_k, capacity_factor)
    return broadcast_gates(h, routed[0], expert_scale, False), *routed


def top_p_active(top_w: torch.Tensor, top_p: float, min_k: int) -> torch.Tensor:
    """(T, k) mask: slot j is used while the mass of the slots before it is below top_p (>= min_k)."""
    mass_before = top_w.cumsum(-1) - top_w
    active = mass_before < top_p
    active[:, :min_k] = True
    return active


def within_capacity(top_i: torch.Tensor, active: torch.Tensor | None, capacity_factor: float,
                    n_experts: int) -> torch.Tensor:
    """(T, k) mask of the assignments that fit: the first ``capacity`` per expert, in token order
    (top-p slots that are not used take no place in the queue)."""
    capacity = math.ceil(capacity_factor * top_i.numel() / n_experts)
    onehot = F.one_hot(top_i.reshape(-1), n_experts)  # (T*k, E), token-major
    if active is not None:
        onehot = onehot * active.reshape(-1, 1)
    position = (onehot.cumsum(0) * onehot).sum(-1)  # 1-based place in its expert's queue
    return (position <= capacity).reshape(top_i.shape)


def broadcast_gates(h: torch.Tensor, gates: torch.Tensor, expert_scale: torch.Tensor, shared_a: bool) -> torch.Tensor:
    """(T, E*r): each expert's rank columns of h times its gate and alpha / r (equal ranks; a shared A's
    h (T, r) is read by every head)."""
    weight = (gates * expert_scale).to(h.dtype).unsqueeze(-1)  # (T, E, 1)
    rows = h.unsqueeze(1) if shared_a else h.view(h.shape[0], expert_scale.shape[0], -1)  # (T, 1|E, r)
    return (rows * weight).flatten(1)


# Each routing setting (experts, top-k, top-p or capacity on or off, grad or not) is a graph of its own, and
# a new token count compiles each once more (then with a dynamic token dimension). A heterogeneous allocation
# (HILO, GuiLoMo) has more of them than dynamo's default 8 recompiles per function, and past that limit a
# fullgraph function fails instead of falling back.
RECOMPILE_LIMIT = 128


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``fn`` through ``torch.compile``, built once per function (new settings and shapes recompile in place)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, fullgraph=True)  # a graph break would bring the launches back: fail instead


def compiled_router_ran() -> bool:
    """Whether this process ran the compiled router (``train.json`` records it: the opt-in is an environment
    variable, easy to set on one node and not another)."""
    return compiled.cache_info().currsize > 0


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")
