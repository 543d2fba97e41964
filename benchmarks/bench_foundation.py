"""Foundation benchmark, measured side by side in one run on the same model and data.

1. Train-step time (forward + backward + AdamW, one process, batch 8 of SST-2) of our LoRA-MoE
   (E=4 experts of rank 2, top-2, on q_proj/v_proj of every layer) over PEFT LoRA on the same layers
   and targets at matched trainable parameters (PEFT r=10: within 5%). Rounds alternate between the arms so that machine
   noise hits both equally; the ratio of medians is printed. Goal: <= 1.2.
2. Backbone memory, NF4 4-bit over fp32 (``get_memory_footprint``). Goal: <= 0.35.

    python benchmarks/bench_foundation.py [--model smollm2-135m] [--rounds 4] [--steps 3]

Writes benchmarks/results/foundation.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.result_file import write_result  # noqa: E402
from floe_dist.allocation import Allocation
from floe_dist.data import collate, encode, load_task
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model
from floe_dist.modeling.inject import inject_adapters


def build_arms(model_dir, n_layers):
    from peft import LoraConfig, get_peft_model

    ours = load_backbone(model_dir)
    alloc = Allocation.uniform(n_layers, ["q_proj", "v_proj"], experts=4, rank=2, top_k=2)
    inject_adapters(ours, alloc)
    peft = get_peft_model(load_backbone(model_dir), LoraConfig(r=10, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                               lora_dropout=0.0))
    arms = {"lora-moe E=4 r=2 top-2": AnswerLM(ours, balance_coef=0.01), "peft lora r=10": AnswerLM(peft.base_model.model)}
    return {name: (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)) for name, m in arms.items()}


def step_seconds(model, opt, batch, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(**batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    examples = load_task("sst2", "train")[: args.batch]
    batch = collate([encode(tok, e.prompt, e.choices[e.label], 256) for e in examples], tok.pad_token_id)
    n_layers = load_backbone(model_dir).config.num_hidden_layers
    arms = build_arms(model_dir, n_layers)
    params = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, (m, _) in arms.items()}
    for m, opt in arms.values():
        step_seconds(m, opt, batch, 1)  # warm-up
    times = {n: [] for n in arms}
    for _ in range(args.rounds):
        for name, (m, opt) in arms.items():
            times[name] += step_seconds(m, opt, batch, args.steps)
    med = {n: statistics.median(t) for n, t in times.items()}
    ours, peft = list(arms)
    print(f"# {args.model}, batch {args.batch} x {batch['input_ids'].shape[1]} tokens, torch threads "
          f"{torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps per arm")
    for n in arms:
        print(f"{n:<24} trainable {params[n]:>9,}   median step {med[n]:.3f} s")
    print(f"parameter ratio ours/peft        {params[ours] / params[peft]:.3f}")
    print(f"step-time ratio ours/peft        {med[ours] / med[peft]:.3f}   (goal <= 1.2)")

    del arms
    fp32 = load_backbone(model_dir).get_memory_footprint()
    nf4 = load_backbone(model_dir, "nf4").get_memory_footprint()
    print(f"backbone memory fp32 {fp32 / 2**20:.1f} MiB, nf4 {nf4 / 2**20:.1f} MiB, ratio {nf4 / fp32:.3f}   (goal <= 0.35)")
    rows = [{"arm": n, "trainable": params[n], "median_step_s": med[n], "steps_s": times[n]} for n in times]
    write_result("foundation", rows, model=args.model, batch=args.batch, tokens=batch["input_ids"].shape[1],
                 threads=torch.get_num_threads(), step_ratio=med[ours] / med[peft],
                 backbone_mib={"fp32": fp32 / 2**20, "nf4": nf4 / 2**20}, memory_ratio=nf4 / fp32)


if __name__ == "__main__":
    main()
