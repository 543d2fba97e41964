"""``floe-dist score``: warm up LoRA-MoE on every layer, score layers by Fisher information, select.

    floe-dist score --model smollm2-135m --task sst2 --output runs/score            # one process
    floe-dist score --config my_recipe.yaml --output runs/score                    # the recipe's score section
    torchrun --nproc_per_node 2 -m launcher.cli score --zero 3 ...                 # 2 ranks, ZeRO-3

1. **Warm-up** (``<output>/warmup``): a short ``train`` run of a HydraLoRA-style adapter (dense
   router, shared A) on all layers, on the first ``score.proxy_examples`` training examples. Reused
   when the stage is rerun with the same settings.
2. **Scores**: the warmed-up model under DeepSpeed (ZeRO-3 by default); global mini-batch i of the
   scoring samples goes to rank ``i % world``; each rank sums its own statistics and one all-reduce
   combines them (floe_dist/methods/fisher.py), so N ranks give the scores of one process.
3. **Selection**: ``topk`` (default k = 25% of layers), ``budget`` (knapsack on adapter parameters),
   or ``refine`` (top-k, then swaps that lower the block-Fisher estimate of the loss increase).

Outputs in ``--output``: ``fisher.json``, ``fisher.png`` and ``allocation.json`` (adapters only on
the selected layers, sized like the warm-up adapter unless ``score.final_*`` say otherwise).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from floe_dist.allocation import Allocation, ModuleAllocation
from floe_dist.data import collate, encode
from floe_dist.distributed import engine as ds
from floe_dist.distributed.layout import Layout, zero_stage
from floe_dist.distributed.runtime import all_reduce_sum, main_rank_first
from floe_dist.files import write_json_atomic
from floe_dist.methods.fisher import accumulate_fisher, default_k, refine_with_block, select_budget, select_top_k
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import load_tokenizer, resolve_model
from floe_dist.modeling.export import load_adapter
from floe_dist.modeling.inject import module_shapes
from floe_dist.recipe import Recipe, TrainSection, settings_of
from floe_dist.resources import Resources
from floe_dist.resume import guard
from floe_dist.streaming import load_split

SECTIONS = ("score", "adapter", "allocate", "model", "data", "parallel")
OUTPUT = "runs/score"


WARMUP_MAY_CHANGE = {"parallel.zero"}  # with the trainer's HOW_TO_RUN: the same warm-up under another ZeRO stage


def warmup_recipe(recipe: Recipe) -> Recipe:
    """The warm-up's training: the adapter section on every layer (no dropout) for score.warmup_steps on the first
    score.proxy_examples examples, warm-up and cosine decay; the other train settings their defaults."""
    s = recipe.score
    return replace(recipe, adapter=replace(recipe.adapter, dropout=0.0),
                   data=replace(recipe.data, max_train_examples=s.proxy_examples),
                   train=replace(TrainSection(), steps=s.warmup_steps, micro_batch=s.micro_batch, lr=s.warmup_lr,
                                 seed=s.seed, checkpoint_every=0, schedule="cosine"),
                   allocate=replace(recipe.allocate, file=None), parallel=replace(recipe.parallel, ep_size=1))


def warm_up(recipe: Recipe, out: Path) -> Path:
    """Train (or reuse) the all-layer warm-up adapter; returns its export folder."""
    from floe_dist.trainer import HOW_TO_RUN, Trainer, run_settings

    warm, export = warmup_recipe(recipe), out / "warmup" / "adapter"
    # A copied warm-up folder, or one made under another ZeRO stage or on other ranks, is the same warm-up; one of
    # other steps is not (the trainer's own guard would take it as a longer run of the same).
    guard(out / "warmup" / "train_args.json", run_settings(warm), what="a warm-up",
          may_change=HOW_TO_RUN | WARMUP_MAY_CHANGE, write=False)
    if not (export / "export.json").is_file():
        Trainer(warm, str(out / "warmup")).fit()
    return export


def check_before_warmup(recipe: Recipe, world_size: int) -> None:
    """Errors knowable from the arguments and the model config alone."""
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(resolve_model(recipe.model.name)).num_hidden_layers
    if recipe.allocate.k is not None and recipe.allocate.k > num_layers:
        raise ValueError(f"k={recipe.allocate.k} is larger than the number of scored layers ({num_layers})")
    n_examples = min(recipe.score.samples, recipe.score.proxy_examples)
    if n_examples // recipe.score.score_batch < world_size:
        raise ValueError(f"zero samples to score: {n_examples} examples cannot fill one mini-batch of "
                         f"{recipe.score.score_batch} per rank on {world_size} rank(s)")


def scoring_batches(examples, tokenizer, batch: int, rank: int, world: int, max_length: int):
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


def run(recipe: Recipe, output: str = OUTPUT) -> dict:
    recipe.validate(*SECTIONS)
    if recipe.score.select == "budget" and not recipe.allocate.budget:
        raise ValueError("score.select budget needs allocate.budget (adapter parameters)")
    info = Layout.current()
    device = info.torch_device
    out = Path(output)
    check_before_warmup(recipe, info.world_size)  # minutes of warm-up must not precede a bad-input error
    t0 = time.time()
    export = warm_up(recipe, out)
    t_warm = time.time() - t0

    model_dir = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(model_dir)
    config = ds.build_config(recipe.parallel.zero, micro_batch=recipe.score.score_batch, accumulation=1, world_size=info.world_size,
                             lr=1e-9, weight_decay=0.0)
    lm = Resources().backbone(model_dir, recipe.model.quant, Layout.current(1, config), config)  # as training loads it
    load_adapter(lm, export)
    model = AnswerLM(lm)
    adapters = model.adapters_by_layer
    _, shapes = module_shapes(lm)
    k = recipe.allocate.k if recipe.allocate.k is not None else default_k(len(adapters))
    if zero_stage(config) == 3:
        forward, _ = ds.initialize(model, config, lambda step: 1.0)  # partitioned backbone
    else:
        forward = model  # ZeRO-0/1/2 keep full parameters on every rank: gradients need no engine
    forward.eval()  # no dropout: the Fisher of the deterministic model

    examples = load_split(recipe.data, "train", tokenizer)[: min(recipe.score.samples, recipe.score.proxy_examples)]
    batches = list(scoring_batches(examples, tokenizer, recipe.score.score_batch, info.rank, info.world_size,
                                   recipe.model.max_length))
    t1 = time.time()
    local = accumulate_fisher(forward, adapters,
                              ({k_: v.to(device) for k_, v in b.items()} for b in batches),
                              lambda b: forward(**b)["ce"], with_param=recipe.score.mode == "param", device=device,
                              progress=lambda it: tqdm(it, total=len(batches), desc="fisher",
                                                       disable=not info.is_main))
    sums = local.reduce(all_reduce_sum)
    t_score = time.time() - t1

    layers = sorted(adapters)
    scores, kept = select_layers(recipe, sums, adapters, k)
    allocation = selected_allocation(Allocation.load(export / "allocation.json"), kept, recipe)
    allocation.with_parameter_count(shapes)
    result = {
        "mode": recipe.score.mode, "selection": recipe.score.select, "k": len(kept), "selected_layers": kept,
        "scores": {str(l): float(s) for l, s in zip(layers, scores)},
        "fisher_diag": sums.diag.tolist(), "taylor": sums.signed.abs().tolist(),
        "param": sums.param.tolist() if recipe.score.mode == "param" else None, "fisher_block": sums.block.tolist(),
        "samples": sums.samples, "batches": sums.batches, "world_size": info.world_size, "seed": recipe.score.seed,
        "seconds": {"warmup": t_warm, "score": t_score, "total": time.time() - t0},
        "trainable_parameters": allocation.trainable_parameters, "settings": settings_of(recipe, SECTIONS),
    }
    with main_rank_first():  # the ranks leave together, once the files are written (no teardown beside the plot)
        if info.is_main:
            write_json_atomic(out / "fisher.json", result)
            allocation.save(out / "allocation.json")
            plot_scores(out / "fisher.png", layers, scores.tolist(), kept,
                        f"{recipe.score.mode} Fisher, {recipe.data.name}")
            print(f"scored {len(layers)} layers on {sums.samples} samples ({info.world_size} rank(s)); "
                  f"selected {kept} -> {out / 'allocation.json'}")
    return result


def select_layers(recipe: Recipe, sums, adapters: dict, k: int) -> tuple[torch.Tensor, list[int]]:
    """Per-layer scores (in layer order) and the layers the selection keeps."""
    layers = sorted(adapters)
    # ZeRO-3 leaves each rank a partition (numel() is 0 or a shard); ds_numel is the full count
    counts = torch.tensor([sum(getattr(p, "ds_numel", p.numel()) for m in adapters[l] for p in m.adapter_parameters())
                           for l in layers], dtype=torch.float64)
    scores = sums.scores(recipe.score.mode, counts if recipe.score.normalize_param else None)
    if recipe.score.select == "budget":
        kept_idx = select_budget(scores, counts.long().tolist(), recipe.allocate.budget)
    else:
        kept_idx = select_top_k(scores, k)
        if recipe.score.select == "refine":
            kept_idx = refine_with_block(sums.block, kept_idx)
    return scores, [layers[i] for i in kept_idx]


def selected_allocation(warm: Allocation, kept: list[int], recipe: Recipe) -> Allocation:
    """The warm-up allocation restricted to the kept layers, optionally resized."""
    layers = {}
    for layer in kept:
        layers[layer] = {}
        for name, spec in warm.layers[layer].items():
            experts = recipe.score.final_experts or spec.experts
            rank = recipe.score.final_rank or spec.ranks[0]
            layers[layer][name] = ModuleAllocation(experts, (rank,) * experts, spec.router, min(spec.top_k, experts))
    return Allocation(method="floe", target_modules=warm.target_modules, layers=layers, alpha=warm.alpha,
                      dropout=0.05, meta={"selected_by": f"fisher/{recipe.score.mode}/{recipe.score.select}"})


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
