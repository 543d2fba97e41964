"""GuiLoMo (Zhang et al., EMNLP 2025 Findings): expert number and rank per module from Guided Selection
Vectors (GSVs) learned by bilevel optimisation (methods.md §5).

Search stage: every target module is a LoRA-MoE at its maximum size (``n_max`` experts of rank
``r_max``, top-2) plus
  * an expert GSV ``g_E`` (n_max,): experts beyond ``k = max(1, argmax sigmoid(g_E))`` get router
    logit -1e4 (off), the others +0.5, so at least 2 experts stay on;
  * per expert a rank GSV ``g_R`` (r_max,) and a rank-scaling vector ``c`` (init 1): row j of A_e is
    multiplied by ``c_j * (1 if j <= argmax sigmoid(g_R) else 1e-4)``.
The masks are step functions; their custom backward (``ExpertMask``, ``RankMask``) sends the upstream
gradient only to the winning coordinate, as the cumulative sum ``sum_{i<=k} sigmoid(g)_i * delta_i``
(ranks: plus a 1e-4 leak everywhere else), so only the cut point moves.

Bilevel search (DARTS): the upper level (GSVs, AdamW lr 3e-3, betas (0.5, 0.999)) and the lower
level (A, B, c, router; AdamW) alternate on *alternating training batches*, as the official code does
(one batch is "train", the next "valid"). ``order="second"`` adds DARTS's implicit term by a virtual
AdamW step and a finite-difference Hessian-vector product (5 forward/backward passes per step);
``order="first"`` uses the validation gradient at the current weights (2 passes).

Export: ``E = max(2, argmax g_E + 1)`` experts per module and ``r_e = argmax g_R_e + 1`` per expert.
Deliberate differences from the official code, documented: the retrained module scales each expert by
``alpha / r_e`` (the code reuses the last expert's rank for the whole module, a leaked loop variable);
the forced ``k = 1`` case puts the gradient on coordinate 1, as the code does.

As an allocator (``floe-dist allocate --method guilomo``): GSV search on the task, then export per-module expert
counts and per-expert ranks (heterogeneous inside a module) to the allocation file.

The search wraps every target module of every layer at ``--guilomo-experts`` x ``--guilomo-rank``
(official: 8 x 8, top-2, all 7 projections; here the targets of ``--targets``) and trains on
alternating batches of the training split, as the official code does. Runs in one process.

Matches the official code: lower level AdamW lr 3e-4 (``--guilomo-lr``), upper level AdamW lr 3e-3,
betas (0.5, 0.999); balance loss 0.001 x sum_i f_i P_i per module. Deviations from it:
  * search length: ``--guilomo-steps`` (default 40) bilevel steps, not one epoch of the training set;
  * lower-level batch ``--guilomo-batch`` (default 8) examples, not 64 (16 x 4 accumulation), no 100-step
    lr warm-up and no schedule, fp32 (CPU) or bf16 (GPU) instead of fp16;
  * the targets of ``--targets`` (default q_proj, v_proj), not all 7 projections;
  * see above for the retrained module's per-expert scaling (the official code's leaked
    loop variable is fixed).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from floe_dist.allocation import Allocation, ModuleAllocation
from floe_dist.methods import register
from floe_dist.modeling.inject import find_layer_linears, replace_module
from floe_dist.modeling.lora_moe import LoRAMoELinear

EXPERT_ON, EXPERT_OFF = 0.5, -1e4
RANK_OFF = 1e-4  # mask value of a rank row beyond the cut, and the gradient leak to non-winners


class ExpertMask(torch.autograd.Function):
    """sigmoid(g_E) (E,) -> router-logit mask: +0.5 for i <= k, -1e4 beyond, k = max(1, argmax).
    Backward: zero except at k, where it is sum_{i<=k} s_i * delta_i."""

    @staticmethod
    def forward(ctx, s: torch.Tensor) -> torch.Tensor:
        k = max(1, int(s.argmax()))
        ctx.save_for_backward(s)
        ctx.k = k
        idx = torch.arange(s.numel(), device=s.device)
        return torch.where(idx <= k, EXPERT_ON, EXPERT_OFF).to(s.dtype)

    @staticmethod
    def backward(ctx, delta: torch.Tensor) -> torch.Tensor:
        (s,) = ctx.saved_tensors
        grad = torch.zeros_like(s)
        grad[ctx.k] = (s * delta).cumsum(0)[ctx.k]
        return grad


class RankMask(torch.autograd.Function):
    """sigmoid(g_R) (..., r) -> row mask: 1 for j <= argmax, 1e-4 beyond (per leading index).
    Backward: sum_{j<=j*} s_j * delta_j at the argmax, 1e-4 * delta_j everywhere else."""

    @staticmethod
    def forward(ctx, s: torch.Tensor) -> torch.Tensor:
        j = s.argmax(-1, keepdim=True)
        ctx.save_for_backward(s, j)
        idx = torch.arange(s.shape[-1], device=s.device)
        return torch.where(idx <= j, 1.0, RANK_OFF).to(s.dtype)

    @staticmethod
    def backward(ctx, delta: torch.Tensor) -> torch.Tensor:
        s, j = ctx.saved_tensors
        winner = torch.arange(s.shape[-1], device=s.device) == j
        return torch.where(winner, (s * delta).cumsum(-1), RANK_OFF * delta)


class GuidedLoRAMoE(LoRAMoELinear):
    """The search-stage module: a maximal top-k LoRA-MoE whose expert count and ranks are cut by GSVs."""

    def __init__(self, base: nn.Module, n_max: int = 8, r_max: int = 8, top_k: int = 2, alpha: float = 16.0,
                 dropout: float = 0.05):
        if n_max < 2 or r_max < 1:
            raise ValueError(f"GuiLoMo needs n_max >= 2 experts and r_max >= 1, got {n_max}, {r_max}")
        super().__init__(base, [r_max] * n_max, "topk", top_k, alpha, dropout)
        dev = self.lora_A.device
        self.lora_rank_scale = nn.Parameter(torch.ones(n_max, r_max, device=dev))  # c, lower level
        # GSVs (upper level): softmax of a normal draw, small positive numbers, as the official code.
        self.gsv_experts = nn.Parameter(F.softmax(torch.randn(n_max), 0).to(dev))
        self.gsv_ranks = nn.Parameter(F.softmax(torch.randn(n_max, r_max), -1).to(dev))
        with torch.no_grad():  # search-stage init: A and B ~ N(0, 0.02^2), B not zero
            self.lora_A.normal_(0.0, 0.02)
            self.lora_B.normal_(0.0, 0.02)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_router(x) + ExpertMask.apply(torch.sigmoid(self.gsv_experts))

    def down_weight(self) -> torch.Tensor:
        rows = self.lora_rank_scale * RankMask.apply(torch.sigmoid(self.gsv_ranks))  # (E, r)
        return self.lora_A * rows.reshape(-1, 1)

    def gsv_parameters(self) -> list[nn.Parameter]:
        return [self.gsv_experts, self.gsv_ranks]

    def exported(self) -> ModuleAllocation:
        """E = max(2, argmax g_E + 1); r_e = argmax g_R_e + 1 for the kept experts; top-2 routing."""
        n = max(2, int(self.gsv_experts.detach().argmax()) + 1)
        ranks = tuple(int(j) + 1 for j in self.gsv_ranks.detach()[:n].argmax(-1))
        return ModuleAllocation(n, ranks, "topk", min(self.top_k, n))


def inject_guided(model: nn.Module, layers: list[int], targets: list[str], **kwargs
                  ) -> dict[int, list[tuple[str, GuidedLoRAMoE]]]:
    """Freeze the model and wrap every target module of ``layers`` in a GuidedLoRAMoE."""
    linears = find_layer_linears(model)
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[int, list[tuple[str, GuidedLoRAMoE]]] = {}
    for layer in layers:
        for name in targets:
            full_name, base = linears[layer][name]
            out.setdefault(layer, []).append((name, replace_module(model, full_name, GuidedLoRAMoE(base, **kwargs))))
    return out


def export_allocation(modules: dict[int, list[tuple[str, GuidedLoRAMoE]]], targets: list[str],
                      alpha: float, dropout: float) -> Allocation:
    layers = {layer: {name: m.exported() for name, m in mods} for layer, mods in sorted(modules.items())}
    gsv = {f"{layer}.{name}": {"experts": [round(v, 5) for v in m.gsv_experts.tolist()]}
           for layer, mods in modules.items() for name, m in mods}
    return Allocation(method="guilomo", target_modules=list(targets), layers=layers, alpha=alpha, dropout=dropout,
                      meta={"gsv": gsv})


def guilomo_search(modules: list[GuidedLoRAMoE], batches: Iterator[dict], loss_fn: Callable[[dict], torch.Tensor],
                   steps: int, order: str = "second", lr: float = 3e-4, lr_arch: float = 3e-3,
                   on_step: Callable[[int, float], None] = lambda step, loss: None) -> None:
    """``steps`` bilevel iterations on pairs of consecutive batches (a "train" one, then a "valid" one):
    first the GSV step (upper level), then the adapters' step on the train batch, as the official
    ``training_step`` does."""
    if order not in ("first", "second"):
        raise ValueError(f"order must be 'first' or 'second', got {order!r}")
    theta = [p for m in modules for p in m.adapter_parameters()]
    gsv = [p for m in modules for p in m.gsv_parameters()]
    opt = torch.optim.AdamW(theta, lr=lr, weight_decay=0.0)
    opt_arch = torch.optim.AdamW(gsv, lr=lr_arch, betas=(0.5, 0.999), eps=1e-8, weight_decay=0.0)

    def grads(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
        out = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out)]

    def set_grads(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
        for p, g in zip(params, values):
            p.grad = g

    for step in range(steps):
        train, valid = next(batches), next(batches)
        if order == "first":
            arch = grads(loss_fn(valid), gsv)
        else:
            arch = _second_order_arch_grads(theta, gsv, opt, train, valid, loss_fn, grads, set_grads)
        set_grads(gsv, arch)
        opt_arch.step()
        opt_arch.zero_grad(set_to_none=True)
        loss = loss_fn(train)
        set_grads(theta, grads(loss, theta))
        opt.step()
        opt.zero_grad(set_to_none=True)
        on_step(step, float(loss.detach()))


def _second_order_arch_grads(theta, gsv, opt, train, valid, loss_fn, grads, set_grads) -> list[torch.Tensor]:
    """DARTS: d/dg L_val(theta', g) - eta * (d/dg L_train(theta + eps v) - d/dg L_train(theta - eps v)) / 2eps,
    theta' = one *real* AdamW step from theta (state restored after), v = dL_val/dtheta', eps = 0.01/|v|,
    eta = the lower level's current learning rate."""
    saved = [p.detach().clone() for p in theta]
    saved_state = copy.deepcopy(opt.state_dict())
    set_grads(theta, grads(loss_fn(train), theta))
    opt.step()  # virtual step
    opt.zero_grad(set_to_none=True)
    val = grads(loss_fn(valid), gsv + theta)
    d_gsv, v = val[: len(gsv)], val[len(gsv):]
    opt.load_state_dict(saved_state)
    implicit = finite_difference_hvp(theta, saved, v, lambda: grads(loss_fn(train), gsv))
    eta = opt.param_groups[0]["lr"]
    return [d - eta * h for d, h in zip(d_gsv, implicit)]


def finite_difference_hvp(theta: list[nn.Parameter], at: list[torch.Tensor], v: list[torch.Tensor],
                          grad_gsv: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    """d^2 L / dg dtheta . v ~ (grad_g L(theta + eps v) - grad_g L(theta - eps v)) / 2 eps, eps = 0.01/|v|,
    around ``at``; theta is left at ``at``."""
    eps = 0.01 / max(math.sqrt(sum(float(t.pow(2).sum()) for t in v)), 1e-12)
    plus_minus = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, p0, vi in zip(theta, at, v):
                p.copy_(p0 + sign * eps * vi)
        plus_minus.append(grad_gsv())
    with torch.no_grad():
        for p, p0 in zip(theta, at):
            p.copy_(p0)
    return [(gp - gm) / (2 * eps) for gp, gm in zip(*plus_minus)]


OFFICIAL_BALANCE_COEF = 0.001  # GuiLoMo/MoLA router_aux_loss_coef, on a balance loss without the xE factor


@register("guilomo")
def guilomo(recipe, shape) -> Allocation:
    from floe_dist.distributed.runtime import discover
    from floe_dist.methods.guilomo import export_allocation, guilomo_search, inject_guided
    from floe_dist.methods.search_data import batch_stream, load_for_search
    from floe_dist.modeling.answer_lm import AnswerLM

    a, al, g = recipe.adapter, recipe.allocate, recipe.allocate.guilomo
    if discover().world_size > 1:
        raise ValueError("the guilomo allocator runs in one process: launch `floe-dist allocate` without "
                         "torchrun/deepspeed (flexora is the data-parallel search)")
    tokenizer, lm, train, _ = load_for_search(recipe, 0)
    torch.manual_seed(al.seed)
    modules = inject_guided(lm, list(range(shape.num_layers)), a.target_list, n_max=g.experts,
                            r_max=g.rank, top_k=a.top_k, alpha=a.alpha, dropout=a.dropout)
    # official: 0.001 x sum over modules of sum_i f_i P_i (MoLA's loss, no xE); our modules' balance loss is
    # E x sum_i f_i P_i (Switch), and every searched module has E = guilomo_experts, so this is the same loss
    model = AnswerLM(lm, balance_coef=OFFICIAL_BALANCE_COEF / g.experts)
    model.train()
    bar = tqdm(total=g.steps, desc=f"guilomo search ({g.order} order)", leave=False)

    def on_step(step: int, loss: float) -> None:
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"guilomo search: loss is {loss} at step {step}; lower allocate.guilomo.lr")
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")

    guilomo_search([m for mods in modules.values() for _, m in mods],
                   batch_stream(train, tokenizer, g.batch, al.seed, recipe.model.max_length), lambda b: model(**b)["loss"],
                   steps=g.steps, order=g.order, lr=g.lr, on_step=on_step)
    bar.close()
    allocation = export_allocation(modules, a.target_list, a.alpha, a.dropout)
    allocation.meta.update(search_steps=g.steps, order=g.order)
    return allocation.with_parameter_count(shape.shapes)
