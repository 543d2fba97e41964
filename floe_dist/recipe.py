"""A recipe: one YAML file that describes a whole campaign, section by pipeline stage.

    floe-dist campaign --config recipes/smollm2-sst2.yaml --train.lr 1e-4 --output runs/c
    floe-dist train --config my_recipe.yaml --output runs/t          # one stage of the same recipe
    floe-dist campaign --config tiny --print_config                  # the resolved recipe, as YAML

Parsing, type checking and the dotted command-line overrides are jsonargparse's (the parser behind
LightningCLI): it reads a dataclass tree as it is, so the recipe's sections are the typed dataclasses
below, each field with one default and one help line, and every stage takes the values it needs from
them (``stage_settings``). A setting used by several stages (the model, the adapter's shape, the
ZeRO config) exists once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from floe_dist.assets import asset_dir
from floe_dist.config import arg

DEFAULT_RECIPE = "smollm2-sst2"


@dataclass
class ModelSection:
    """model: the frozen backbone"""
    name: str = arg("smollm2-135m", "smollm2-135m, tiny, a local Hugging Face model folder or a .gguf file")
    quant: str = arg("none", "backbone storage: none (fp32 on CPU, bf16 on GPU) or nf4 (bitsandbytes 4-bit)")
    max_length: int = arg(256, "tokens per example (prompts are cut from the left)")
    shape: str | None = arg(None, "plan only: a built-in architecture (llama3-70b, ...) for when the checkpoint "
                                  "is not on this machine")


@dataclass
class DataSection:
    """data: the task adapted to"""
    task: str = arg("sst2", "sst2, boolq, arithmetic (generative), or a data file/folder (see data_format)")
    data_format: str = arg("auto", "a data file's format: auto, multiple_choice, alpaca, chat or text")
    columns: str = arg("", "a data file's field names: FIELD=COLUMN,... (e.g. instruction=question,output=answer)")
    pack: bool = arg(False, "pack several examples into each max_length row (fewer, fuller rows; training only)")


@dataclass
class AdapterSection:
    """adapter: the LoRA-MoE warmed up on every layer when scoring, and trained on the chosen layers"""
    targets: str = arg("q_proj,v_proj", "comma-separated module names that get adapters")
    experts: int = arg(4, "experts (B heads) per module")
    rank: int = arg(4, "rank of every expert (the search may change it)")
    router: str = arg("dense", "dense (HydraLoRA, FLoE's variant) or topk (MoLA/MixLoRA)")
    top_k: int = arg(2, "experts per token with the topk router")
    alpha: float = arg(32.0, "LoRA alpha (each expert scales by alpha / rank)")
    dropout: float = arg(0.05, "dropout on the adapter input while training")


@dataclass
class ScoreSection:
    """score: the warm-up and the per-layer Fisher scores (used when allocate.method is floe)"""
    mode: str = arg("mask", "Fisher of: mask (a per-layer gate on the adapter output), param or gain")
    normalize_param: bool = arg(False, "param mode: divide by each layer's adapter parameter count")
    proxy_examples: int = arg(128, "training examples used for warm-up and scoring")
    warmup_steps: int = arg(10, "warm-up optimizer steps")
    warmup_lr: float = arg(1e-3, "warm-up peak learning rate")
    micro_batch: int = arg(4, "warm-up examples per rank per step")
    samples: int = arg(128, "examples scored")
    score_batch: int = arg(8, "examples per Fisher mini-batch (one gradient per mini-batch)")
    select: str = arg("topk", "selection: topk, budget or refine")
    seed: int = arg(0, "seed of the warm-up")


@dataclass
class AllocateSection:
    """allocate: where adapters go and how big they are"""
    method: str = arg("uniform", "uniform (every layer), floe (Fisher scores of the score stage), random, flexora, "
                                 "hilo or guilomo")
    file: str | None = arg(None, "an allocation.json to use as it is (skips score and allocate)")
    k: int | None = arg(None, "layers kept (floe, random; flexora: top-k instead of alpha > 0); default 25%")
    budget: int | None = arg(None, "adapter parameters: scale every rank by one factor to come closest to it")
    seed: int = arg(0, "random: seed of the layer draw")
    top_p: float = arg(0.0, "HILO top-p activation (0 = plain top-k)")
    min_k: int = arg(1, "with top_p: the fewest experts a token uses")
    expert_schedule: str = arg("2468", "hilo: experts per layer group, e.g. 2468, 8642 or uniform")
    rank_schedule: str = arg("uniform", "hilo: rank per layer group, e.g. 2468, 8642 or uniform")
    flexora_steps: int = arg(50, "flexora: alternating steps (one LoRA step + one alpha step each)")
    flexora_batch: int = arg(8, "flexora: training examples per LoRA step")
    flexora_val: int = arg(200, "flexora: training examples held out for the alpha steps")
    flexora_lr: float = arg(1e-3, "flexora: learning rate of the LoRA steps during the search")
    guilomo_steps: int = arg(40, "guilomo: bilevel steps")
    guilomo_order: str = arg("second", "guilomo: second (DARTS implicit term) or first")
    guilomo_batch: int = arg(8, "guilomo: training examples per batch")
    guilomo_experts: int = arg(8, "guilomo: experts per module during the search")
    guilomo_rank: int = arg(8, "guilomo: rank of each expert during the search")
    guilomo_lr: float = arg(3e-4, "guilomo: learning rate of the lower level (adapters)")


@dataclass
class SearchSection:
    """search: SMAC picks the rank and learning rate from short parallel trials"""
    enabled: bool = arg(True, "false: train the allocation as it is, at train.lr")
    mode: str = arg("smac", "smac (multi-fidelity BO over steps), bo (every trial at max_steps), random (smac's "
                            "fidelities and halving, random configurations) or grid")
    surrogate: str = arg("rf", "smac/bo: the surrogate model, rf (random forest) or gp (Gaussian process)")
    random_interleave: float = arg(0.0, "smac/bo: share of proposals drawn at random instead of from the model (the "
                                        "initial design explores; SMAC's own default is 0.2)")
    model_min_points: int = arg(0, "smac: results a budget needs before the model learns from it; 0 = the "
                                   "space's dimensions + 1, as BOHB")
    model_data: str = arg("budget", "smac: the model learns from one budget's results (budget) or from every "
                                    "configuration at the highest budget it reached (pooled)")
    pending: str = arg("none", "smac/bo: proposals not yet run count, for the model, as none (SMAC's way) or worst "
                               "(a constant liar, so that a rung's proposals spread)")
    ranks: str = arg("2,4,8,16", "rank choices")
    lr: str = arg("2e-4:3e-3", "learning rate: LO:HI searched on a log scale, or one fixed value")
    experts: str = arg("", "experts-per-module choices, e.g. 2,4,8; empty keeps the allocation's")
    top_ks: str = arg("", "experts-per-token choices of top-k routers, e.g. 1,2; empty keeps the allocation's")
    allocations: str = arg("uniform", "let the search also choose the allocation: the allocate stage's and these, "
                                      "comma-separated: uniform (every layer), random (as many layers, seeded), floe:K (Fisher "
                               "top-K; allocate.method floe) or NAME=FILE; allocate.budget, if set, sizes them all")
    min_steps: int = arg(8, "smallest trial budget in optimizer steps (smac mode)")
    max_steps: int = arg(24, "largest trial budget; every bo and grid trial uses it")
    eta: int = arg(3, "successive-halving ratio between budgets")
    brackets: str = arg("hyperband", "hyperband (with the default budgets: 3 configurations at 8 steps, the best "
                                     "promoted to 24, then 2 proposed straight at 24) or sh (successive halving)")
    max_trials: int = arg(40, "stop issuing trials after this many (a bracket starts only if all of it fits)")
    max_compute: float = arg(4.0, "stop issuing trials before their steps pass this many max_steps trials")
    initial_configs: int = arg(3, "random configurations before the surrogate model takes over")
    objective: str = arg("loss", "loss (validation choice cross-entropy) or error (1 - accuracy)")
    micro_batch: int = arg(4, "trial training: examples per rank per step")
    zero: str = arg("0", "trial training: DeepSpeed config (0, 2, 3 or a JSON path)")
    val_limit: int | None = arg(100, "score trials on the first N validation examples only")
    seed: int = arg(0, "seed of SMAC's sampling")
    trial_seed: int = arg(0, "seed of every trial's training")
    runner: str = arg("local", "local (worker processes), slurm (a job per trial) or slurm-array")
    trial_workers: str = arg("auto", "warm (workers load once, run trial after trial), cold or auto (warm locally, "
                                     "a job per trial on Slurm)")
    workers: int | None = arg(None, "concurrent trials; default: as many as the machine holds")
    trial_nproc: int = arg(1, "ranks per trial")
    trial_launcher: str = arg("torchrun", "torchrun or deepspeed (trials of more than one rank)")
    trial_threads: int = arg(1, "CPU threads per trial rank (local runner)")
    trial_timeout: float = arg(3600.0, "seconds before a trial is killed and recorded as a timeout")
    sbatch_args: str = arg("", "slurm runners: extra sbatch flags")


@dataclass
class TrainSection:
    """train: the final training of the chosen adapter"""
    steps: int = arg(400, "optimizer steps")
    micro_batch: int = arg(4, "examples per rank per micro-step")
    accumulation: int = arg(1, "micro-steps per optimizer step")
    lr: float = arg(1e-3, "peak learning rate when the search is off (the search's choice otherwise)")
    warmup_ratio: float = arg(0.1, "share of steps used for learning-rate warm-up")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    balance_coef: float = arg(0.01, "weight of the Switch load-balancing loss (top-k routers)")
    split: str = arg("train", "training split: train, or fit (train minus the search's validation quarter)")
    seed: int = arg(0, "seed for adapter init, data order and dropout")
    checkpoint_every: int = arg(20, "save a resumable checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = arg(2, "checkpoints kept on disk")
    gradient_checkpointing: bool = arg(False, "recompute decoder activations in backward to save memory")
    capacity_factor: float = arg(0.0, "expert capacity as a multiple of an even share (0 = never drop)")


@dataclass
class EvaluateSection:
    """evaluate: zero-shot and final accuracy (generative tasks: exact match) on the test split"""
    batch_size: int = arg(32, "examples per forward pass")
    limit: int | None = arg(None, "evaluate only the first N test examples")
    max_new_tokens: int = arg(32, "generative tasks: tokens generated per example at most")
    stop: str = arg("\\n", "generative tasks: stop at any of these strings, separated by '||' (\\n = newline)")


@dataclass
class ParallelSection:
    """parallel: ranks, nodes and how they start"""
    nproc: int = arg(1, "ranks per node for score and train (local processes, or GPUs per node): as many as pay "
                        "on the machine (one on a small CPU box, every GPU on a GPU node)")
    nodes: int = arg(1, "nodes (more than 1 needs launcher srun, inside an sbatch job)")
    launcher: str = arg("local", "local (torchrun on this machine) or srun (inside an sbatch job; slurm/)")
    zero: str = arg("0", "DeepSpeed config for score and train: 0, 2, 3 (zero_configs/) or a JSON path; 3 "
                         "partitions a backbone too big for one device")
    ep_size: int = arg(1, "expert parallelism: ranks that split every MoE module's experts")
    gpus_per_node: int = arg(0, "GPUs per node to request from Slurm (0 on CPU clusters)")


@dataclass
class Recipe:
    """A campaign: model, data, adapter, the stages' settings and the cluster layout."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    score: ScoreSection = field(default_factory=ScoreSection)
    allocate: AllocateSection = field(default_factory=AllocateSection)
    search: SearchSection = field(default_factory=SearchSection)
    train: TrainSection = field(default_factory=TrainSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 1e-3, ...}``: the form the resume guard compares."""
        return {f"{s.name}.{f.name}": getattr(getattr(self, s.name), f.name)
                for s in fields(self) for f in fields(getattr(self, s.name))}


# ----------------------------------------------------------------------------------------- parsing
def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(asset_dir("recipes").glob("*.yaml"))}


def recipe_path(name_or_path: str) -> Path:
    """A recipe file, or the name of a shipped one (``tiny``, ``smollm2-sst2``, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise FileNotFoundError(f"recipe {name_or_path!r}: no such file, and not a shipped recipe "
                            f"({', '.join(shipped)})")


def recipe_parser(prog: str = "floe-dist", description: str | None = None):
    """jsonargparse parser of a Recipe: ``--config FILE`` and dotted ``--section.key value`` settings."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="recipe file or shipped recipe name; later --section.key flags override it")
    parser.add_class_arguments(Recipe, fail_untyped=True, sub_configs=False)
    add_metadata_help(parser)
    return parser


def add_metadata_help(parser) -> None:
    """jsonargparse takes help from docstrings; ours is each field's ``arg()`` metadata."""
    helps = {f"{s.name}.{f.name}": f.metadata["help"] for s in fields(Recipe) for f in fields(s.default_factory)}
    for action in parser._actions:
        if action.dest in helps:
            action.help = helps[action.dest]
    for f in fields(Recipe):  # group titles: the section docstrings ("train: the final training ...")
        if f.name in getattr(parser, "groups", {}):
            parser.groups[f.name].title = f.default_factory.__doc__


def load_recipe(config: str | None = None, overrides: list[str] = ()) -> Recipe:
    """The recipe in ``config`` (default: the shipped default recipe) with dotted ``overrides`` applied."""
    from jsonargparse import ArgumentError

    parser = recipe_parser()
    argv = ["--config", str(recipe_path(config or DEFAULT_RECIPE)), *overrides]
    try:
        cfg = parser.parse_args(argv)
    except ArgumentError as err:  # unknown keys, wrong types: the message names them
        raise ValueError(f"bad recipe: {err}") from None
    return recipe_from_namespace(parser, cfg)


def recipe_from_namespace(parser, cfg) -> Recipe:
    built = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    return Recipe(**{f.name: getattr(built, f.name) for f in fields(Recipe)})


def dump_recipe(recipe: Recipe) -> str:
    import yaml
    from dataclasses import asdict

    return yaml.safe_dump(asdict(recipe), sort_keys=False)


def write_recipe(folder: Path, recipe: Recipe) -> Path:
    """The fully resolved recipe beside a stage's outputs (``recipe.yaml``)."""
    from floe_dist.allocation import write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(folder / "recipe.yaml", dump_recipe(recipe))


def read_recipe(path: Path) -> Recipe:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return Recipe(**{f.name: f.default_factory(**data.get(f.name, {})) for f in fields(Recipe)})


# ------------------------------------------------------------------------- recipe -> stage settings
# Where each stage looks for its settings, first section first (score.seed before allocate.seed).
SOURCES = {
    "score": ("score", "adapter", "allocate", "model", "data", "parallel"),
    "allocate": ("allocate", "adapter", "model", "data"),
    "search": ("search", "model", "data"),
    "train": ("train", "adapter", "model", "data", "parallel"),
    "evaluate": ("evaluate", "model", "data"),
}


def stage_settings(stage: str, recipe: Recipe, stage_fields: list[str]) -> dict[str, Any]:
    """The values of a stage's arguments (``stage_fields``) that the recipe sets."""
    if stage == "plan":
        return plan_settings(recipe)
    if stage == "slurm":
        p = recipe.parallel
        return {"nodes": p.nodes, "tasks_per_node": p.nproc, "gpus_per_node": p.gpus_per_node}
    found = {"model": recipe.model.name, "allocation": recipe.allocate.file}
    for section in reversed(SOURCES.get(stage, ())):
        found.update(vars(getattr(recipe, section)))
    return {name: found[name] for name in stage_fields if name in found}


def plan_settings(recipe: Recipe) -> dict[str, Any]:
    r = recipe
    zero = int(r.parallel.zero) if r.parallel.zero in ("0", "1", "2", "3") else 3
    return {"model": r.model.shape or r.model.name, "allocation": r.allocate.file,
            "quant": "nf4" if r.model.quant == "nf4" else "bf16", "targets": r.adapter.targets,
            "experts": r.adapter.experts, "rank": r.adapter.rank, "top_k": r.adapter.top_k,
            "nodes": r.parallel.nodes, "gpus_per_node": r.parallel.nproc, "zero": zero,
            "ep_size": r.parallel.ep_size, "micro_batch": r.train.micro_batch, "seq_len": r.model.max_length,
            "accumulation": r.train.accumulation, "gradient_checkpointing": r.train.gradient_checkpointing}


def section_of(stage: str, name: str) -> str | None:
    """The recipe section a stage's argument comes from (its ``--help`` group), if any."""
    if name in ("model", "allocation") and stage in SOURCES:
        return "model" if name == "model" else "allocate"
    for section in SOURCES.get(stage, ()):
        if name in {f.name for f in fields(getattr(Recipe, "__dataclass_fields__")[section].default_factory)}:
            return section
    return None
