"""The user's question: is the whole campaign worth its wall time against plain PEFT LoRA given the same time?

    python benchmarks/bench_campaign_vs_peft.py                        # default recipe, seeds 0 1 2 (~45 min, 2 cores)
    python benchmarks/bench_campaign_vs_peft.py --config smollm2-arithmetic --result campaign_vs_peft_arithmetic
    python benchmarks/bench_campaign_vs_peft.py --override --search.min_steps 4 --search.max_steps 12 \
        --result campaign_vs_peft_rungs     # the recipe with other settings, into another result file

Per seed, side by side in one run: (1) the campaign (score + search + train + evaluations; ``--score.seed``,
``--search.seed``, ``--search.trial_seed`` and ``--train.seed`` set to the seed), timed from its start to its summary;
(2) PEFT LoRA through PEFT itself (``get_peft_model``, r=8, alpha 16, dropout 0.05 on q_proj and v_proj of every
layer, AdamW at lr 1e-3 with 10% warm-up and cosine decay, the campaign's global batch, one process with every
core) given the campaign's whole wall time: it loads, then trains until the time left is that of the test
evaluation (which it takes from the campaign's own final evaluation: same model, same examples), on a schedule that
runs on the clock (10% linear warm-up, cosine to zero over the training time; rows measured before this change
planned a step count from a 5-step probe instead), and is scored like the campaign (its ``evaluate_lm``: choice
log-likelihood accuracy on a multiple-choice test split, the generated number on a numeric generative one such as
``smollm2-arithmetic``). Not the same work: the comparison is at equal wall time, which is the point. Result:
benchmarks/results/campaign_vs_peft.json (one row per seed, written as each seed finishes; the table's mean and
spread are over the rows). With ``--peft-packed``, (3): the same PEFT LoRA on packed rows (``data.pack``'s layout,
several examples a row), given the same wall time, to show what packing alone gives a PEFT user. The row also
carries the campaign search's overhead share: 1 - the trials' training-step and validation seconds and the spare
work's (the zero-shot evaluation, when a worker ran it) / (workers x the search stage's wall time).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, stdev

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_campaign import final_run_timing, overhead_share, worker_time  # noqa: E402
from benchmarks.result_file import write_result  # noqa: E402


def campaign(recipe: str, seed: int, overrides: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "campaign"
        start = time.time()
        subprocess.run([sys.executable, "-m", "launcher.cli", "campaign", "--config", recipe, "--output", str(out),
                        *overrides, "--score.seed", str(seed), "--search.seed", str(seed), "--search.trial_seed",
                        str(seed), "--train.seed", str(seed)], cwd=REPO, check=True)
        wall = time.time() - start
        summary = json.loads((out / "campaign.json").read_text())
        steps = json.loads((out / "train" / "train.json").read_text())["steps"]
        search = json.loads((out / "search_stage.json").read_text()) if (out / "search_stage.json").is_file() else {}
        trials = json.loads((out / "search" / "search.json").read_text())["trials"] if search else []
        layers = json.loads(Path(summary["allocation"]).read_text())["layers"]
        module = next(iter(next(iter(layers.values())).values()))  # the rank trained, searched or not
        timing = final_run_timing(out / "train")
    return {"wall_s": wall, "accuracy": summary["final_accuracy"], "zero_shot": summary["zero_shot_accuracy"],
            "trainable_parameters": summary["trainable_parameters"], "train_steps": steps,
            "stage_seconds": summary["stage_seconds"], "searched_allocation": search.get("allocation"),
            "method": summary["method"], "rank": search.get("rank", module["ranks"][0]), "lr": summary["lr"],
            "top_budget_origins": search.get("top_budget_origins"), "incumbent_origin": search.get("incumbent_origin"),
            "candidates": search.get("candidates"),
            "search_trials": len(trials), "steps_reused": summary.get("steps_reused", 0),
            "budget_s": summary.get("budget_seconds"), "not_separated": search.get("not_separated"),
            **timing,
            "search_overhead_share": overhead_share(worker_time(trials, search.get("spare_work", [])),
                                                    search["_seconds"]) if search else None}


def peft_lora(recipe, seed: int, budget_s: float, eval_s: float, packed: bool = False) -> dict:
    """PEFT LoRA r=8 on q,v of every layer, as many steps as fit in ``budget_s`` including its evaluation;
    ``packed``: on the rows ``data.pack`` lays out (several examples each), the campaign's own when it packs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from benchmarks.bench_task_arms import lora_recipe
    from floe_dist.data import load_data, pack, tokenize, train_batch
    from floe_dist.evaluation import evaluate_lm
    from floe_dist.modeling.answer_lm import AnswerLM
    from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model
    from floe_dist.schedule import warmup_cosine

    start = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    r = lora_recipe(recipe, seed)  # the recipe's data settings, as the campaign's training reads them
    model_dir = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(model_dir)
    lm = get_peft_model(load_backbone(model_dir), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                            target_modules=["q_proj", "v_proj"]))
    model = AnswerLM(lm.base_model.model)
    train = load_data(r.data, r.train.split, tokenizer)[: r.data.max_train_examples]
    rows = tokenize(train, tokenizer, r.model.max_length)
    if packed:
        rows = pack(rows, r.model.max_length)
    batch = r.train.micro_batch * r.train.accumulation * recipe.parallel.nproc * recipe.parallel.nodes  # global batch
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    def step(i: int) -> None:
        b = train_batch(rows, step=i, micro=0, rank=0, world=1, micro_batch=batch, accumulation=1, seed=seed,
                        pad_id=tokenizer.pad_token_id)
        model.train()
        model(**b)["loss"].backward()
        opt.step()
        opt.zero_grad()

    # The schedule runs on the clock: floe-dist's warm-up + cosine (10% linear warm-up, then cosine to zero) over
    # the training time left, in thousandths of it, so the run fills its budget however fast its steps turn out
    # to be (steps planned from a short probe ended one run 128 s early).
    factor = warmup_cosine(total_steps=1000, warmup_steps=100, min_ratio=0.0)
    train_s = budget_s - (time.time() - start) - eval_s
    train_start, steps = time.time(), 0
    while (progress := (time.time() - train_start) / train_s) + progress / max(1, steps) < 1:  # one more fits
        for group in opt.param_groups:
            group["lr"] = 1e-3 * factor(int(1000 * progress))
        step(steps)
        steps += 1
    train_end = time.time()
    model.eval()
    scored = evaluate_lm(recipe, lm.base_model.model, tokenizer, torch.device("cpu"))
    return {"wall_s": time.time() - start, "accuracy": scored["accuracy"], "train_steps": steps,
            "step_s": (train_end - train_start) / max(1, steps), "eval_s": time.time() - train_end,
            "trainable_parameters": sum(p.numel() for p in params)}


def main() -> None:
    from floe_dist.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smollm2-sst2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--result", default="campaign_vs_peft", help="benchmarks/results/NAME.json")
    parser.add_argument("--peft-packed", action="store_true",
                        help="also PEFT LoRA on packed rows (data.pack's), given the same wall time: where a packing "
                             "recipe's gain comes from")
    parser.add_argument("--override", nargs=argparse.REMAINDER, default=[],
                        help="last: recipe settings for the campaign, as --section.key value pairs")
    ns = parser.parse_args()
    recipe = load_recipe(ns.config, ns.override)
    rows = []
    for seed in ns.seeds:  # each seed's row is written as soon as it is measured (rows merge by seed)
        ours = campaign(ns.config, seed, ns.override)
        theirs = peft_lora(recipe, seed, ours["wall_s"], ours["stage_seconds"]["final_eval"])
        rows.append({"seed": seed, "recipe": ns.config, "campaign": ours, "peft": theirs})
        if ns.peft_packed:
            rows[-1]["peft_packed"] = peft_lora(recipe, seed, ours["wall_s"], ours["stage_seconds"]["final_eval"],
                                                packed=True)
        packed = rows[-1].get("peft_packed")
        print(f"seed {seed}: campaign {ours['accuracy']:.4f} in {ours['wall_s']:.0f}s ({ours['train_steps']} final "
              f"steps); PEFT LoRA {theirs['accuracy']:.4f} in {theirs['wall_s']:.0f}s ({theirs['train_steps']} steps)"
              + (f"; on packed rows {packed['accuracy']:.4f} ({packed['train_steps']} steps)" if packed else ""),
              flush=True)
        write_result(ns.result, rows[-1:], merge_key="seed", overrides=ns.override)
    acc = {arm: [r[arm]["accuracy"] for r in rows] for arm in ("campaign", "peft")}
    spread = {arm: stdev(v) if len(v) > 1 else 0.0 for arm, v in acc.items()}
    print(f"\n== {ns.config}, {len(rows)} seeds: campaign {100 * mean(acc['campaign']):.1f} ± "
          f"{100 * spread['campaign']:.1f}% vs PEFT LoRA at equal wall time {100 * mean(acc['peft']):.1f} ± "
          f"{100 * spread['peft']:.1f}% ==")


if __name__ == "__main__":
    main()
