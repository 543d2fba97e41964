"""What a user gets per task from each way of adapting the model: zero-shot, PEFT LoRA, floe-dist's uniform LoRA,
and the whole floe-dist campaign, seed by seed.

    python benchmarks/bench_task_arms.py --config smollm2-arithmetic --seeds 0 1 2   # generative (~15 min a seed)
    python benchmarks/bench_task_arms.py --config smollm2-sst2 --seeds 0 1 2         # multiple choice

Arms, side by side in one run, all scored by the campaign's own evaluation (``evaluate_lm`` with the recipe's
evaluate settings: choice log-likelihood accuracy, or greedy generation scored by its number on numeric tasks):
- ``zero_shot``: the base model (the campaign's zero-shot stage).
- ``peft``: what a user would run instead, through PEFT itself: ``get_peft_model`` with LoRA r=8, alpha 16,
  dropout 0.05 on q_proj and v_proj of every layer; AdamW at lr 1e-3 with floe-dist's schedule (10% linear
  warm-up, cosine to a tenth); the recipe's training steps and global batch (micro-batch x ranks) on the same
  batches (``train_batch`` draws the same examples for 1 rank as for N); one process with every core.
- ``uniform``: the same adapter, data and optimiser settings through ``floe-dist train`` (ZeRO-3 on the recipe's
  ranks) and ``floe-dist evaluate``: same work as ``peft``, so their scores should agree and their times compare
  the engines.
- ``campaign``: ``floe-dist campaign`` with the recipe (score + search + train), seeded with the seed.
Wall time per arm includes loading, training and the final evaluation (the campaign's also its zero-shot
evaluation, scoring and search). Result: benchmarks/results/task_arms.json, one row per recipe and seed, written as
each seed finishes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import mean, stdev

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_campaign_vs_peft import campaign  # noqa: E402
from benchmarks.result_file import write_result  # noqa: E402

LORA = {"targets": "q_proj,v_proj", "experts": 1, "rank": 8, "alpha": 16.0, "dropout": 0.05, "lr": 1e-3}


def lora_recipe(recipe, seed: int, lora: dict = LORA):
    """The recipe with plain LoRA (``lora``: r=8 on q,v of every layer at lr 1e-3) and no allocation file, at
    ``seed``."""
    a = lora
    adapter = replace(recipe.adapter, targets=a["targets"], experts=a["experts"], rank=a["rank"], alpha=a["alpha"],
                      dropout=a["dropout"], router="topk", top_k=1, top_p=0.0)
    return replace(recipe, adapter=adapter, train=replace(recipe.train, lr=a["lr"], seed=seed),
                   allocate=replace(recipe.allocate, file=None))


def peft_lora(recipe, seed: int, lora: dict = LORA) -> dict:
    """PEFT LoRA (``lora``: r=8 on q,v of every layer at lr 1e-3) for the recipe's steps, on its rows (packed where
    it packs, as floe-dist's training reads them), evaluated like the campaign."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.optim.lr_scheduler import LambdaLR

    from floe_dist.data import load_data, pack, tokenize, train_batch
    from floe_dist.evaluation import evaluate_lm
    from floe_dist.modeling.answer_lm import AnswerLM
    from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model
    from floe_dist.schedule import warmup_cosine

    start = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    r = lora_recipe(recipe, seed, lora)
    model_dir = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(model_dir)
    lm = get_peft_model(load_backbone(model_dir), LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                                                            lora_dropout=lora["dropout"],
                                                            target_modules=lora["targets"].split(",")))
    model = AnswerLM(lm.base_model.model)
    train = load_data(r.data, r.train.split, tokenizer)[: r.data.max_train_examples]
    rows = tokenize(train, tokenizer, r.model.max_length)
    if r.data.pack:  # the rows the campaign's training reads when its recipe packs
        rows = pack(rows, r.model.max_length)
    batch = r.train.micro_batch * r.train.accumulation * recipe.parallel.nproc * recipe.parallel.nodes
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lora["lr"], weight_decay=r.train.weight_decay)
    schedule = LambdaLR(opt, warmup_cosine(r.train.steps, max(1, round(r.train.warmup_ratio * r.train.steps))))
    model.train()
    for step in range(r.train.steps):
        b = train_batch(rows, step=step, micro=0, rank=0, world=1, micro_batch=batch, accumulation=1, seed=seed,
                        pad_id=tokenizer.pad_token_id)
        model(**b)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as zero_configs/zero3.json clips
        opt.step()
        schedule.step()
        opt.zero_grad()
    model.eval()
    train_s = time.time() - start
    result = evaluate_lm(recipe, lm.base_model.model, tokenizer, torch.device("cpu"))
    return {"wall_s": time.time() - start, "train_s": train_s, "accuracy": result["accuracy"],
            "train_steps": r.train.steps, "trainable_parameters": sum(p.numel() for p in params)}


def floe_uniform(recipe, seed: int) -> dict:
    """The same LoRA through ``floe-dist train`` on the recipe's ranks, then ``floe-dist evaluate``."""
    from floe_dist.distributed.runtime import free_port
    from floe_dist.evaluation import evaluate
    from floe_dist.recipe import write_recipe

    with tempfile.TemporaryDirectory() as tmp:
        r, out = lora_recipe(recipe, seed), Path(tmp) / "train"
        nproc = recipe.parallel.nproc * recipe.parallel.nodes
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "launcher.cli", "train",
                   "--config", str(write_recipe(out, r)), "--output", str(out)]
        start = time.time()
        subprocess.run(command, cwd=REPO, env=env, check=True)
        train_s = time.time() - start
        trained = json.loads((out / "train.json").read_text())
        result = evaluate(replace(r, model=replace(r.model, adapter=str(out / "adapter"))))
    return {"wall_s": time.time() - start, "train_s": train_s, "accuracy": result["accuracy"],
            "train_steps": trained["steps"], "trainable_parameters": trained["trainable_parameters"]}


def summary(rows: list[dict], recipe: str) -> str:
    lines = [f"== {recipe}, {len(rows)} seed(s): accuracy mean ± std (wall s) =="]
    for arm in ("zero_shot", "peft", "uniform", "campaign"):
        acc = [r[arm]["accuracy"] for r in rows]
        wall = [r[arm].get("wall_s", 0.0) for r in rows]
        spread = stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"  {arm:10s} {100 * mean(acc):5.1f} ± {100 * spread:4.1f}%  ({mean(wall):.0f} s)")
    return "\n".join(lines)


def main() -> None:
    from floe_dist.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smollm2-arithmetic")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ns = parser.parse_args()
    recipe = load_recipe(ns.config)
    rows = []
    for seed in ns.seeds:
        theirs = peft_lora(recipe, seed)
        ours = floe_uniform(recipe, seed)
        full = campaign(ns.config, seed)
        row = {"key": f"{ns.config}/seed{seed}", "recipe": ns.config, "task": recipe.data.task, "seed": seed,
               "zero_shot": {"accuracy": full["zero_shot"], "wall_s": full["stage_seconds"]["zero_shot"]},
               "peft": theirs, "uniform": ours,
               "campaign": {k: full[k] for k in ("wall_s", "accuracy", "trainable_parameters", "train_steps",
                                                 "searched_allocation", "rank", "lr", "stage_seconds")}}
        rows.append(row)
        write_result("task_arms", [row], merge_key="key")
        print(summary(rows, ns.config), flush=True)


if __name__ == "__main__":
    main()
