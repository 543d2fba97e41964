"""Generation throughput of an NF4 Llama with LoRA-MoE adapters, beside the bare base and PEFT LoRA.

    python benchmarks/gpu_generate.py                                  # llama3-8b, batch 1 and 32 (GPU)
    python benchmarks/gpu_generate.py --shape tiny --new-tokens 8 --batches 1,4   # CPU smoke run

Random weights of a built-in shape with NF4 decoder linears (gpu_throughput.build_backbone), then a
variant's adapters (gpu_throughput.add_adapters) with B made non-zero, in eval mode:

* ``base``: no adapter; ``moe``: floe-dist LoRA-MoE, 4 experts of rank 16, top-2, on all seven linears
  of every 4th layer, router compiled (fuse_router=True); ``moe-eager``: the same adapters, router op by op;
* ``peft-quarter``: PEFT LoRA of rank 64 on the same layers and targets (the user's alternative).

Greedy decoding with the KV cache, as floe_dist.generation.generate calls it, from random prompt tokens,
every sequence forced to --new-tokens (``min_new_tokens``). tokens/s = batch x new tokens / the wall
time of ``generate``, median of --reps after one warm-up call (which also compiles the fused router).
Each adapter family runs in its own process (base, moe and moe-eager share one). Writes
benchmarks/results/gpu_generate.json on a GPU (a renderer in benchmarks/report.py is to be added
with its table).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_throughput import SHAPES, add_adapters, build_backbone, run_child  # noqa: E402
from benchmarks.result_file import write_result  # noqa: E402

GROUPS = {"moe": ("base", "moe", "moe-eager"), "peft-quarter": ("peft-quarter",)}


def tokens_per_second(model, batch: int, args, device) -> dict:
    import torch

    gen = torch.Generator(device=device).manual_seed(batch)
    prompt = torch.randint(model.config.vocab_size, (batch, args.prompt_tokens), device=device, generator=gen)
    times = []
    for i in range(1 + args.reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True,
                             pad_token_id=0, temperature=None, top_p=None, top_k=None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    new = out.shape[1] - args.prompt_tokens
    if new != args.new_tokens:
        raise RuntimeError(f"generated {new} tokens, asked for {args.new_tokens}")
    wall = statistics.median(times)
    return {"batch": batch, "seconds": wall, "tokens_per_s": batch * new / wall, "seconds_all": times}


def run_group(args) -> list[dict]:
    """The variants of one group in this process: one backbone, adapters added after the base is timed."""
    import torch

    from floe_dist.modeling.inject import adapter_modules

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_backbone(args.shape, device)
    model.config.use_cache = True
    model.eval()
    rows = []
    for variant in GROUPS[args.group]:
        if variant == "base":
            timed = model
        elif variant in ("moe", "peft-quarter"):
            timed = add_adapters(model, variant)[0].eval()
            with torch.no_grad():  # B = 0 (init) would make the adapters' output vanish, not their cost
                for name, p in timed.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.02)
        else:  # moe-eager: the moe adapters already in place, router op by op
            for adapter in adapter_modules(timed).values():
                adapter.fuse_router = False
        if variant == "moe":  # the compiled router (opt-in in the product until tests/gpu passes with it)
            for adapter in adapter_modules(timed).values():
                adapter.fuse_router = True
        for batch in map(int, args.batches.split(",")):
            rows.append({"shape": args.shape, "variant": variant, "prompt_tokens": args.prompt_tokens,
                         "new_tokens": args.new_tokens, **tokens_per_second(timed, batch, args, device),
                         "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
            print(f"{variant} batch {batch}: {rows[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8b", help=f"one of {sorted(SHAPES)}")
    parser.add_argument("--groups", default="moe,peft-quarter", help=f"comma-separated, of {sorted(GROUPS)}")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per group's process")
    parser.add_argument("--call", type=int, default=1, help="label of this run in the result file")
    parser.add_argument("--group", help=argparse.SUPPRESS)
    args = parser.parse_args()
    bad = [g for g in args.groups.split(",") if g not in GROUPS] + ([] if args.shape in SHAPES else [args.shape])
    if bad:
        parser.error(f"unknown group or shape {bad}: groups {sorted(GROUPS)}, shapes {sorted(SHAPES)}")
    args.shape = SHAPES[args.shape]
    if args.group:
        print("RESULT " + json.dumps(run_group(args)), flush=True)
        return
    rows = []
    for group in args.groups.split(","):
        found, out = run_child([sys.executable, __file__, "--group", group, *sys.argv[1:]], args.timeout)
        if found is None:
            print(f"{group}: FAILED\n{out[-3000:]}", flush=True)
            continue
        rows += [{"call": args.call, **r} for r in found]
        base = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == "base"}
        for r in rows:
            r["vs_base"] = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else None
        # after every group, not once at the end: a run stopped at its time limit keeps what it measured
        if rows and all(r["device"] != "cpu" for r in rows):  # a CPU smoke run writes nothing
            write_result("gpu_generate", rows, merge_key="call")
    for r in rows:
        print(f"{r['variant']:>12} batch {r['batch']:>3}: {r['tokens_per_s']:10.1f} tokens/s "
              f"({r['vs_base'] or float('nan'):.2f} x base)")


if __name__ == "__main__":
    main()
