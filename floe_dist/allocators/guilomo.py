"""GuiLoMo as an allocator: GSV search on the task (floe_dist/guilomo.py), then export per-module expert
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
  * see floe_dist/guilomo.py for the retrained module's per-expert scaling (the official code's leaked
    loop variable is fixed).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from floe_dist.allocation import Allocation
from floe_dist.allocators import register

OFFICIAL_BALANCE_COEF = 0.001  # GuiLoMo/MoLA router_aux_loss_coef, on a balance loss without the xE factor


@register("guilomo")
def guilomo(args, shape) -> Allocation:
    from floe_dist.allocators.search_data import batch_stream, load_for_search
    from floe_dist.distributed.runtime import discover
    from floe_dist.guilomo import export_allocation, guilomo_search, inject_guided
    from floe_dist.modeling.answer_lm import AnswerLM

    if discover().world_size > 1:
        raise ValueError("the guilomo allocator runs in one process: launch `floe-dist allocate` without "
                         "torchrun/deepspeed (flexora is the data-parallel search)")
    tokenizer, lm, train, _ = load_for_search(args, 0)
    torch.manual_seed(args.seed)
    modules = inject_guided(lm, list(range(shape.num_layers)), args.target_list, n_max=args.guilomo_experts,
                            r_max=args.guilomo_rank, top_k=2, alpha=args.alpha, dropout=args.dropout)
    # official: 0.001 x sum over modules of sum_i f_i P_i (MoLA's loss, no xE); our modules' balance loss is
    # E x sum_i f_i P_i (Switch), and every searched module has E = guilomo_experts, so this is the same loss
    model = AnswerLM(lm, balance_coef=OFFICIAL_BALANCE_COEF / args.guilomo_experts)
    model.train()
    bar = tqdm(total=args.guilomo_steps, desc=f"guilomo search ({args.guilomo_order} order)", leave=False)

    def on_step(step: int, loss: float) -> None:
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"guilomo search: loss is {loss} at step {step}; lower --guilomo-lr")
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")

    guilomo_search([m for mods in modules.values() for _, m in mods],
                   batch_stream(train, tokenizer, args.guilomo_batch, args.seed), lambda b: model(**b)["loss"],
                   steps=args.guilomo_steps, order=args.guilomo_order, lr=args.guilomo_lr, on_step=on_step)
    bar.close()
    allocation = export_allocation(modules, args.target_list, args.alpha, args.dropout)
    allocation.meta.update(search_steps=args.guilomo_steps, order=args.guilomo_order)
    return allocation.with_parameter_count(shape.shapes)
