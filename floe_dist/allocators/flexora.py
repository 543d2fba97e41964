"""Flexora as an allocator: search alpha on the task (floe_dist/flexora.py), keep alpha > 0 (or top-k).

The search puts plain LoRA (--rank, one expert) on every layer, trains on the training split minus
``flexora_val`` held-out examples (the official code holds out 200 of the training file) and takes
alpha steps on those. The output allocation places the same adapter on the selected layers only.
Runs in one process, or data-parallel under torchrun/deepspeed/srun (``floe-dist allocate`` as the
launched command): each rank takes its share of every batch, gradients are all-reduced, the N-rank
search equals the 1-process one, and rank 0 writes the file.
"""
from __future__ import annotations

import itertools

import torch

from floe_dist.allocation import Allocation
from floe_dist.allocators import register
from floe_dist.allocators.baselines import uniform_on


@register("flexora")
def flexora(args, shape) -> Allocation:
    from floe_dist.allocators.search_data import batch_stream, load_for_search
    from floe_dist.data import collate, encode
    from floe_dist.distributed.runtime import all_reduce_sum, device_for, discover, init_distributed
    from floe_dist.flexora import flexora_search, remove_weights
    from floe_dist.modeling.answer_lm import AnswerLM
    from floe_dist.modeling.inject import inject_adapters

    info = init_distributed() if discover().world_size > 1 else discover()
    device = device_for(info)
    tokenizer, lm, train, held = load_for_search(args, args.flexora_val, device)
    torch.manual_seed(args.seed)
    adapters = inject_adapters(lm, Allocation.uniform(shape.num_layers, args.target_list, rank=args.rank,
                                                      alpha=args.alpha, dropout=args.dropout))
    model = AnswerLM(lm)
    batches = batch_stream(train, tokenizer, args.flexora_batch, args.seed, info.rank, info.world_size, device)
    n_val = 8  # validation micro-batches of one example per alpha step, as in the official code
    step = itertools.count()

    def val_batches() -> list[dict]:
        """This rank's share (every world_size-th) of the step's n_val one-example batches."""
        start = next(step) * n_val
        picked = [held[(start + j) % len(held)] for j in range(info.rank, n_val, info.world_size)]
        return [{k: v.to(device) for k, v in collate([encode(tokenizer, e.prompt, e.choices[e.label], 256)],
                                                      tokenizer.pad_token_id).items()} for e in picked]

    weights = flexora_search(model, adapters, batches, val_batches, lambda b: model(**b)["ce"],
                             steps=args.flexora_steps, lr_model=args.flexora_lr, lr_alpha=0.01,
                             all_reduce_mean=lambda t: all_reduce_sum(t) / info.world_size,
                             all_reduce_sum=all_reduce_sum, device=device)
    kept = weights.selected(args.k)
    remove_weights(adapters)
    if not kept:
        raise ValueError("Flexora selected no layer (every alpha <= 0): pass --k to keep the top-k instead")
    allocation = uniform_on(kept, args, shape, "flexora")
    allocation.meta["alpha"] = dict(zip(map(str, weights.layers), weights.alpha.tolist()))
    return allocation
