"""Flexora (Wei et al., ACL 2025): layer selection as hyper-parameter optimisation, by unrolled
differentiation in its first-order, alternating form (methods.md §3).

Each adapted layer l gets a hyper-parameter alpha_l (init 0); its adapter output is scaled by
alpha_hat_l = L * softmax(alpha)_l, once, through the LoRA-MoE ``adapter_scale`` hook. At init every
alpha_hat is 1, so the model is exactly plain LoRA. Every step:

1. LoRA step on a training batch with alpha_hat *detached* (AdamW on the adapters);
2. alpha step: eval mode, alpha_hat attached, the gradient of the validation loss summed over
   ``n_val`` held-out batches w.r.t. alpha only (no gradient reaches the adapters), one Adam step.

Selection: layers with alpha > 0 (the official code's rule), or the top-k by alpha.
Matches the official code: alpha init 0, Adam lr 0.01 on alpha, 8 validation micro-batches of one
example per alpha step, 200 held-out training examples, q_proj/v_proj at r=8, alpha 16.
Deviations from it (the allocator below sets the first three):
  * search length ``--flexora-steps`` (default 50) alternating steps, not one epoch (~600 steps of 8);
  * LoRA steps at a constant ``--flexora-lr`` (default 1e-3), not 1e-4 with a cosine schedule: 10x the
    rate for 1/12 of the steps, so the adapters move in the short search;
  * one batch of 8 examples per LoRA step, not 8 micro-batches of 1 accumulated (the same mean
    gradient but for padding), examples cut at ``model.max_length`` tokens (256 by default), not 1024;
  * the scale is applied once (the code's pre-hooks on three LoRA sub-modules give alpha_hat^3), and never
    to the frozen base output.
With data parallelism each rank takes its share of every training batch and of the validation batches:
pass ``all_reduce_mean`` (adapter gradients, a mean over the batch) and ``all_reduce_sum`` (the alpha
gradient of the summed validation loss), and N ranks take the steps one process would.

As an allocator (``floe-dist allocate --method flexora``): search alpha on the task, keep alpha > 0 (or top-k).

The search puts plain LoRA (--rank, one expert) on every layer, trains on the training split minus
``flexora_val`` held-out examples (the official code holds out 200 of the training file) and takes
alpha steps on those. The output allocation places the same adapter on the selected layers only.
Runs in one process, or data-parallel under torchrun/deepspeed/srun (``floe-dist allocate`` as the
launched command): each rank takes its share of every batch, gradients are all-reduced, the N-rank
search equals the 1-process one, and rank 0 writes the file.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch

from floe_dist.allocation import Allocation
from floe_dist.methods import register
from floe_dist.methods.baselines import uniform_on
from floe_dist.modeling.lora_moe import LoRAMoELinear


class LayerWeights:
    """alpha (L,) and alpha_hat = L * softmax(alpha), wired into every adapter of each layer."""

    def __init__(self, adapters_by_layer: dict[int, list[LoRAMoELinear]], device: torch.device | str = "cpu"):
        self.layers = sorted(adapters_by_layer)
        self.alpha = torch.zeros(len(self.layers), device=device, requires_grad=True)
        self.detached = True
        for i, layer in enumerate(self.layers):
            for module in adapters_by_layer[layer]:
                module.adapter_scale = lambda i=i: self._scale()[i]

    def alpha_hat(self) -> torch.Tensor:
        return len(self.layers) * torch.softmax(self.alpha, dim=0)

    def _scale(self) -> torch.Tensor:
        hat = self.alpha_hat()
        return hat.detach() if self.detached else hat

    def selected(self, k: int | None = None) -> list[int]:
        """Layers with alpha > 0, or the k largest alphas."""
        a = self.alpha.detach().cpu()
        if k is None:
            return [l for l, v in zip(self.layers, a.tolist()) if v > 0]
        order = sorted(range(len(a)), key=lambda i: (-float(a[i]), i))[:k]
        return sorted(self.layers[i] for i in order)


def flexora_search(model: torch.nn.Module, adapters_by_layer: dict[int, list[LoRAMoELinear]],
                   train_batches: Iterator[dict], val_batches: Callable[[], list[dict]],
                   loss_fn: Callable[[dict], torch.Tensor], steps: int, lr_model: float = 1e-4,
                   lr_alpha: float = 0.01, all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                   all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                   device: torch.device | str = "cpu") -> LayerWeights:
    """Run the alternating search; ``val_batches()`` returns the n_val batches of one alpha step."""
    weights = LayerWeights(adapters_by_layer, device)
    theta = [p for mods in adapters_by_layer.values() for m in mods for p in m.adapter_parameters()]
    opt_theta = torch.optim.AdamW(theta, lr=lr_model, weight_decay=0.0)
    opt_alpha = torch.optim.Adam([weights.alpha], lr=lr_alpha)
    for _ in range(steps):
        model.train()
        weights.detached = True
        opt_theta.zero_grad(set_to_none=True)
        loss_fn(next(train_batches)).backward()
        for p in theta:
            if p.grad is not None:
                p.grad = all_reduce_mean(p.grad)
        opt_theta.step()

        model.eval()
        weights.detached = False
        val_loss = sum((loss_fn(b) for b in val_batches()), weights.alpha.new_zeros(()))
        # alpha only: theta's .grad is untouched (a rank with no validation batch contributes zeros)
        grad = (torch.autograd.grad(val_loss, [weights.alpha])[0] if val_loss.requires_grad
                else torch.zeros_like(weights.alpha))
        weights.alpha.grad = all_reduce_sum(grad)
        opt_alpha.step()
        opt_alpha.zero_grad(set_to_none=True)
    weights.detached = True
    return weights


def remove_weights(adapters_by_layer: dict[int, list[LoRAMoELinear]]) -> None:
    for mods in adapters_by_layer.values():
        for m in mods:
            m.adapter_scale = None


@register("flexora")
def flexora(recipe, shape) -> Allocation:
    from floe_dist.data import collate, encode
    from floe_dist.distributed.runtime import all_reduce_sum, device_for, discover, init_distributed
    from floe_dist.methods.flexora import flexora_search, remove_weights
    from floe_dist.methods.search_data import batch_stream, load_for_search
    from floe_dist.modeling.answer_lm import AnswerLM
    from floe_dist.modeling.inject import inject_adapters

    a, al, f = recipe.adapter, recipe.allocate, recipe.allocate.flexora
    info = init_distributed() if discover().world_size > 1 else discover()
    device = device_for(info)
    tokenizer, lm, train, held = load_for_search(recipe, f.val, device)
    torch.manual_seed(al.seed)
    adapters = inject_adapters(lm, Allocation.uniform(shape.num_layers, a.target_list, rank=a.rank,
                                                      alpha=a.alpha, dropout=a.dropout))
    model = AnswerLM(lm)
    batches = batch_stream(train, tokenizer, f.batch, al.seed, recipe.model.max_length, info.rank, info.world_size,
                           device)
    n_val = 8  # validation micro-batches of one example per alpha step, as in the official code
    step = itertools.count()

    def val_batches() -> list[dict]:
        """This rank's share (every world_size-th) of the step's n_val one-example batches."""
        start = next(step) * n_val
        picked = [held[(start + j) % len(held)] for j in range(info.rank, n_val, info.world_size)]
        return [{k: v.to(device) for k, v in collate([encode(tokenizer, e.prompt, e.choices[e.label], recipe.model.max_length)],
                                                      tokenizer.pad_token_id).items()} for e in picked]

    weights = flexora_search(model, adapters, batches, val_batches, lambda b: model(**b)["ce"],
                             steps=f.steps, lr_model=f.lr, lr_alpha=0.01,
                             all_reduce_mean=lambda t: all_reduce_sum(t) / info.world_size,
                             all_reduce_sum=all_reduce_sum, device=device)
    kept = weights.selected(al.k)
    remove_weights(adapters)
    if not kept:
        raise ValueError("Flexora selected no layer (every alpha <= 0): set allocate.k (--k) to keep the top-k instead")
    allocation = uniform_on(kept, recipe, shape, "flexora")
    allocation.meta["alpha"] = dict(zip(map(str, weights.layers), weights.alpha.tolist()))
    return allocation
