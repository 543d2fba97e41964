"""4-bit LoRA-MoE vs PEFT LoRA under ZeRO-3 on one GPU: tokens/s, MFU, peak memory, and the plan.

    python benchmarks/gpu_throughput.py                       # llama3.2-1b, llama3.2-3b, llama3-8b
    python benchmarks/gpu_throughput.py --shapes tiny --steps 2 --seq-len 64   # CPU smoke run

Each (shape, variant) runs in its own process (clean ZeRO-3 state, separate memory peaks): a Llama
built from its public shape with random weights (no hub access), decoder linears quantized to NF4
(bf16 compute and storage, floe_dist.modeling.backbone.quantize_nf4_), gradient checkpointing, a
full-sequence causal-LM loss on random tokens, DeepSpeed ZeRO-3 (zero_configs/zero3.json) over the
adapter parameters. Variants (``peft`` and ``moe`` at matched trainable parameters; ``peft-quarter`` and
``moe`` on the same layers and targets):

* ``peft``: PEFT LoRA r=16 on all seven linears of every layer (the QLoRA recipe);
* ``moe``: floe-dist LoRA-MoE, 4 experts of rank 16, top-2, on the same linears of a quarter of the
  layers (every 4th; it includes layer 0, so backward runs through the whole model: a FLoE-selected
  quarter costs at most this, less when it leaves out the first layers);
* ``peft-quarter``: PEFT LoRA of rank 4 x 16 = 64 on the same linears of the same quarter of the layers as
  ``moe``: the same layers and targets (and the same trainable parameters, less the routers);
* ``moe-eager``: ``moe`` with the router run op by op (``fuse_router=False``), as before the fused
  router, for that before/after ratio;
* ``moe-sync``: ``moe-eager`` with the routing stats passed through a pageable host copy, as the balance
  loss was built before this benchmark (it synchronised the CUDA stream in every MoE layer).

``--alloc-conf expandable_segments:True`` sets PYTORCH_CUDA_ALLOC_CONF in every child (the allocator's
reserve over what is allocated is the plan's blind spot); rows record it.

MFU and HFU (floe_dist/flops.py, PaLM's definitions): MFU divides *model* FLOPs (frozen base: forward
and activation-gradient backward, 4N + 12·L·d·T, plus 6 x the active adapter parameters), HFU the
*hardware* FLOPs (plus the checkpointed forward recomputed, and every expert the dense dispatch
computes), each over the bf16 dense peak given by --peak-tflops (989: H100/H200 SXM datasheet).
Memory: torch.cuda.max_memory_allocated over the timed steps, and the process's device peak (peak
reserved + CUDA context); the plan (floe_dist.stages.plan) predicts the latter. Writes
benchmarks/results/gpu_throughput.json (``python benchmarks/report.py`` renders it).
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

SHAPES = {"1b": "llama3.2-1b", "3b": "llama3.2-3b", "8b": "llama3-8b", "tiny": "tiny"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_RANK, MOE_EXPERTS, MOE_RANK, MOE_TOP_K = 16, 4, 16, 2
VARIANTS = ("peft", "peft-quarter", "moe", "moe-eager", "moe-sync")


def moe_layers(num_layers: int) -> list[int]:
    return list(range(0, num_layers, 4))


def build_backbone(shape: str, device):
    """Random-weight Llama of a built-in shape, NF4 decoder linears, frozen."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from floe_dist.modeling.backbone import TINY_CONFIG, compute_dtype, quantize_nf4_
    from floe_dist.stages.plan import BUILTIN

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

    if variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        quarter = variant == "peft-quarter"
        rank = MOE_EXPERTS * MOE_RANK if quarter else PEFT_RANK
        layers = moe_layers(model.config.num_hidden_layers) if quarter else None
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                 layers_to_transform=layers, lora_dropout=0.0, bias="none"))
        return model, None, sum(p.numel() for p in model.parameters() if p.requires_grad)
    from floe_dist.modeling.inject import adapter_modules, inject_adapters

    allocation = allocation_for(variant, model.config.num_hidden_layers)
    inject_adapters(model, allocation)
    adapters = list(adapter_modules(model).values())
    for adapter in adapters:
        adapter.fuse_router = variant == "moe"  # compiled for moe (opt-in in the product), eager otherwise
        if variant == "moe-sync":
            adapter.routing_stats_reducer = stats_through_host_copy

    def balance():
        return 0.01 * torch.stack([a.balance_loss for a in adapters]).sum()

    return model, balance, allocation.trainable_parameters


def stats_through_host_copy(stats):
    """The ``moe-sync`` variant: the routing stats plus a list copied from pageable host memory, as
    ``new_tensor([...])`` built them before this benchmark; on CUDA that synchronises the stream."""
    return stats + stats.new_tensor([0.0] * stats.numel())


def allocation_for(variant: str, layers: int):
    """The adapters of a variant as an allocation (PEFT's LoRA counts the same as a one-expert module)."""
    from floe_dist.allocation import Allocation

    if variant == "peft":
        return Allocation.uniform(layers, TARGETS, rank=PEFT_RANK)
    if variant == "peft-quarter":
        return Allocation.uniform(layers, TARGETS, rank=MOE_EXPERTS * MOE_RANK, layers=moe_layers(layers))
    return Allocation.uniform(layers, TARGETS, experts=MOE_EXPERTS, rank=MOE_RANK, top_k=MOE_TOP_K,
                              layers=moe_layers(layers))


def token_flops(config, variant: str, seq_len: int):
    """Model and hardware FLOPs per token of a variant (floe_dist/flops.py), counted on the meta device."""
    from floe_dist.flops import flops_per_token
    from floe_dist.stages.plan import count_model

    count = count_model(config)
    allocation = allocation_for(variant, count.layers)
    return flops_per_token(decoder_linear=count.linear, head=count.vocab * count.hidden, layers=count.layers,
                           hidden=count.hidden, seq_len=seq_len,
                           adapter_active=allocation.count_active_parameters(count.shapes),
                           adapter_computed=allocation.count_parameters(count.shapes), recompute=True)


def plan_for(shape: str, variant: str, micro_batch: int, seq_len: int, gpu_memory: float, peak: float) -> dict:
    from floe_dist.stages.plan import PlanInputs, count_model, model_config, plan

    common = dict(model=shape, nodes=1, gpus_per_node=1, zero=3, quant="nf4", micro_batch=micro_batch,
                  seq_len=seq_len, full_sequence_loss=True, gpu_memory=gpu_memory, peak_tflops=peak,
                  targets=",".join(TARGETS))
    allocation = allocation_for(variant, count_model(model_config(shape)).layers)
    with tempfile.TemporaryDirectory() as tmp:
        return plan(PlanInputs(allocation=str(allocation.save(Path(tmp) / "allocation.json")), **common))


def run_one(args) -> dict:
    """One (shape, variant) in this process; returns the measured figures."""
    import torch

    from floe_dist.distributed import engine as ds
    from floe_dist.distributed.runtime import device_for, init_distributed
    from floe_dist.flops import utilisation
    from floe_dist.modeling.lora_moe import compiled_router_ran
    from floe_dist.schedule import warmup_cosine
    from floe_dist.stages.plan import count_model

    info = init_distributed()
    device = device_for(info)
    cuda = device.type == "cuda"
    t_build = time.perf_counter()
    model = build_backbone(args.shape, device)
    model, extra_loss, trainable = add_adapters(model, args.variant)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = ds.build_config(3, micro_batch=args.micro_batch, accumulation=1, world_size=1, lr=1e-4,
                             weight_decay=0.0)
    engine, _ = ds.initialize(model, config, warmup_cosine(args.warmup + args.steps, 1))
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
    per_token = token_flops(model.config, args.variant, args.seq_len)
    step = statistics.median(times[args.warmup:])
    tokens = args.micro_batch * args.seq_len
    result = {"shape": args.shape, "variant": args.variant, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
              "parameters": count_model(model.config).total, "trainable": trainable, "step_seconds": step,
              "step_seconds_all": times, "tokens_per_s": tokens / step,
              "model_flops_per_token": per_token.model, "hardware_flops_per_token": per_token.hardware,
              "mfu": utilisation(per_token.model, tokens / step, args.peak_tflops),
              "hfu": utilisation(per_token.hardware, tokens / step, args.peak_tflops), "losses": losses,
              "build_seconds": build_seconds, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "router_compiled": compiled_router_ran()}
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
    parser.add_argument("--variants", default="peft,peft-quarter,moe")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--output", default=None, help="also write every raw result as JSON here")
    parser.add_argument("--call", type=int, default=3, help="label of this run in the result file (its rows replace "
                        "that call's; calls 1 and 2 are session 7's)")
    parser.add_argument("--alloc-conf", default="", help="PYTORCH_CUDA_ALLOC_CONF for every child, e.g. "
                        "expandable_segments:True (default: the allocator's own)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per (shape, variant) process")
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.shape, args.variant = SHAPES.get(args.one[0], args.one[0]), args.one[1]
        child(args)
        return

    from floe_dist.stages.plan import BUILTIN

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
            if args.alloc_conf:
                env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
            result, out = run_child(cmd, args.timeout, env)
            if result is not None:
                results.append(result)
                r = results[-1]
                print(f"{shape} {variant}: {r['tokens_per_s']:.0f} tok/s, step {r['step_seconds']:.3f}s, "
                      f"MFU {r['mfu']:.1%}, HFU {r['hfu']:.1%}", flush=True)
            else:
                results.append({"shape": SHAPES.get(shape, shape), "variant": variant, "error": out[-3000:]})
                print(f"{shape} {variant}: FAILED\n{out[-3000:]}", flush=True)
            if args.output:
                Path(args.output).write_text(json.dumps(results, indent=1))
            # after every process, not once at the end: a run stopped at its time limit keeps what it measured
            measured = [r for r in results if "error" not in r]  # a failed variant does not cost the others
            if measured and all(r["device"] != "cpu" for r in measured):  # a CPU smoke run keeps the GPU file
                write_result("gpu_throughput", table_rows(results, args.call), merge_key="call",
                             peak_tflops=args.peak_tflops,
                             raw=[{k: v for k, v in r.items() if k != "plan_terms"} for r in results])
    for row in table_rows(results, args.call):
        print({k: v for k, v in row.items() if k not in ("model_flops_per_token", "hardware_flops_per_token")})


def run_child(cmd: list[str], timeout: int, env: dict[str, str] | None = None):
    """Run one measuring process; returns (the JSON of its last ``RESULT `` line or None, its output)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        out = f"timed out after {timeout}s\n{err.stdout or ''}{err.stderr or ''}"
    lines = [line[7:] for line in out.splitlines() if line.startswith("RESULT ")]
    return (json.loads(lines[-1]) if lines else None), out


def table_rows(results: list[dict], call: int) -> list[dict]:
    """The rows of BENCHMARKS.md's GPU table (benchmarks/report.py), with the step ratios against PEFT on
    all layers (equal parameters) and on the same layers (``peft-quarter``)."""
    gib = 2 ** 30

    def key(r):
        return r["shape"], r.get("micro_batch"), r.get("seq_len")

    base = {(r["variant"], *key(r)): r for r in results if "error" not in r}
    rows = []
    for r in results:
        if "error" in r:
            continue
        peft, quarter = base.get(("peft", *key(r))), base.get(("peft-quarter", *key(r)))
        cuda = "peak_allocated" in r
        plan = r.get("plan_bytes")
        rows.append({"call": call, "shape": r["shape"], "variant": r["variant"], "alloc_conf": r["alloc_conf"],
                     "micro_batch": r["micro_batch"],
                     "seq_len": r["seq_len"], "trainable": r["trainable"], "step_seconds": r["step_seconds"],
                     "tokens_per_s": r["tokens_per_s"], "model_flops_per_token": r["model_flops_per_token"],
                     "hardware_flops_per_token": r["hardware_flops_per_token"], "mfu": r["mfu"], "hfu": r["hfu"],
                     "peak_allocated_gib": r["peak_allocated"] / gib if cuda else None,
                     "plan_gib": plan / gib if plan else None,
                     "plan_over_alloc_context": plan / (r["peak_allocated"] + r["context"]) if cuda and plan else None,
                     "reserved_context_gib": r["peak_process"] / gib if cuda else None,
                     "step_vs_peft": r["step_seconds"] / peft["step_seconds"] if peft else None,
                     "step_vs_peft_same_layers": r["step_seconds"] / quarter["step_seconds"] if quarter else None})
    return rows


if __name__ == "__main__":
    main()
