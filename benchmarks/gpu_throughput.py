"""4-bit LoRA-MoE vs PEFT LoRA under ZeRO-3 on one GPU: tokens/s, MFU, peak memory, and the plan.

    python benchmarks/gpu_throughput.py                       # llama3.2-1b, llama3.2-3b, llama3-8b
    python benchmarks/gpu_throughput.py --shapes tiny --steps 2 --seq-len 64   # CPU smoke run

Each (shape, variant) runs in its own process (clean ZeRO-3 state, separate memory peaks): a Llama
built from its public shape with random weights (no hub access), decoder linears quantized to NF4
(bf16 compute and storage, floe_dist.modeling.backbone.quantize_nf4_), gradient checkpointing, a
full-sequence causal-LM loss on random tokens, DeepSpeed ZeRO-3 (zero_configs/zero3.json) over the
adapter parameters. Variants at matched trainable parameters:

* ``peft``: PEFT LoRA r=16 on all seven linears of every layer (the QLoRA recipe);
* ``moe``: floe-dist LoRA-MoE, 4 experts of rank 16, top-2, on the same linears of a quarter of the
  layers (every 4th; it includes layer 0, so backward runs through the whole model: a FLoE-selected
  quarter costs at most this, less when it leaves out the first layers);
* ``moe-sync``: ``moe`` with the balance loss as it was before this benchmark (a host copy that
  synchronised the CUDA stream in every MoE layer), for the before/after ratio.

MFU counts 6 N FLOP per token, N = all backbone parameters (forward + backward of the frozen model,
not the recomputation), over the bf16 dense peak given by --peak-tflops (989: H100/H200 SXM datasheet).
Memory: torch.cuda.max_memory_allocated over the timed steps, and the process's device peak (peak
reserved + CUDA context); the plan (floe_dist.plan) predicts the latter.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {"1b": "llama3.2-1b", "3b": "llama3.2-3b", "8b": "llama3-8b", "tiny": "tiny"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_RANK, MOE_EXPERTS, MOE_RANK, MOE_TOP_K = 16, 4, 16, 2
VARIANTS = ("peft", "moe", "moe-sync")


def moe_layers(num_layers: int) -> list[int]:
    return list(range(0, num_layers, 4))


def build_backbone(shape: str, device):
    """Random-weight Llama of a built-in shape, NF4 decoder linears, frozen."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from floe_dist.modeling.backbone import TINY_CONFIG, compute_dtype, quantize_nf4_
    from floe_dist.plan import BUILTIN

    dtype = compute_dtype()
    config = LlamaConfig(vocab_size=512, **TINY_CONFIG) if shape == "tiny" else LlamaConfig(**BUILTIN[shape])
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    quantize_nf4_(model, dtype)
    model.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the bf16 weights are gone; do not count them in the training peak
    return model


def add_adapters(model, variant: str):
    """Returns (model to train, extra loss from the routers or None, trainable parameter count)."""
    import torch

    if variant == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=PEFT_RANK, lora_alpha=2 * PEFT_RANK, target_modules=TARGETS,
                                                 lora_dropout=0.0, bias="none"))
        return model, None, sum(p.numel() for p in model.parameters() if p.requires_grad)
    from floe_dist.allocation import Allocation
    from floe_dist.modeling.inject import adapter_modules, inject_adapters

    allocation = Allocation.uniform(model.config.num_hidden_layers, TARGETS, experts=MOE_EXPERTS, rank=MOE_RANK,
                                    top_k=MOE_TOP_K, layers=moe_layers(model.config.num_hidden_layers))
    inject_adapters(model, allocation)
    adapters = list(adapter_modules(model).values())
    if variant == "moe-sync":
        for adapter in adapters:
            adapter._balance_loss = types.MethodType(balance_loss_with_host_copy, adapter)

    def balance():
        return 0.01 * torch.stack([a.balance_loss for a in adapters]).sum()

    return model, balance, allocation.trainable_parameters


def balance_loss_with_host_copy(self, probs, top_i, active):
    """The ``moe-sync`` variant: LoRAMoELinear._balance_loss as it was before this benchmark, building
    its routing stats with ``new_tensor([...])``, a pageable host copy that synchronises the CUDA stream."""
    import torch
    import torch.nn.functional as F

    picks = F.one_hot(top_i, self.n_experts).sum((0, 1)).float()
    stats = torch.cat([picks, picks.new_tensor([probs.shape[0], 1.0])])
    picks, n_tokens, n_ranks = stats[:-2], stats[-2], stats[-1]
    return self.n_experts * (picks / picks.sum() * probs.sum(0) * (n_ranks / n_tokens)).sum()


def plan_for(shape: str, variant: str, micro_batch: int, seq_len: int, gpu_memory: float, peak: float) -> dict:
    from floe_dist.allocation import Allocation
    from floe_dist.plan import PlanArgs, count_model, model_config, plan

    common = dict(model=shape, nodes=1, gpus_per_node=1, zero=3, quant="nf4", micro_batch=micro_batch,
                  seq_len=seq_len, full_sequence_loss=True, gpu_memory=gpu_memory, peak_tflops=peak,
                  targets=",".join(TARGETS))
    if variant == "peft":
        return plan(PlanArgs(experts=1, rank=PEFT_RANK, **common))
    layers = count_model(model_config(shape)).layers
    allocation = Allocation.uniform(layers, TARGETS, experts=MOE_EXPERTS, rank=MOE_RANK, top_k=MOE_TOP_K,
                                    layers=moe_layers(layers))
    with tempfile.TemporaryDirectory() as tmp:
        return plan(PlanArgs(allocation=str(allocation.save(Path(tmp) / "allocation.json")), **common))


def run_one(args) -> dict:
    """One (shape, variant) in this process; returns the measured figures."""
    import torch

    from floe_dist.distributed import engine as ds
    from floe_dist.distributed.runtime import device_for, init_distributed
    from floe_dist.plan import count_model

    info = init_distributed()
    device = device_for(info)
    cuda = device.type == "cuda"
    t_build = time.perf_counter()
    model = build_backbone(args.shape, device)
    model, extra_loss, trainable = add_adapters(model, args.variant)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = ds.build_config(3, micro_batch=args.micro_batch, accumulation=1, world_size=1, lr=1e-4,
                             weight_decay=0.0)
    engine, _ = ds.initialize(model, config, args.warmup + args.steps, 1)
    build_seconds = time.perf_counter() - t_build
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(vocab, (args.micro_batch, args.seq_len), device=device, generator=gen)
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        if extra_loss is not None:
            loss = loss + extra_loss()
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    if not all(map(math.isfinite, losses)):
        raise FloatingPointError(f"non-finite loss: {losses}")
    n_params = count_model(model.config).total
    step = statistics.median(times[args.warmup:])
    tokens = args.micro_batch * args.seq_len
    result = {"shape": args.shape, "variant": args.variant, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
              "parameters": n_params, "trainable": trainable, "step_seconds": step,
              "step_seconds_all": times, "tokens_per_s": tokens / step,
              "mfu": 6 * n_params * tokens / step / (args.peak_tflops * 1e12), "losses": losses,
              "build_seconds": build_seconds, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        context = (total - free) - torch.cuda.memory_reserved()  # CUDA/NCCL context and library workspaces
        result.update(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved(),
                      context=context, peak_process=torch.cuda.max_memory_reserved() + context,
                      gpu_memory=total)
    return result


def child(args) -> None:
    result = run_one(args)
    if args.shape != "tiny":
        gib = result.get("gpu_memory", 80 * 2**30) / 2**30
        predicted = plan_for(args.shape, args.variant, args.micro_batch, args.seq_len, gib, args.peak_tflops)
        result.update(plan_bytes=predicted["total_bytes"], plan_terms=predicted["bytes"],
                      plan_trainable=predicted["trainable_parameters"])
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="1b,3b,8b", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--variants", default="peft,moe")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--output", default=None, help="write all results as JSON here")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per (shape, variant) process")
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.shape, args.variant = SHAPES.get(args.one[0], args.one[0]), args.one[1]
        child(args)
        return

    from floe_dist.plan import BUILTIN

    bad = [s for s in args.shapes.split(",") if s not in SHAPES and s not in BUILTIN]
    bad += [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        parser.error(f"unknown shape or variant {bad}: shapes {sorted(SHAPES)} or {sorted(BUILTIN)}, "
                     f"variants {VARIANTS}")
    results = []
    for shape in args.shapes.split(","):
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--one", shape, variant, "--micro-batch", str(args.micro_batch),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--peak-tflops", str(args.peak_tflops)]
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=REPO)
                out = proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as err:
                out = f"timed out after {args.timeout}s\n{err.stdout or ''}{err.stderr or ''}"
            lines = [line[7:] for line in out.splitlines() if line.startswith("RESULT ")]
            if lines:
                results.append(json.loads(lines[-1]))
                r = results[-1]
                print(f"{shape} {variant}: {r['tokens_per_s']:.0f} tok/s, step {r['step_seconds']:.3f}s, "
                      f"MFU {r['mfu']:.1%}", flush=True)
            else:
                results.append({"shape": SHAPES.get(shape, shape), "variant": variant, "error": out[-3000:]})
                print(f"{shape} {variant}: FAILED\n{out[-3000:]}", flush=True)
            if args.output:
                Path(args.output).write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: list[dict]) -> None:
    gib = 2 ** 30
    print("\n| shape | variant | trainable | b x s | step s | tokens/s | MFU | peak alloc GiB | plan GiB "
          "| plan / (alloc + context) | reserved + context GiB | step vs PEFT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    def key(r):
        return r["shape"], r.get("micro_batch"), r.get("seq_len")

    peft = {key(r): r for r in results if r.get("variant") == "peft" and "error" not in r}
    for r in results:
        if "error" in r:
            print(f"| {r['shape']} | {r['variant']} | failed | | | | | | | | | |")
            continue
        ratio = r["step_seconds"] / peft[key(r)]["step_seconds"] if key(r) in peft else float("nan")
        cuda = "peak_allocated" in r
        plan = r.get("plan_bytes")
        mem = (f"{r['peak_allocated'] / gib:.2f} | {plan / gib if plan else float('nan'):.2f} "
               f"| {plan / (r['peak_allocated'] + r['context']) if plan else float('nan'):.2f} "
               f"| {r['peak_process'] / gib:.2f}" if cuda else "- | - | - | -")
        print(f"| {r['shape']} | {r['variant']} | {r['trainable']:,} | {r['micro_batch']}x{r['seq_len']} "
              f"| {r['step_seconds']:.3f} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {mem} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
