"""Where the training step's time goes against PEFT's: the same LoRA through PEFT's loop and through floe-dist's
trainer, and the recipe's LoRA-MoE, side by side in one process.

    python benchmarks/bench_train_step.py --rounds 8            # smollm2-arithmetic, 8 rounds of 20 steps (~4 min)

Arms, each built once, then timed in alternating blocks of ``--steps`` optimizer steps (``--rounds`` blocks each,
the block order rotated every round), on the same batches (``train_batch``, the recipe's micro-batch in one
process), every core:
- ``peft``: PEFT LoRA (``get_peft_model``, r=8, alpha 16, dropout 0.05 on q_proj, v_proj of every layer), AdamW
  at 1e-3, forward, backward and ``opt.step()`` with nothing else (bench_campaign_vs_peft.py's loop).
- ``floe-dist lora``: the same adapter through ``Trainer.step`` (the DeepSpeed engine at ZeRO-0: gradient clipping,
  the finite-loss check, the loss statistics), the backbone as ``floe-dist train`` loads it.
- ``floe-dist lora, released linears``: the same, its frozen linears through ``FrozenLinearFunction``: the ZeRO-3
  backward, which every layout used before it was kept to ZeRO-3.
- ``floe-dist lora-moe``: the recipe's own adapter (4 dense experts of rank 4 on q, v of every layer).
Same layers and targets in every arm; the LoRA-MoE arm has other parameters (645,120 against 460,800).
Result: benchmarks/results/train_step.json (one row per arm: seconds per step, mean and spread over the rounds).
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import mean, stdev

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402


def peft_arm(recipe):
    """PEFT's loop as bench_campaign_vs_peft trains it: a function that runs optimizer step ``i``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from benchmarks.bench_task_arms import lora_recipe
    from floe_dist.data import load_data, tokenize, train_batch
    from floe_dist.modeling.answer_lm import AnswerLM
    from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model

    r = lora_recipe(recipe, 0)
    model_dir = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(model_dir)
    lm = get_peft_model(load_backbone(model_dir), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                            target_modules=["q_proj", "v_proj"]))
    model = AnswerLM(lm.base_model.model).train()
    rows = tokenize(load_data(r.data, r.train.split, tokenizer)[: r.data.max_train_examples], tokenizer,
                    r.model.max_length)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)

    def step(i: int) -> None:
        batch = train_batch(rows, step=i, micro=0, rank=0, world=1, micro_batch=r.train.micro_batch, accumulation=1,
                            seed=0, pad_id=tokenizer.pad_token_id)
        model(**batch)["loss"].backward()
        opt.step()
        opt.zero_grad()

    return step, sum(p.numel() for p in lm.parameters() if p.requires_grad)


def trainer_arm(recipe, release: bool = False):
    """``Trainer.step`` on ``recipe``'s adapter; ``release``: its frozen linears through the ZeRO-3 backward."""
    from floe_dist.modeling.frozen_linear import release_frozen_weights
    from floe_dist.trainer import Trainer

    out = tempfile.mkdtemp(prefix="train_step_")  # the run's settings files; nothing is saved there
    atexit.register(shutil.rmtree, out, True)
    trainer = Trainer(replace(recipe, train=replace(recipe.train, steps=10 ** 6, checkpoint_every=0)), out)
    if release:
        release_frozen_weights(trainer.lm)  # the base linears inside the adapters are frozen nn.Linear too
    return trainer.step, trainer.allocation.trainable_parameters


def main() -> None:
    import torch

    from benchmarks.bench_task_arms import lora_recipe
    from floe_dist.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smollm2-arithmetic")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--result", default="train_step", help="benchmarks/results/NAME.json")
    ns = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe(ns.config, [])
    lora = replace(lora_recipe(recipe, 0), train=replace(recipe.train, lr=1e-3, seed=0))
    moe = replace(recipe, allocate=replace(recipe.allocate, file=None), train=replace(recipe.train, seed=0))
    arms = {"peft": peft_arm(recipe), "floe-dist lora": trainer_arm(lora),
            "floe-dist lora, released linears": trainer_arm(lora, release=True), "floe-dist lora-moe": trainer_arm(moe)}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    done = dict.fromkeys(arms, 0)
    for name, (step, _) in arms.items():  # one untimed step each: first-call caches
        step(0)
        done[name] = 1
    names = list(arms)
    for k in range(ns.rounds):
        for name in names[k % len(names):] + names[: k % len(names)]:
            step = arms[name][0]
            start = time.perf_counter()
            for _ in range(ns.steps):
                step(done[name])
                done[name] += 1
            seconds[name].append((time.perf_counter() - start) / ns.steps)
    base = mean(seconds["peft"])
    rows = [{"arm": name, "seconds_per_step": mean(s), "spread": stdev(s) if len(s) > 1 else 0.0,
             "per_round": s, "vs_peft": mean(s) / base, "trainable_parameters": arms[name][1],
             "steps": ns.steps, "rounds": ns.rounds, "recipe": ns.config} for name, s in seconds.items()]
    for row in rows:
        print(f"{row['arm']:<34} {row['seconds_per_step']:.4f} s/step ± {row['spread']:.4f}  "
              f"{row['vs_peft']:.3f}x PEFT's")
    write_result(ns.result, rows)


if __name__ == "__main__":
    main()
