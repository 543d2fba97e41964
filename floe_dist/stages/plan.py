"""``floe-dist plan``: per-GPU memory and time of a training layout, before any cluster hour is spent.

    floe-dist plan --config recipes/llama3-70b-2node.yaml            # what the recipe's train stage needs
    floe-dist plan --model llama3-70b --nodes 2 --nproc 8 --quant nf4 --zero 3 --experts 8 --rank 8 --router topk
    floe-dist plan --model path/to/config.json --allocation runs/x/allocation.json --gpu-memory 40

Parameters are counted exactly on a model built on the meta device (no weights, no download) from a
built-in Llama shape or any Hugging Face ``config.json``; adapter counts come from the allocation
file (or the adapter section on every layer). Memory per GPU follows the ZeRO paper's model states and
Korthikanti et al.'s activations:

    base      4-bit / 16-bit frozen weights, / N under ZeRO-3 (0 with --offload)
    adapters  16 B per trainable parameter (16-bit weight, fp32 master, Adam m, v, grad),
              / N under ZeRO-3; split experts / ep_size (they sit beside ZeRO-3, see expert_parallel)
    ckpt      one activation per layer kept by gradient checkpointing (b*s*h)
    layer     the working set of the layer being recomputed: b*s*(34h + 5*a*s), no 5as with flash attention
    logits    answer positions only (floe-dist's loss), or b*s*V*10 bytes for a full-sequence loss
    gather    ZeRO-3 prefetch of ~2 layers, one dequantized weight and the gathered 16-bit head, or, when
              larger, the weights kept gathered until their backward use (reuse distance, below);
              none on a single rank, where a gathered parameter is its own partition
    runtime   CUDA/NCCL context and allocator slack (GPU), or the Python/torch process (CPU)
    total     1.2 x the sum on GPU (calibrated on the PEFT 70B run; the CPU factor is 1.0)

Loading is planned apart, because it can be the limit: under ZeRO-3 on several ranks
(floe_dist/distributed/sharded_load.py) a rank holds its partition plus the largest module
materialised whole in the compute dtype (at 70B the 16-bit embedding, 2 GiB) and, on a CPU rank 0,
the 16-bit copy read from the checkpoint (on a GPU node that copy is in host memory); otherwise every rank loads the whole model. ``load`` = base +
adapters + that working set + runtime, times the same factor; a plan fits when both load and training do.

On CPU the plan is the memory a run holds live. glibc's malloc keeps freed activation and gather
buffers resident (its mmap threshold rises after the first frees), which added 28-62% to SmolLM2's peak
RSS in BENCHMARKS.md; jemalloc (LD_PRELOAD=libjemalloc.so.2) or a pinned MALLOC_MMAP_THRESHOLD_ gives it back.

Time: model FLOPs per token (floe_dist/flops.py: frozen base, no recomputation, PaLM's definition)
over the GPU's peak at an assumed MFU; the hardware FLOPs (with recomputation) are reported beside them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from floe_dist.allocation import Allocation
from floe_dist.config import below_one
from floe_dist.distributed.layout import Layout
from floe_dist.flops import flops_per_token
from floe_dist.recipe import PlanSection, Recipe

GIB = 2 ** 30
# Llama shapes (public configs); vocabulary and tying decide the 16-bit embedding share.
BUILTIN = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
BYTES_PER_WEIGHT = {"nf4": (4 + 32 / 64) / 8, "nf4-dq": (4 + 8 / 64 + 32 / (64 * 256)) / 8, "bf16": 2.0, "fp32": 4.0}
# Calibration constants, each named with the figure it was fitted on (benchmarks/bench_plan_published.py
# keeps those figures apart from the validation ones, which fitted nothing):
GPU_FACTOR = 1.2  # fitted on the PEFT docs' Llama-2-70B ZeRO-3 + QLoRA run (36.6 GB per GPU)
# ZeRO-3 does not release a gathered parameter whose next use (in backward) is fewer than
# stage3_max_reuse_distance elements away (1e9, DeepSpeed's default and zero_configs/zero3.json). In
# forward that distance is about twice the parameters after it, so the last ~5e8 elements stay gathered:
# a model smaller than that stays gathered whole (probed on SmolLM2: every parameter stayed gathered through the step).
REUSE_KEPT_ELEMENTS = 1e9 / 2
GPU_RUNTIME_BYTES = 1.5e9  # assumed, not fitted: CUDA/NCCL context and workspaces (published figures: 1-2 GB)
# measured: peak RSS of a process that imported the training stack (torch, transformers, deepspeed, peft,
# tensorboard) and loaded a tokenizer and the SST-2 task, i.e. a CPU rank before its model exists
CPU_RUNTIME_BYTES = 536_260 * 1024


SECTIONS = ("plan", "model", "adapter", "train", "parallel", "allocate", "campaign")
OUTPUT = None  # printed; --output also writes the plan as JSON
OUTPUT_FILE = "plan.json"


@dataclass
class PlanInputs:
    """What the planner computes on. The command builds every field from a recipe (``plan_inputs``); benchmarks
    and tests give them directly, and the defaults are the published runs' common setting (70B QLoRA on 8 GPUs)."""
    model: str = "llama3-70b"  # built-in shape, a config.json, or a model folder
    allocation: str | None = None  # allocation.json; none = uniform from the fields below
    targets: str = ALL_LINEAR
    experts: int = 1
    rank: int = 16
    top_k: int = 2
    router: str = "topk"
    nodes: int = 1
    gpus_per_node: int = 8  # ranks per node
    zero: int = 3
    quant: str = "nf4"  # nf4, nf4-dq (double quantization), bf16, fp32
    ep_size: int = 1
    micro_batch: int = 1
    seq_len: int = 2048
    accumulation: int = 1
    gradient_checkpointing: bool = True
    # the plan section's own settings: its defaults, not a second set
    flash_attention: bool = PlanSection.flash_attention
    full_sequence_loss: bool = PlanSection.full_sequence_loss
    offload: bool = PlanSection.offload
    device: str = PlanSection.device
    gpu_memory: float = PlanSection.gpu_memory
    peak_tflops: float = PlanSection.peak_tflops
    mfu: float = PlanSection.mfu

    def layout(self) -> Layout:
        return Layout.planned(max(1, self.nodes), max(1, self.gpus_per_node), self.ep_size, self.zero)

    def validate(self) -> None:
        problems = below_one(self, ("nodes", "gpus_per_node", "micro_batch", "seq_len", "accumulation",
                                    "experts", "rank", "ep_size"))
        problems += self.layout().problems()  # the rules train applies, without an allocation yet
        if self.zero not in (0, 2, 3):
            problems.append(f"--zero must be 0, 2 or 3, got {self.zero}")
        if self.quant not in BYTES_PER_WEIGHT:
            problems.append(f"--quant must be one of {sorted(BYTES_PER_WEIGHT)}, got {self.quant!r}")
        if self.device not in ("gpu", "cpu"):
            problems.append(f"--device must be gpu or cpu, got {self.device!r}")
        if not 0 < self.mfu <= 1:
            problems.append(f"--mfu must be in (0, 1], got {self.mfu}")
        if self.allocation and not Path(self.allocation).is_file():
            problems.append(f"--allocation {self.allocation}: file not found")
        if problems:
            raise ValueError("bad plan arguments:\n  - " + "\n  - ".join(problems))


def plan_inputs(recipe: Recipe) -> PlanInputs:
    """The recipe's model, adapter, batch and layout as the planner's inputs: what its train stage would run
    (``parallel.nproc`` ranks per node; a DeepSpeed JSON path counts as ZeRO-3)."""
    r, p = recipe, recipe.plan
    zero = int(r.parallel.zero) if r.parallel.zero in ("0", "1", "2", "3") else 3
    quant = ("nf4-dq" if p.double_quant else "nf4") if r.model.quant == "nf4" else \
        ("bf16" if p.device == "gpu" else "fp32")
    a = r.adapter
    return PlanInputs(model=r.model.shape or r.model.name, allocation=r.allocate.file, targets=a.targets,
                      experts=a.experts, rank=a.rank, top_k=a.top_k, router=a.router, nodes=r.parallel.nodes,
                      gpus_per_node=r.parallel.nproc, zero=zero, quant=quant, ep_size=r.parallel.ep_size,
                      micro_batch=r.train.micro_batch, seq_len=r.model.max_length, accumulation=r.train.accumulation,
                      gradient_checkpointing=r.train.gradient_checkpointing, flash_attention=p.flash_attention,
                      full_sequence_loss=p.full_sequence_loss, offload=p.offload, device=p.device,
                      gpu_memory=p.gpu_memory, peak_tflops=p.peak_tflops, mfu=p.mfu)


def model_config(name: str):
    """A transformers config from a built-in shape, a config.json, or a model folder (no weights read)."""
    from transformers import AutoConfig, LlamaConfig

    if name in BUILTIN:
        return LlamaConfig(**BUILTIN[name])
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        return AutoConfig.for_model(**data) if "model_type" in data else LlamaConfig(**data)
    from floe_dist.modeling.backbone import resolve_model  # tiny, smollm2-135m: converted folders

    return AutoConfig.from_pretrained(resolve_model(name))


@dataclass
class ModelCount:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    linear: int  # parameters of the decoder layers' linear modules (quantized by nf4)
    other: int  # embeddings, head, norms (kept 16-bit)
    largest: int  # elements of the largest parameter (the embedding or head, at every Llama size)
    shapes: dict[str, tuple[int, int]]

    @property
    def total(self) -> int:
        return self.linear + self.other


def count_model(config) -> ModelCount:
    """Exact parameter counts from the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from floe_dist.modeling.inject import find_layer_linears, module_shapes

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for mods in find_layer_linears(model).values() for _, m in mods.values())
    total = sum(p.numel() for p in model.parameters())
    layers, shapes = module_shapes(model)
    return ModelCount(layers=layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                      heads=config.num_attention_heads, vocab=config.vocab_size, linear=linear,
                      other=total - linear, largest=max(p.numel() for p in model.parameters()), shapes=shapes)


def expert_parameters(allocation: Allocation, shapes: dict[str, tuple[int, int]]) -> int:
    """Parameters of multi-expert modules' experts (A and B, not routers): what --ep-size splits."""
    from floe_dist.allocation import count_lora_parameters

    n = 0
    for mods in allocation.layers.values():
        for name, m in mods.items():
            if m.experts > 1:
                d_in, d_out = shapes[name]
                n += count_lora_parameters(d_in, d_out, m.ranks, m.router) - m.experts * d_in
    return n


def plan(args: PlanInputs) -> dict:
    """The memory terms (bytes per GPU or per CPU rank), their total, tokens and time per step."""
    args.validate()
    config = model_config(args.model)
    count = count_model(config)
    if args.allocation:
        allocation = Allocation.load(args.allocation)
        allocation.validate(count.layers, count.shapes)
    else:
        allocation = Allocation.uniform(count.layers, [t for t in args.targets.split(",") if t],
                                        experts=args.experts, rank=args.rank, router=args.router,
                                        top_k=min(args.top_k, args.experts))
        allocation.validate(count.layers, count.shapes)
    args.layout().check(allocation)  # the experts split over --ep-size as training would split them
    trainable = allocation.count_parameters(count.shapes)
    experts = expert_parameters(allocation, count.shapes) if args.ep_size > 1 else 0

    n = args.layout().world_size
    b, s, h, L = args.micro_batch, args.seq_len, count.hidden, count.layers
    gpu = args.device == "gpu"
    act = 2 if gpu else 4  # bytes per activation value
    wq = BYTES_PER_WEIGHT[args.quant]
    w16 = 2 if gpu else 4  # embeddings and head: bf16 on GPU, fp32 on CPU
    shard = n if args.zero == 3 else 1

    base = 0.0 if args.offload else (wq * count.linear + w16 * count.other) / shard
    state_per_param = 16 if gpu else 20  # CPU/fp32: weight, fp32 master, grad, m, v (4 B each)
    if args.offload:
        adapters = 0.0
    else:
        weight = 2 if gpu else 4  # the replicated working copy under ZeRO-0/2
        dense = (trainable - experts) * (state_per_param / shard if args.zero == 3 else
                                         weight + (state_per_param - weight) / (n if args.zero == 2 else 1))
        adapters = dense + experts * 16 / args.ep_size  # split experts: fp32 weight, grad, m, v
    ckpt = L * b * s * h * act if args.gradient_checkpointing else 0.0
    per_layer = b * s * (34 * h + (0 if args.flash_attention else 5 * count.heads * s)) * act / 2
    layer = per_layer if args.gradient_checkpointing else per_layer * L
    logits = 10 * b * s * count.vocab * (act / 2) if args.full_sequence_loss else 10 * b * count.vocab * (act / 2)
    # ZeRO-3 (or offload) gathers: ~2 prefetched layers, one dequantized weight, and the 16-bit head,
    # live together at the loss, where backward starts recomputing the last layers.
    head = count.vocab * h * w16
    prefetch = 2 * wq * count.linear / L + 2 * h * count.intermediate + head
    kept = min(wq * count.linear + w16 * count.other, REUSE_KEPT_ELEMENTS * w16)
    # On one rank the gathered parameter is a view of its partition (DeepSpeed skips the copy; probed on
    # SmolLM2: same storage), so only an offloaded model pays for gathers there.
    sharded = (args.zero == 3 and n > 1) or args.offload
    gather = max(prefetch, kept) if sharded else 0.0
    # router logits (fp32) and the experts' low-rank activations, kept per MoE module until backward
    moe = b * s * sum(m.experts * 4 + m.top_k * max(m.ranks) * 2 * 3
                      for mods in allocation.layers.values() for m in mods.values() if m.experts > 1)
    runtime = GPU_RUNTIME_BYTES if gpu else CPU_RUNTIME_BYTES
    terms = {"base": base, "adapters": adapters, "ckpt": ckpt, "layer": layer, "logits": logits,
             "gather": gather, "moe": moe, "runtime": runtime}
    factor = GPU_FACTOR if gpu else 1.0
    total = factor * sum(terms.values())
    # loading: the largest module whole in the compute dtype, plus (CPU) rank 0's 16-bit read of it
    whole = wq * count.linear + w16 * count.other
    partitioned_load = args.zero == 3 and n > 1
    load_terms = {"base": base if partitioned_load or args.offload else whole, "adapters": adapters,
                  "working": count.largest * (w16 + (0 if gpu else 2)) if partitioned_load or args.offload else 0.0,
                  "runtime": runtime}
    load = factor * sum(load_terms.values())
    # evaluation on the same ranks and partitioning (distributed/sharded_eval.py): no gradients, optimizer state
    # or stored activations; one layer's working activations and, generating, a KV cache over the sequence
    eval_terms = {"base": base, "adapters": trainable * (2 if gpu else 4) / shard, "layer": per_layer,
                  "kv_cache": 2 * L * b * s * count.shapes.get("k_proj", (h, h))[1] * act,  # keys and values (GQA)
                  "logits": 10 * b * count.vocab * (act / 2), "gather": gather, "runtime": runtime}
    evaluation = factor * sum(eval_terms.values())

    tokens = b * s * n * args.accumulation
    per_token = flops_per_token(decoder_linear=count.linear, head=count.vocab * h, layers=L, hidden=h, seq_len=s,
                                adapter_active=allocation.count_active_parameters(count.shapes),
                                adapter_computed=trainable, recompute=args.gradient_checkpointing)
    seconds = per_token.model * tokens / (n * args.peak_tflops * 1e12 * args.mfu)
    fits = max(total, load) <= args.gpu_memory * GIB
    return {"args": asdict(args), "model": {"layers": L, "hidden": h, "parameters": count.total,
                                           "quantized_linear": count.linear, "other": count.other},
            "world_size": n, "trainable_parameters": trainable, "split_expert_parameters": experts,
            "bytes": terms, "total_bytes": total, "load_bytes": load, "load_terms": load_terms,
            "eval_bytes": evaluation, "eval_terms": eval_terms,
            "limit": "loading" if load > total else "training", "fits": fits, "tokens_per_step": tokens,
            "flops_per_token": {"model": per_token.model, "hardware": per_token.hardware},
            "seconds_per_step": seconds, "advice": [] if fits else advice(args, terms, max(total, load))}


def advice(args: PlanInputs, terms: dict[str, float], total: float) -> list[str]:
    """What would make a plan that does not fit fit, largest saving first."""
    need = total - args.gpu_memory * GIB
    tips = []
    if args.zero != 3:
        tips.append("use --zero 3: the base and adapter states are then divided by the world size")
    if args.quant in ("bf16", "fp32"):
        tips.append("use --quant nf4: the frozen linear weights take 4.5 bits instead of 16")
    if not args.gradient_checkpointing:
        tips.append("turn on gradient checkpointing: one activation per layer instead of every layer's working set")
    states = terms["base"] + terms["adapters"]
    room = args.gpu_memory * GIB / GPU_FACTOR - (sum(terms.values()) - states)  # what states may take
    if args.zero == 3 and states > 0 and room > 0:
        ranks = states * args.nodes * args.gpus_per_node / room
        tips.append(f"use --nodes {math.ceil(ranks / args.gpus_per_node)} (ZeRO-3 divides the base and "
                    f"adapter states by the world size)")
    if terms["logits"] > need / 2 and args.full_sequence_loss:
        tips.append("compute the loss on answer tokens only (floe-dist's default) or use chunked cross-entropy")
    if args.micro_batch > 1:
        tips.append(f"use --micro-batch {max(1, args.micro_batch // 2)} with --accumulation {args.accumulation * 2}")
    if not args.offload:
        tips.append("offload parameters and optimizer state to CPU (--offload; slower, needs host RAM)")
    return tips or ["no setting of this planner makes it fit: use GPUs with more memory"]


def budget_split(budget: float, search_share: float, seconds_per_step: float) -> dict:
    """The most ``campaign.budget`` gives the search and the final run (launcher/campaign.py spends it: what the
    zero-shot evaluation and allocation take comes off both, and the final run's steps follow its measured speed)."""
    search = search_share * budget
    return {"search_s": search, "train_s": budget - search, "train_steps": int((budget - search) / seconds_per_step)}


def run(recipe: Recipe, output: str | None = OUTPUT) -> dict:
    recipe.validate(*SECTIONS)
    args = plan_inputs(recipe)
    result = plan(args)
    gib = {k: v / GIB for k, v in result["bytes"].items()}
    where = "per GPU" if args.device == "gpu" else "per CPU rank (live peak; glibc malloc may keep more)"
    print(f"{args.model}: {result['model']['parameters'] / 1e9:.2f}B parameters, "
          f"{result['trainable_parameters']:,} trainable; {result['world_size']} ranks, ZeRO-{args.zero}, "
          f"{args.quant}, ep_size {args.ep_size}, b={args.micro_batch} s={args.seq_len}")
    print("  " + "  ".join(f"{k} {v:.2f}" for k, v in gib.items()) + "  (GiB)")
    load = result["load_terms"]
    print(f"  training {result['total_bytes'] / GIB:.2f} GiB, loading {result['load_bytes'] / GIB:.2f} GiB {where} "
          f"(load: base {load['base'] / GIB:.2f} + largest module whole {load['working'] / GIB:.2f} GiB) -> "
          + (f"{result['limit']} is the limit, " if result["limit"] == "loading" else "")
          + ("fits" if result["fits"] else f"DOES NOT FIT in {args.gpu_memory:g} GiB"))
    print(f"  evaluation and generation on the same ranks: {result['eval_bytes'] / GIB:.2f} GiB {where.split(' (')[0]}")
    print(f"  {result['tokens_per_step']:,} tokens/step, ~{result['seconds_per_step']:.2f} s/step at MFU {args.mfu}")
    for tip in result["advice"]:
        print(f"  to fit: {tip}")
    budget = None if recipe.campaign.from_job else recipe.campaign.budget_seconds()
    if recipe.campaign.from_job:
        print("  campaign.budget job: the search's and the final run's shares are set from the time the sbatch job "
              "has left when the campaign starts")
    if budget:
        result["budget"] = budget_split(budget, recipe.campaign.search_share, result["seconds_per_step"])
        b = result["budget"]
        print(f"  campaign.budget {recipe.campaign.budget} ({budget:.0f} s): the search at most {b['search_s']:.0f} s "
              f"({recipe.campaign.search_share:.0%} of what zero-shot evaluation and allocation leave), the final run "
              f"at most {b['train_s']:.0f} s: about {b['train_steps']:,} steps at this step time")
    if output:
        from floe_dist.files import output_file, write_json_atomic

        print(f"-> {write_json_atomic(output_file(output, OUTPUT_FILE), result)}")
    return result
