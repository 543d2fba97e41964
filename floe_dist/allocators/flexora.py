"""Flexora as an allocator: search alpha on the task (floe_dist/flexora.py), keep alpha > 0 (or top-k).

The search puts plain LoRA (--rank, one expert) on every layer, trains on the training split minus
``flexora_val`` held-out examples (the official code holds out 200 of the training file) and takes
alpha steps on those. The output allocation places the same adapter on the selected layers only.
Runs in one process.
"""
from __future__ import annotations

import itertools

import torch

from floe_dist.allocation import Allocation
from floe_dist.allocators import register
from floe_dist.allocators.baselines import uniform_on


@register("flexora")
def flexora(args, shape) -> Allocation:
    from floe_dist.data import collate, encode, load_task, train_batch
    from floe_dist.flexora import flexora_search, remove_weights
    from floe_dist.modeling.answer_lm import AnswerLM
    from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model
    from floe_dist.modeling.inject import inject_adapters

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    examples = load_task(args.task, "train")
    if len(examples) <= args.flexora_val:
        raise ValueError(f"--flexora-val {args.flexora_val} leaves no training examples ({len(examples)} in all)")
    train, held = examples[: -args.flexora_val], examples[-args.flexora_val:]
    lm = load_backbone(model_dir)
    torch.manual_seed(args.seed)
    adapters = inject_adapters(lm, Allocation.uniform(shape.num_layers, args.target_list, rank=args.rank,
                                                      alpha=args.alpha, dropout=args.dropout))
    model = AnswerLM(lm)
    batches = (train_batch(train, tokenizer, step=s, micro=0, rank=0, world=1, micro_batch=args.flexora_batch,
                           accumulation=1, seed=args.seed, max_length=256) for s in itertools.count())
    n_val = 8  # validation micro-batches of one example per alpha step, as in the official code
    step = itertools.count()

    def val_batches() -> list[dict]:
        start = next(step) * n_val
        picked = [held[(start + j) % len(held)] for j in range(n_val)]
        return [collate([encode(tokenizer, e.prompt, e.choices[e.label], 256)], tokenizer.pad_token_id)
                for e in picked]

    weights = flexora_search(model, adapters, batches, val_batches, lambda b: model(**b)["ce"],
                             steps=args.flexora_steps, lr_model=args.flexora_lr, lr_alpha=0.01)
    kept = weights.selected(args.k)
    remove_weights(adapters)
    if not kept:
        raise ValueError("Flexora selected no layer (every alpha <= 0): pass --k to keep the top-k instead")
    allocation = uniform_on(kept, args, shape, "flexora")
    allocation.meta["alpha"] = dict(zip(map(str, weights.layers), weights.alpha.tolist()))
    return allocation
