"""``floe-dist score``: warm up LoRA-MoE on every layer, score layers by Fisher information, select.

    floe-dist score --model smollm2-135m --task sst2 --output runs/score            # one process
    torchrun --nproc_per_node 2 -m launcher.cli score --zero 3 ...                 # 2 ranks, ZeRO-3

1. **Warm-up** (``<output>/warmup``): a short ``train`` run of a HydraLoRA-style adapter (dense
   router, shared A) on all layers, on the first ``--proxy-examples`` training examples. Reused
   when the stage is rerun with the same settings.
2. **Scores**: the warmed-up model under DeepSpeed (ZeRO-3 by default); global mini-batch i of the
   scoring samples goes to rank ``i % world``; each rank sums its own statistics and one all-reduce
   combines them (floe_dist/methods/fisher.py), so N ranks give the scores of one process.
3. **Selection**: ``topk`` (default k = 25% of layers), ``budget`` (knapsack on adapter parameters),
   or ``refine`` (top-k, then swaps that lower the block-Fisher estimate of the loss increase).

Outputs in ``--output``: ``fisher.json``, ``fisher.png`` and ``allocation.json`` (adapters only on
the selected layers, sized like the warm-up adapter unless ``--final-*`` say otherwise).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from floe_dist.allocation import Allocation, ModuleAllocation, write_json_atomic
from floe_dist.config import arg
from floe_dist.data import collate, encode, load_task
from floe_dist.methods.fisher import (MODES, accumulate_fisher, default_k, refine_with_block, select_budget,
                              select_top_k)
from floe_dist.distributed import engine as ds
from floe_dist.distributed.layout import Layout, zero_stage
from floe_dist.distributed.runtime import all_reduce_sum
from floe_dist.distributed.sharded_load import load_for_layout
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import load_tokenizer, resolve_model
from floe_dist.modeling.export import load_adapter
from floe_dist.modeling.frozen_linear import release_frozen_weights
from floe_dist.modeling.inject import module_shapes
from floe_dist.resume import guard

SELECTIONS = ("topk", "budget", "refine")


@dataclass
class ScoreArgs:
    model: str = arg("smollm2-135m", "base model: smollm2-135m, tiny, a HF folder or a .gguf file")
    task: str = arg("sst2", "sst2, boolq, arithmetic (generative), or a data file/folder (see data_format)")
    data_format: str = arg("auto", "a data file's format: auto, multiple_choice, alpaca, chat or text")
    columns: str = arg("", "a data file's field names: FIELD=COLUMN,... (e.g. instruction=question,output=answer)")
    pack: bool = arg(False, "pack several examples into each max_length row (fewer, fuller rows; training only)")
    output: str = arg("runs/score", "output folder (warmup/, fisher.json, fisher.png, allocation.json)")
    quant: str = arg("none", "backbone: none or nf4")
    zero: str = arg("3", "DeepSpeed config for warm-up and scoring: 0, 2, 3 or a JSON path")
    targets: str = arg("q_proj,v_proj", "modules that get adapters")
    experts: int = arg(4, "experts (B heads) per module")
    rank: int = arg(4, "rank of every expert")
    router: str = arg("dense", "dense (HydraLoRA, FLoE's variant) or topk")
    top_k: int = arg(2, "experts per token with the topk router")
    alpha: float = arg(32.0, "LoRA alpha")
    proxy_examples: int = arg(256, "training examples used for warm-up and scoring")
    warmup_steps: int = arg(20, "warm-up optimizer steps")
    warmup_lr: float = arg(1e-3, "warm-up peak learning rate")
    micro_batch: int = arg(4, "warm-up examples per rank per step")
    mode: str = arg("mask", f"score: {' | '.join(MODES)}")
    normalize_param: bool = arg(False, "param mode: divide by each layer's adapter parameter count")
    samples: int = arg(256, "examples scored (a multiple of score-batch x ranks is used)")
    score_batch: int = arg(8, "examples per Fisher mini-batch (one gradient per mini-batch)")
    select: str = arg("topk", f"selection: {' | '.join(SELECTIONS)}")
    k: int | None = arg(None, "layers kept by topk/refine; default 25%% of the layers")
    budget: int | None = arg(None, "budget selection: adapter parameters allowed")
    final_experts: int | None = arg(None, "experts per module in the output allocation (default: warm-up's)")
    final_rank: int | None = arg(None, "rank in the output allocation (default: warm-up's)")
    seed: int = arg(0, "seed of the warm-up")

    def validate(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.select not in SELECTIONS:
            problems.append(f"--select must be one of {SELECTIONS}, got {self.select!r}")
        if self.select == "budget" and not self.budget:
            problems.append("--select budget needs --budget (adapter parameters)")
        if self.samples < 1 or self.score_batch < 1:
            problems.append(f"zero samples: --samples ({self.samples}) and --score-batch ({self.score_batch}) "
                            f"must be >= 1")
        if self.k is not None and self.k < 1:
            problems.append(f"--k must be >= 1, got {self.k}")
        if problems:
            raise ValueError("bad score arguments:\n  - " + "\n  - ".join(problems))


def warm_up(args: ScoreArgs, out: Path) -> Path:
    """Train (or reuse) the all-layer warm-up adapter; returns its export folder."""
    from floe_dist.stages.train import TrainArgs, run as train

    targs = TrainArgs(model=args.model, task=args.task, data_format=args.data_format, columns=args.columns,
                      pack=args.pack,
                      output=str(out / "warmup"), targets=args.targets, experts=args.experts, rank=args.rank,
                      router=args.router, top_k=args.top_k, alpha=args.alpha, dropout=0.0, quant=args.quant,
                      zero=args.zero, steps=args.warmup_steps, micro_batch=args.micro_batch, lr=args.warmup_lr,
                      max_train_examples=args.proxy_examples, seed=args.seed, checkpoint_every=0)
    export = out / "warmup" / "adapter"
    # A copied warm-up folder, or one made under another ZeRO stage, is the same warm-up.
    guard(out / "warmup" / "train_args.json", asdict(targs), what="a warm-up", may_change=("output", "zero"),
          write=False)
    if not (export / "export.json").is_file():
        train(targs)
    return export


def check_before_warmup(args: ScoreArgs, world_size: int) -> None:
    """Errors knowable from the arguments and the model config alone."""
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(resolve_model(args.model)).num_hidden_layers
    if args.k is not None and args.k > num_layers:
        raise ValueError(f"k={args.k} is larger than the number of scored layers ({num_layers})")
    n_examples = min(args.samples, args.proxy_examples)
    if n_examples // args.score_batch < world_size:
        raise ValueError(f"zero samples to score: {n_examples} examples cannot fill one mini-batch of "
                         f"{args.score_batch} per rank on {world_size} rank(s)")


def scoring_batches(examples, tokenizer, batch: int, rank: int, world: int, max_length: int = 256):
    """Global mini-batch i (examples [i*batch, (i+1)*batch)) is scored by rank i % world."""
    n_batches = len(examples) // batch
    n_batches -= n_batches % world  # equal work per rank: ZeRO-3 forwards are collective
    if n_batches == 0:
        raise ValueError(f"zero samples to score: {len(examples)} examples cannot fill one mini-batch of "
                         f"{batch} per rank on {world} rank(s)")
    for i in range(rank, n_batches, world):
        chunk = examples[i * batch:(i + 1) * batch]
        yield collate([encode(tokenizer, e.prompt, e.choices[e.label], max_length) for e in chunk],
                      tokenizer.pad_token_id)


def run(args: ScoreArgs) -> dict:
    args.validate()
    info = Layout.current()
    device = info.torch_device
    out = Path(args.output)
    check_before_warmup(args, info.world_size)  # minutes of warm-up must not precede a bad-input error
    t0 = time.time()
    export = warm_up(args, out)
    t_warm = time.time() - t0

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    config = ds.build_config(args.zero, micro_batch=args.score_batch, accumulation=1, world_size=info.world_size,
                             lr=1e-9, weight_decay=0.0)
    lm = load_for_layout(model_dir, args.quant, Layout.current(1, config), config)
    release_frozen_weights(lm)  # the Fisher backward does not pin gathered weights
    load_adapter(lm, export)
    model = AnswerLM(lm)
    adapters = model.adapters_by_layer
    _, shapes = module_shapes(lm)
    k = args.k if args.k is not None else default_k(len(adapters))
    if zero_stage(config) == 3:
        forward, _ = ds.initialize(model, config, total_steps=1, warmup_steps=1)  # partitioned backbone
    else:
        forward = model  # ZeRO-0/1/2 keep full parameters on every rank: gradients need no engine
    forward.eval()  # no dropout: the Fisher of the deterministic model

    examples = load_task(args.task, "train", data_format=args.data_format, columns=args.columns,
                         tokenizer=tokenizer)[: min(args.samples, args.proxy_examples)]
    batches = list(scoring_batches(examples, tokenizer, args.score_batch, info.rank, info.world_size))
    t1 = time.time()
    local = accumulate_fisher(forward, adapters,
                              ({k_: v.to(device) for k_, v in b.items()} for b in batches),
                              lambda b: forward(**b)["ce"], with_param=args.mode == "param", device=device,
                              progress=lambda it: tqdm(it, total=len(batches), desc="fisher",
                                                       disable=not info.is_main))
    sums = local.reduce(all_reduce_sum)
    t_score = time.time() - t1

    layers = sorted(adapters)
    scores, kept = select_layers(args, sums, adapters, k)
    allocation = selected_allocation(Allocation.load(export / "allocation.json"), kept, args)
    allocation.with_parameter_count(shapes)
    result = {
        "mode": args.mode, "selection": args.select, "k": len(kept), "selected_layers": kept,
        "scores": {str(l): float(s) for l, s in zip(layers, scores)},
        "fisher_diag": sums.diag.tolist(), "taylor": sums.signed.abs().tolist(),
        "param": sums.param.tolist() if args.mode == "param" else None, "fisher_block": sums.block.tolist(),
        "samples": sums.samples, "batches": sums.batches, "world_size": info.world_size, "seed": args.seed,
        "seconds": {"warmup": t_warm, "score": t_score, "total": time.time() - t0},
        "trainable_parameters": allocation.trainable_parameters, "args": asdict(args),
    }
    if info.is_main:
        write_json_atomic(out / "fisher.json", result)
        allocation.save(out / "allocation.json")
        plot_scores(out / "fisher.png", layers, scores.tolist(), kept, f"{args.mode} Fisher, {args.task}")
        print(f"scored {len(layers)} layers on {sums.samples} samples ({info.world_size} rank(s)); "
              f"selected {kept} -> {out / 'allocation.json'}")
    return result


def select_layers(args: ScoreArgs, sums, adapters: dict, k: int) -> tuple[torch.Tensor, list[int]]:
    """Per-layer scores (in layer order) and the layers the selection keeps."""
    layers = sorted(adapters)
    # ZeRO-3 leaves each rank a partition (numel() is 0 or a shard); ds_numel is the full count
    counts = torch.tensor([sum(getattr(p, "ds_numel", p.numel()) for m in adapters[l] for p in m.adapter_parameters())
                           for l in layers], dtype=torch.float64)
    scores = sums.scores(args.mode, counts if args.normalize_param else None)
    if args.select == "budget":
        kept_idx = select_budget(scores, counts.long().tolist(), args.budget)
    else:
        kept_idx = select_top_k(scores, k)
        if args.select == "refine":
            kept_idx = refine_with_block(sums.block, kept_idx)
    return scores, [layers[i] for i in kept_idx]


def selected_allocation(warm: Allocation, kept: list[int], args: ScoreArgs) -> Allocation:
    """The warm-up allocation restricted to the kept layers, optionally resized."""
    layers = {}
    for layer in kept:
        layers[layer] = {}
        for name, spec in warm.layers[layer].items():
            experts = args.final_experts or spec.experts
            rank = args.final_rank or spec.ranks[0]
            layers[layer][name] = ModuleAllocation(experts, (rank,) * experts, spec.router, min(spec.top_k, experts))
    return Allocation(method="floe", target_modules=warm.target_modules, layers=layers, alpha=warm.alpha,
                      dropout=0.05, meta={"selected_by": f"fisher/{args.mode}/{args.select}"})


def plot_scores(path: Path, layers: list[int], scores: list[float], kept: list[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.3), 3.2))
    colors = ["tab:red" if l in kept else "tab:gray" for l in layers]
    ax.bar(layers, scores, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("score")
    ax.set_title(f"{title} (red: selected)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
