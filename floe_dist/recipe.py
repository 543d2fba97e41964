"""A recipe: every setting of floe-dist, once, in one typed tree with a section per pipeline stage.

    floe-dist campaign --config recipes/smollm2-sst2.yaml --train.lr 1e-4 --output runs/c
    floe-dist train --config my_recipe.yaml --output runs/t          # one stage of the same recipe
    floe-dist train --print_config                                   # the settings a stage runs with

Each field has one default, one type and one help line; the defaults *are* the default campaign
(``recipes/smollm2-sst2.yaml`` only writes them out), so a stage run alone trains what the default
campaign trains. Every stage and the campaign parse this tree with jsonargparse (the parser behind
LightningCLI and litgpt) and take the sections they need as these objects. Stage-only options live
in their stage's section (``search.candidates``, ``evaluate.split``). Choices are ``Literal`` types,
so a misspelt value fails while parsing; ``validate`` adds the checks a type cannot express.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from functools import reduce
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from floe_dist.assets import asset_dir
from floe_dist.config import (
    Compact,
    Duration,
    LearningRates,
    Names,
    Pairs,
    Ranks,
    Schedule,
    StopStrings,
    ZeroConfig,
    arg,
    below_one,
    comma_list,
    duration_seconds,
    register_compact_types,
)

DEFAULT_RECIPE = "smollm2-sst2"


@dataclass
class ModelSection:
    """model: the frozen backbone (and, for evaluate and generate, the adapter on it)"""
    name: str = arg("smollm2-135m", "smollm2-135m, tiny, a local Hugging Face model folder or a .gguf file")
    quant: Literal["none", "nf4"] = arg("none", "backbone storage: none (fp32 on CPU, bf16 on GPU) or nf4 "
                                                "(bitsandbytes 4-bit)")
    max_length: int = arg(256, "tokens per example (prompts are cut from the left)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = arg(
        "sdpa", "attention kernel: torch's SDPA, eager, or FlashAttention 2 (the flash-attn package, GPUs)")
    shape: str | None = arg(None, "plan only: a built-in architecture (llama3-70b, ...) for when the checkpoint "
                                  "is not on this machine", resume="runs")
    adapter: str | None = arg(None, "evaluate, generate: an adapter export folder written by train; none = the "
                                    "base model", resume="runs")

    def problems(self) -> list[str]:
        found = []
        if self.max_length < 2:  # a prompt token and an answer token, packed or not
            found.append(f"model.max_length must be >= 2 (a prompt token and an answer token), got {self.max_length}")
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            found.append("model.attn_implementation flash_attention_2 needs the flash-attn package (pip install "
                         "flash-attn, on a CUDA machine); use sdpa or eager")
        return found


SOURCE_KEYS = ("task", "weight", "data_format", "columns", "roles", "hub_config", "hub_split", "hub_revision")


@dataclass
class DataSection:
    """data: the task adapted to"""
    task: str = arg("sst2", "sst2, boolq, arithmetic (generative), a data file, a save_to_disk or hub-style folder, "
                            "or a hub dataset owner/name (see data_format)")
    hub_config: str | None = arg(None, "a hub dataset's (or hub-style folder's) configuration, e.g. main for "
                                       "openai/gsm8k")
    hub_split: str = arg("train", "the split of a hub dataset (or hub-style folder) read as the task, e.g. "
                                  "train_sft; floe-dist cuts its own test/val splits from it")
    hub_revision: str | None = arg(None, "a hub dataset's revision: a branch, tag or commit")
    streaming: bool = arg(False, "read the training data as a stream, never whole (corpora that do not fit a "
                                 "rank's memory): test_size and val_size are then counts of the stream's first "
                                 "examples, read in the source's order")
    data_format: Literal["auto", "multiple_choice", "alpaca", "chat", "sharegpt", "text"] = arg(
        "auto", "a data file's format (sharegpt: chat with conversations of from/value and human/gpt roles)")
    columns: Pairs = arg("", "a data file's field names: FIELD=COLUMN,... (e.g. instruction=question,output=answer; "
                           "meta.question for a nested field; chat also role=from,content=value)")
    roles: Pairs = arg("", "chat: your role names as YOURS=ROLE,... (e.g. human=user,gpt=assistant)")
    train_on: Literal["all_assistant", "last_assistant"] = arg(
        "all_assistant", "chat: train on every assistant turn, or on the last one only")
    chat_template: str = arg("", "chat: the tokenizer's own template (empty), chatml, or a Jinja file")
    system_prompt: str = arg("", "alpaca: replaces the preamble; chat: a system turn where a conversation has none")
    pack: bool = arg(False, "pack several examples into each max_length row (fewer, fuller rows; training only)")
    max_train_examples: int | None = arg(None, "use only the first N training examples")
    sources: list[dict[str, Any]] = arg([], "a mixture instead of task: a list of {task, weight, data_format, "
                                            "columns, roles, hub_config, hub_split, hub_revision} (weight: share "
                                            "of the training examples)")
    eval_task: str | None = arg(None, "a separate evaluation file (read like task): it is the test split, and "
                                      "all of task is training data")
    test_size: float = arg(5 / 16, "test examples per source: a fraction (< 1) or a count")
    val_size: float = arg(1 / 4, "the search's validation part of the training split: a fraction (< 1) or a count")

    def __post_init__(self):
        """A source's columns and roles as YAML maps, like data.columns and data.roles, become their strings; a null
        test_size or val_size (what recipes saved before they had defaults say) is the default."""
        def written(value):  # another shape stays as it is: problems() names it
            return value if (compact := Pairs.join(value)) is None else compact

        self.sources = [{**s, **{k: written(s[k]) for k in ("columns", "roles") if k in s}}
                        if isinstance(s, dict) else s for s in self.sources]
        self.test_size = DataSection.test_size if self.test_size is None else self.test_size
        self.val_size = DataSection.val_size if self.val_size is None else self.val_size

    def problems(self) -> list[str]:
        found = []
        for i, source in enumerate(self.sources):
            if not isinstance(source, dict):
                found.append(f"data.sources[{i}]: expected a map of {', '.join(SOURCE_KEYS)}, got {source!r}")
                continue
            found += [f"data.sources[{i}].{k}: expected {Pairs.accepts}, got {source[k]!r}"
                      for k in ("columns", "roles") if k in source and not isinstance(source[k], str)]
            unknown = sorted(set(source) - set(SOURCE_KEYS))
            if unknown or not source.get("task"):
                found.append(f"data.sources[{i}]: needs a task; its keys are {', '.join(SOURCE_KEYS)}"
                             + (f" (not {unknown})" if unknown else ""))
            elif not float(source.get("weight", 1.0)) > 0:
                found.append(f"data.sources[{i}]: weight must be > 0, got {source['weight']}")
        if self.sources and self.task != DataSection.task:
            found.append("give data.task or data.sources, not both")
        for name in ("test_size", "val_size"):
            size = getattr(self, name)
            if size < 0 or (size >= 1 and size != int(size)):
                found.append(f"data.{name} must be a fraction in [0, 1) or a whole count, got {size}")
        if self.eval_task and self.test_size not in (0, DataSection.test_size):
            found.append("give data.eval_task or data.test_size, not both")
        if self.streaming:
            if self.sources or self.pack:
                found.append("data.streaming reads one task, unpacked: it takes neither data.sources nor data.pack")
            if not self.eval_task and self.test_size < 1:
                found.append("data.streaming needs data.test_size as a count of examples (the first N of the "
                             "stream are the test split; its length is not known before it is read) or "
                             "data.eval_task (a separate test file)")
        return found

    @property
    def name(self) -> str:
        """What the data is called in summaries: the task, or the mixture's tasks."""
        return "+".join(str(s["task"]) for s in self.sources) if self.sources else self.task


@dataclass
class AdapterSection:
    """adapter: the LoRA-MoE shape (score warms it up on every layer; allocators and train place and size it)"""
    targets: Names = arg("q_proj,v_proj", "comma-separated module names that get adapters")
    experts: int = arg(4, "experts (B heads) per module")
    rank: int = arg(4, "rank of every expert (the search may change it)")
    router: Literal["dense", "topk"] = arg("dense", "dense (HydraLoRA, FLoE's variant) or topk (MoLA/MixLoRA)")
    top_k: int = arg(2, "experts per token with the topk router; with top_p, the most")
    top_p: float = arg(0.0, "HILO's top-p activation: a token uses its fewest top experts whose router "
                            "probability reaches this (0 = plain top-k)")
    min_k: int = arg(1, "with top_p: the fewest experts a token uses")
    alpha: float = arg(32.0, "LoRA alpha (each expert scales by alpha / rank)")
    dropout: float = arg(0.05, "dropout on the adapter input while training")

    @property
    def target_list(self) -> list[str]:
        return comma_list(self.targets)

    def problems(self) -> list[str]:
        found = below_one(self, ("experts", "rank", "top_k", "min_k"), "adapter")
        if not 0 <= self.top_p <= 1:
            found.append(f"adapter.top_p must be in [0, 1] (0 = plain top-k), got {self.top_p}")
        if not self.target_list:
            found.append("adapter.targets names no module")
        return found


@dataclass
class ScoreSection:
    """score: the warm-up and the per-layer Fisher scores (allocate.method floe)"""
    mode: Literal["mask", "param", "taylor"] = arg("mask", "Fisher of: mask (a per-layer gate on the adapter "
                                                           "output), param (the adapter parameters) or taylor")
    normalize_param: bool = arg(False, "param mode: divide by each layer's adapter parameter count")
    proxy_examples: int = arg(128, "training examples used for warm-up and scoring")
    warmup_steps: int = arg(10, "warm-up optimizer steps")
    warmup_lr: float = arg(1e-3, "warm-up peak learning rate")
    micro_batch: int = arg(4, "warm-up examples per rank per step")
    samples: int = arg(128, "examples scored (a multiple of score_batch x ranks is used)")
    score_batch: int = arg(8, "examples per Fisher mini-batch (one gradient per mini-batch)")
    select: Literal["topk", "budget", "refine"] = arg(
        "topk", "topk (allocate.k layers), budget (knapsack on allocate.budget parameters) or refine (top-k, then "
                "swaps that lower the block-Fisher estimate of the loss increase)")
    final_experts: int | None = arg(None, "experts per module in the selected allocation (default: the warm-up's)")
    final_rank: int | None = arg(None, "rank in the selected allocation (default: the warm-up's)")
    seed: int = arg(0, "seed of the warm-up")

    def problems(self) -> list[str]:
        return below_one(self, ("proxy_examples", "warmup_steps", "micro_batch", "samples", "score_batch"), "score")


@dataclass
class FlexoraSection:
    """allocate.flexora: layer selection as hyper-parameter optimisation (unrolled differentiation)"""
    steps: int = arg(50, "alternating steps (one LoRA step + one alpha step each)")
    batch: int = arg(8, "training examples per LoRA step")
    val: int = arg(200, "training examples held out for the alpha steps")
    lr: float = arg(1e-3, "learning rate of the LoRA steps during the search")


@dataclass
class GuiLoMoSection:
    """allocate.guilomo: guided selection vectors learned by bilevel optimisation"""
    steps: int = arg(40, "bilevel steps (each takes two training batches)")
    order: Literal["second", "first"] = arg("second", "second (DARTS implicit term, 5 passes a step) or first (2)")
    batch: int = arg(8, "training examples per batch")
    experts: int = arg(8, "experts per module during the search (the most it can keep)")
    rank: int = arg(8, "rank of each expert during the search (the most it can keep)")
    lr: float = arg(3e-4, "learning rate of the lower level (adapters)")


@dataclass
class HiloSection:
    """allocate.hilo: hierarchical expert number and rank per layer group"""
    expert_schedule: Schedule = arg("2468", "experts per layer group, e.g. 2468, 8642 or uniform")
    rank_schedule: Schedule = arg("uniform", "rank per layer group, e.g. 2468, 8642 or uniform")


@dataclass
class AllocateSection:
    """allocate: where adapters go and how big they are"""
    method: str = arg("uniform", "uniform (every layer), floe (Fisher scores of the score stage), random, flexora, "
                                 "hilo or guilomo")
    file: str | None = arg(None, "an allocation.json to use as it is (skips score and allocate; train and search "
                                 "read it; none = the adapter section on every layer)")
    scores: str | None = arg(None, "floe, run alone: the fisher.json the score stage wrote")
    k: int | None = arg(None, "layers kept (floe, random, score; flexora: top-k instead of alpha > 0); default "
                              "25% of the layers")
    budget: int | None = arg(None, "adapter parameters: scale every rank by one factor to come closest to it (score "
                                   "select budget: the knapsack's limit)")
    seed: int = arg(0, "random: seed of the layer draw")
    flexora: FlexoraSection = field(default_factory=FlexoraSection)
    guilomo: GuiLoMoSection = field(default_factory=GuiLoMoSection)
    hilo: HiloSection = field(default_factory=HiloSection)

    def problems(self) -> list[str]:
        found = below_one(self.flexora, ("steps", "batch"), "allocate.flexora")
        found += below_one(self.guilomo, ("steps", "batch", "rank"), "allocate.guilomo")
        if self.guilomo.experts < 2:
            found.append(f"allocate.guilomo.experts must be >= 2 (the search always keeps 2), got "
                         f"{self.guilomo.experts}")
        if self.k is not None and self.k < 1:
            found.append(f"allocate.k must be >= 1, got {self.k}")
        if self.budget is not None and self.budget < 1:
            found.append(f"allocate.budget must be a positive parameter count, got {self.budget}")
        if self.file and not Path(self.file).is_file():
            found.append(f"allocate.file {self.file}: file not found")
        return found


@dataclass
class SearchSection:
    """search: SMAC picks the rank and learning rate from short parallel trials"""
    enabled: bool = arg(True, "campaign: false trains the allocation as it is, at train.lr", resume="campaign")
    mode: Literal["smac", "bo", "random", "grid"] = arg(
        "smac", "smac (multi-fidelity BO over steps), bo (every trial at max_steps), random (smac's fidelities and "
                "halving, random configurations) or grid (every point at max_steps, to compare against)")
    surrogate: Literal["rf", "gp"] = arg("rf", "smac/bo: the surrogate model, rf (random forest) or gp "
                                               "(Gaussian process)")
    random_interleave: float = arg(0.0, "smac/bo: share of proposals drawn at random instead of from the model (the "
                                        "initial design explores; SMAC's own default is 0.2)")
    model_min_points: int = arg(0, "smac: results a budget needs before the model learns from it; 0 = the "
                                   "space's dimensions + 1, as BOHB")
    model_data: Literal["budget", "pooled"] = arg(
        "budget", "smac: the model learns from one budget's results (budget) or from every configuration at the "
                  "highest budget it reached (pooled)")
    pending: Literal["none", "worst"] = arg(
        "none", "smac/bo: proposals not yet run count, for the model, as none (SMAC's way) or worst (a constant "
                "liar, so that a rung's proposals spread)")
    ranks: Ranks = arg("2,4,8,16", "rank choices: the largest rank of the allocation, whose other ranks scale with it")
    lr: LearningRates = arg("2e-4:3e-3", "learning rate: LO:HI searched on a log scale, or one fixed value")
    experts: Ranks = arg("", "experts-per-module choices, e.g. 2,4,8; empty keeps the allocation's")
    top_ks: Ranks = arg("", "experts-per-token choices of top-k routers, e.g. 1,2; empty keeps the allocation's")
    allocations: Names = arg("uniform", "campaign: let the search also choose the allocation: the allocate stage's "
                                      "and these, comma-separated: uniform (every layer), random (as many "
                                      "layers, seeded), floe:K (Fisher top-K; allocate.method floe) or NAME=FILE",
                               resume="campaign")
    candidates: Pairs = arg("", "search run alone: allocations to choose among, NAME=FILE,... (the campaign makes "
                              "them from search.allocations); empty: allocate.file")
    min_steps: int = arg(8, "smallest trial budget in optimizer steps (smac, random)")
    max_steps: int = arg(24, "largest trial budget; every bo and grid trial uses it")
    eta: int = arg(3, "successive-halving ratio between budgets")
    brackets: Literal["hyperband", "sh"] = arg(
        "hyperband", "hyperband (with the default budgets: 3 configurations at 8 steps, the best promoted to 24, "
                     "then 2 proposed straight at 24) or sh (successive halving)")
    max_trials: int = arg(40, "stop issuing trials after this many (a bracket starts only if all of it fits)",
                          resume="length")
    max_compute: float = arg(4.0, "stop issuing trials before their steps pass this many max_steps trials",
                             resume="length")
    initial_configs: int = arg(3, "random configurations before the surrogate model takes over")
    grid_lr_points: int = arg(3, "grid mode: learning rates tried, log-spaced over lr")
    objective: Literal["loss", "error"] = arg("loss", "loss (validation choice cross-entropy) or error "
                                                      "(1 - accuracy)")
    separation: float = arg(2.0, "paired standard errors (over the validation examples) by which the lowest "
                                 "validation cost must beat a configuration with fewer adapter parameters to be "
                                 "chosen over it; 0: the lowest cost always")
    failed_cost: float = arg(10.0, "cost SMAC is told for a crashed or timed-out trial (above any real cost)")
    micro_batch: int | None = arg(None, "trial training: examples per rank per step; none = the final run's global "
                                        "batch (so that a trial is the start of the final run and continues into it)")
    zero: ZeroConfig = arg("0", "trial training: DeepSpeed config (0, 2, 3 or a JSON path)")
    val_limit: int | None = arg(100, "score trials on the first N validation examples only")
    trial_accuracy: bool = arg(False, "generative tasks with objective loss: also generate each trial's answers to "
                                      "record its validation accuracy (two thirds of a trial's validation time; "
                                      "multiple-choice tasks record it at no cost)")
    seed: int = arg(0, "seed of SMAC's sampling")
    trial_seed: int = arg(0, "seed of every trial's training (the same for all: a deterministic objective)")
    runner: Literal["local", "slurm", "slurm-array"] = arg(
        "local", "local (worker processes), slurm (a job per trial) or slurm-array (trials that start together "
                 "as one job array)", resume="runs")
    trial_workers: Literal["auto", "warm", "cold"] = arg(
        "auto", "warm (workers load once, run trial after trial), cold (a process or job per trial) or auto "
                "(warm locally, a job per trial on Slurm)", resume="runs")
    workers: int | None = arg(None, "concurrent trials; default: as many as the machine holds", resume="runs")
    trial_nproc: int = arg(1, "ranks per trial")
    trial_launcher: Literal["torchrun", "deepspeed"] = arg("torchrun", "torchrun or deepspeed (trials of more "
                                                                       "than one rank)")
    trial_threads: int = arg(1, "CPU threads per trial rank (local runner)", resume="runs")
    trial_timeout: float = arg(3600.0, "seconds before a trial is killed and recorded as a timeout", resume="runs")
    time_limit: float | None = arg(None, "seconds the search may take from its stage's start: no trial (or bracket) "
                                         "starts that would not end by then at the trials' measured speed (the "
                                         "campaign sets it from campaign.budget); none: max_compute alone",
                                   resume="length")
    trial_module: str = arg("floe_dist.search.trial", "trial program: `python -m MODULE TRIAL_DIR`, and its "
                                                      "run_trial(trial_dir, resources) on warm workers")
    sbatch_args: str = arg("", "slurm runners: extra sbatch flags, e.g. '--partition=gpu --gres=gpu:1'", resume="runs")

    def rank_choices(self) -> list[int]:
        return int_list(self.ranks, "search.ranks")

    def expert_choices(self) -> list[int]:
        return int_list(self.experts, "search.experts") if self.experts.strip() else []

    def top_k_choices(self) -> list[int]:
        return int_list(self.top_ks, "search.top_ks") if self.top_ks.strip() else []

    def candidate_files(self) -> dict[str, str]:
        """{name: allocation file} of ``candidates`` (empty without)."""
        found = {}
        for item in (i.strip() for i in self.candidates.split(",") if i.strip()):
            name, eq, path = item.partition("=")
            if not eq or not name.strip() or not path.strip():
                raise ValueError(f"search.candidates must be NAME=FILE,..., got {item!r}")
            if name.strip() in found:
                raise ValueError(f"search.candidates names {name.strip()!r} twice")
            found[name.strip()] = path.strip()
        return found

    def lr_range(self) -> tuple[float, float]:
        try:
            lo, _, hi = self.lr.partition(":")
            lo_f = float(lo)
            hi_f = float(hi) if hi else lo_f
        except ValueError:
            raise ValueError(f"search.lr must be LO:HI or one value, got {self.lr!r}") from None
        if not 0 < lo_f <= hi_f:
            raise ValueError(f"search.lr needs 0 < LO <= HI, got {self.lr!r}")
        return lo_f, hi_f

    def problems(self) -> list[str]:
        found = []
        for check in (self.rank_choices, self.expert_choices, self.top_k_choices, self.lr_range, self.candidate_files):
            try:
                check()
            except ValueError as err:
                found.append(str(err))
        if self.max_steps < 1 or (self.mode in ("smac", "random") and not 1 <= self.min_steps <= self.max_steps):
            found.append(f"need 1 <= search.min_steps <= search.max_steps, got {self.min_steps} and {self.max_steps}")
        if self.eta < 2:
            found.append("search.eta must be >= 2")
        found += below_one(self, ("max_trials", "grid_lr_points", "trial_nproc", "trial_threads", "initial_configs"),
                           "search")
        if self.micro_batch is not None and self.micro_batch < 1:
            found.append(f"search.micro_batch must be >= 1 (or none), got {self.micro_batch}")
        if self.model_min_points < 0:
            found.append(f"search.model_min_points must be >= 0 (0 = automatic), got {self.model_min_points}")
        if self.workers is not None and self.workers < 1:
            found.append("search.workers must be >= 1")
        if not 0 <= self.random_interleave <= 1:
            found.append(f"search.random_interleave must be in [0, 1], got {self.random_interleave}")
        if self.separation < 0:
            found.append(f"search.separation must be >= 0, got {self.separation}")
        if self.max_compute <= 0 or self.trial_timeout <= 0:
            found.append("search.max_compute and search.trial_timeout must be > 0")
        if self.time_limit is not None and self.time_limit <= 0:
            found.append(f"search.time_limit must be > 0 seconds (or none), got {self.time_limit}")
        try:
            found += [f"search.candidates {name}={path}: file not found"
                      for name, path in self.candidate_files().items() if not Path(path).is_file()]
        except ValueError:
            pass
        return found


def int_list(text: str, key: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"{key} must be comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"{key} needs integers >= 1, got {text!r}")
    return values


@dataclass
class TrainSection:
    """train: the final training of the chosen adapter"""
    steps: int = arg(400, "optimizer steps", resume="length")
    micro_batch: int = arg(4, "examples per rank per micro-step", resume="layout")
    accumulation: int = arg(1, "micro-steps per optimizer step", resume="layout")
    lr: float = arg(1e-3, "peak learning rate after a linear warm-up (the campaign uses the search's choice)")
    warmup_ratio: float = arg(0.02, "share of steps used for learning-rate warm-up (the default: 8 of 400 steps, so that "
                                    "the search's shortest trials, the final run's first steps, reach the peak rate)")
    warmup_steps: int | None = arg(None, "warm-up steps instead of warmup_ratio x steps (the campaign fixes them "
                                         "before its search, so that trials and final run share one warm-up)")
    schedule: Literal["wsd", "cosine"] = arg(
        "wsd", "after warm-up: wsd (constant, then a 1-sqrt cooldown to 0 over the last decay_ratio of the steps: "
               "a shorter run is the prefix of a longer one, so search trials continue into the final run) or cosine "
               "(cosine decay to a tenth over all steps)")
    decay_ratio: float = arg(0.2, "wsd: share of the steps in the final cooldown")
    until: int | None = arg(None, "stop after this step, as the prefix of a run of train.steps steps (search trials "
                                  "do; none = train.steps)", resume="length")
    time_limit: float | None = arg(None, "seconds this run may take from its start: it measures its steps and sets "
                                         "their number to what fits, the cooldown ending at the limit (the campaign "
                                         "sets it from campaign.budget); none: train.steps", resume="length")
    eval_reserve: float | None = arg(None, "with time_limit: seconds kept after this run for a generative final "
                                           "evaluation's scoring; four fifths in, the run times a batch of it with "
                                           "its adapter and trains on in what it will not need (the campaign sets "
                                           "it)", resume="length")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    balance_coef: float = arg(0.01, "weight of the Switch load-balancing loss (top-k routers)")
    split: Literal["train", "fit"] = arg("train", "training split: train, or fit (train minus the search's "
                                                  "validation quarter)")
    seed: int = arg(0, "seed for adapter init, data order and dropout")
    checkpoint_every: int = arg(20, "save a resumable checkpoint every N steps (0 = only at the end)", resume="length")
    keep_checkpoints: int = arg(2, "checkpoints kept on disk", resume="length")
    gradient_checkpointing: bool = arg(False, "recompute decoder activations in backward to save memory")
    capacity_factor: float = arg(0.0, "expert capacity as a multiple of an even share (0 = never drop)")
    eval_every: int = arg(0, "log the loss on held-out examples every N steps and at the end (0 = never): the "
                             "val split when train.split is fit, else test", resume="observes")
    eval_examples: int = arg(64, "held-out examples in each of those evaluations", resume="observes")
    report_to: Names = arg("tensorboard", "where metrics go besides metrics.jsonl, comma-separated: tensorboard, wandb, "
                                        "mlflow, or none (wandb and mlflow need the floe-dist[track] extra)",
                           resume="observes")

    def problems(self) -> list[str]:
        found = below_one(self, ("steps", "micro_batch", "accumulation", "keep_checkpoints"), "train")
        if self.until is not None and not 1 <= self.until <= self.steps:
            found.append(f"train.until must be in [1, train.steps={self.steps}], got {self.until}")
        if not 0 <= self.decay_ratio <= 1 or not 0 <= self.warmup_ratio <= 1:
            found.append(f"train.decay_ratio and train.warmup_ratio must be in [0, 1], got {self.decay_ratio} and "
                         f"{self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            found.append(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr <= 0:
            found.append(f"train.lr must be > 0, got {self.lr}")
        if self.time_limit is not None and self.time_limit <= 0:
            found.append(f"train.time_limit must be > 0 seconds (or none), got {self.time_limit}")
        if self.eval_reserve is not None and (self.eval_reserve <= 0 or self.time_limit is None):
            found.append(f"train.eval_reserve must be > 0 seconds and goes with train.time_limit, got "
                         f"{self.eval_reserve} (time_limit {self.time_limit})")
        if self.checkpoint_every < 0:
            found.append("train.checkpoint_every must be >= 0")
        if self.capacity_factor < 0:
            found.append(f"train.capacity_factor must be >= 0 (0 = no drop), got {self.capacity_factor}")
        if self.eval_every < 0 or self.eval_examples < 1:
            found.append("train.eval_every must be >= 0 and train.eval_examples >= 1")
        from floe_dist.tracking import TRACKERS, missing_library

        unknown = sorted(set(self.trackers) - set(TRACKERS))
        if unknown:
            found.append(f"train.report_to: unknown {unknown} (choose from {', '.join(TRACKERS)}, or none)")
        found += [f"train.report_to={name} needs its library: pip install 'floe-dist[track]'"
                  for name in self.trackers if name in TRACKERS and missing_library(name)]
        return found

    @property
    def trackers(self) -> list[str]:
        return [name for name in comma_list(self.report_to) if name != "none"]

    @property
    def end(self) -> int:
        """The step this run stops after: ``until``, else ``steps``."""
        return self.until or self.steps

    @property
    def warmup(self) -> int:
        return max(1, self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * self.steps))

    def decay_steps(self, steps: int) -> int:
        return round(self.decay_ratio * steps) if self.schedule == "wsd" else 0

    def lr_factor(self, steps: int | None = None):
        """The lr multiplier per step (floe_dist/distributed/engine.py ``schedule``) of a run of ``steps`` (default
        train.steps) with this run's warm-up."""
        from floe_dist.schedule import schedule

        steps = steps or self.steps
        return schedule(self.schedule, steps, self.warmup, self.decay_steps(steps))


@dataclass
class EvaluateSection:
    """evaluate: accuracy (generative tasks: exact match) and loss of the base model or an adapter"""
    split: Literal["test", "train", "all", "fit", "val"] = arg("test", "test, train, all, or the search's parts "
                                                                       "of train: fit, val")
    batch_size: int = arg(32, "examples per forward pass", resume="runs")
    ranks: Literal["auto", "one", "all"] = arg(
        "auto", "campaign: evaluate in its process on one device (one), on the job's ranks as training holds the "
                "backbone (all), or all when ZeRO-3 training spreads a backbone that does not fit one device (auto)",
        resume="runs")
    limit: int | None = arg(None, "evaluate only the first N examples of the split")
    max_new_tokens: int = arg(32, "generative tasks: tokens generated per example at most")
    stop: StopStrings = arg("\\n", "generative tasks: stop at any of these strings, separated by '||' (\\n = newline)")
    lm_eval_tasks: Names = arg("", "lm-evaluation-harness tasks to score as well, comma-separated (needs the "
                                 "floe-dist[eval] extra); evaluate.limit applies to each")
    lm_eval_include: str | None = arg(None, "a folder of your own lm-eval task YAMLs, for lm_eval_tasks")

    def problems(self) -> list[str]:
        found = below_one(self, ("batch_size", "max_new_tokens"), "evaluate")
        if self.lm_eval_include and not Path(self.lm_eval_include).is_dir():
            found.append(f"evaluate.lm_eval_include: no folder {self.lm_eval_include}")
        if self.lm_eval_task_list and importlib.util.find_spec("lm_eval") is None:
            found.append("evaluate.lm_eval_tasks needs lm-eval: pip install 'floe-dist[eval]'")
        return found

    @property
    def lm_eval_task_list(self) -> list[str]:
        return comma_list(self.lm_eval_tasks)


@dataclass
class GenerateSection:
    """generate: what the base model or an adapter writes for prompts"""
    prompt: str | None = arg(None, "one prompt to complete (printed)")
    chat: bool = arg(False, "wrap the prompt as a user turn in the tokenizer's chat template")
    input: str | None = arg(None, "a data file or folder whose prompts are completed (read like data.task, "
                                  "with data.data_format and data.columns)")
    limit: int | None = arg(None, "only the first N prompts of input")
    max_new_tokens: int = arg(64, "tokens generated per prompt at most")
    stop: StopStrings = arg("", "stop at any of these strings, separated by '||' (\\n = newline); EOS always stops")
    batch_size: int = arg(8, "prompts per generate call")

    def problems(self) -> list[str]:
        found = below_one(self, ("max_new_tokens", "batch_size"), "generate")
        if self.prompt is not None and self.input is not None:
            found.append("give generate.prompt or generate.input, not both")
        if self.chat and self.prompt is None:
            found.append("generate.chat applies to generate.prompt")
        if self.limit is not None and self.limit < 1:
            found.append("generate.limit must be >= 1")
        return found


@dataclass
class PlanSection:
    """plan: what `floe-dist plan` assumes beyond the model, adapter, train and parallel sections"""
    device: Literal["gpu", "cpu"] = arg("gpu", "gpu (bf16 activations) or cpu (fp32; the live peak RSS of a rank)")
    gpu_memory: float = arg(80.0, "GiB per GPU to fit into (H100: 80)")
    peak_tflops: float = arg(989.0, "dense bf16 peak per GPU (H100 SXM: 989)")
    mfu: float = arg(0.3, "assumed MFU: model FLOPs (no recomputation, floe_dist/flops.py) over the peak")
    flash_attention: bool = arg(True, "attention without the s^2 score matrix (FlashAttention/SDPA)")
    full_sequence_loss: bool = arg(False, "logits at every position (PEFT/TRL SFT) instead of answer tokens only")
    offload: bool = arg(False, "parameters and optimizer state in CPU memory (ZeRO-Infinity / FSDP offload)")
    double_quant: bool = arg(False, "with model.quant nf4: bitsandbytes' double quantization (absmax quantized)")

    def problems(self) -> list[str]:
        found = [] if 0 < self.mfu <= 1 else [f"plan.mfu must be in (0, 1], got {self.mfu}"]
        return found + ([] if self.gpu_memory > 0 else [f"plan.gpu_memory must be > 0, got {self.gpu_memory}"])


@dataclass
class CampaignSection:
    """campaign: what the whole campaign may spend"""
    budget: Duration = arg("", "wall-clock budget of the whole campaign, spent in full: 900 (seconds), 45m, 2h, 1h30m, "
                          "H:MM:SS, or job (inside an sbatch job: the time it has left, less a minute to end in). The "
                          "search gets search_share of what zero-shot and allocation leave, the final run the rest, "
                          "its steps set from its measured speed (train.steps then sets only the warm-up); empty: "
                          "train.steps")
    search_share: float = arg(0.3, "with budget: the search's share of the time zero-shot and allocation leave")
    zero_shot: Literal["spare", "first"] = arg(
        "spare", "when the zero-shot evaluation runs: spare (on a search worker that has no trial to run, where the "
                 "search runs one-process trials on several local workers; first otherwise) or first (alone, before "
                 "allocation and search)", resume="runs")
    zero_shot_share: float = arg(0.1, "with budget: the most of it a zero-shot evaluation the campaign runs itself "
                                      "may take; it then ends with the part of the test split it scored (on a search "
                                      "worker it ends when the trials do)", resume="runs")

    @property
    def from_job(self) -> bool:
        """``budget: job``: the Slurm job's time left, which the campaign reads when it starts (launcher/campaign.py
        ``budget_in_job``) and writes here in seconds."""
        return self.budget.strip().lower() == "job"

    def budget_seconds(self) -> float | None:
        if self.from_job:
            raise ValueError("campaign.budget job is the Slurm job's time left: known once the campaign runs in it")
        return duration_seconds(self.budget, "campaign.budget") if self.budget.strip() else None

    def problems(self) -> list[str]:
        found = [] if 0 <= self.search_share < 1 else [f"campaign.search_share must be in [0, 1), got "
                                                       f"{self.search_share}"]
        if not 0 < self.zero_shot_share <= 1:
            found.append(f"campaign.zero_shot_share must be in (0, 1], got {self.zero_shot_share}")
        if self.from_job:
            return found
        try:
            seconds = self.budget_seconds()
        except ValueError as err:
            return found + [f"{err}, or job (an sbatch job's time left)"]
        return found + ([] if seconds is None or seconds > 0 else ["campaign.budget must be > 0"])


@dataclass
class ParallelSection:
    """parallel: ranks, nodes and how they start"""
    nproc: int = arg(1, "ranks per node for score and train (local processes, or GPUs per node): as many as pay "
                        "on the machine (one on a small CPU box, every GPU on a GPU node)", resume="runs")
    nodes: int = arg(1, "nodes (more than 1 needs launcher srun, inside an sbatch job)", resume="runs")
    launcher: Literal["local", "srun"] = arg("local", "local (torchrun on this machine) or srun (inside an sbatch "
                                                      "job; slurm/)", resume="runs")
    zero: ZeroConfig = arg("0", "DeepSpeed config for score and train: 0, 2, 3 (zero_configs/) or a JSON path; 3 "
                         "partitions a backbone too big for one device", resume="layout")
    ep_size: int = arg(1, "expert parallelism: ranks that split every MoE module's experts (divides the world "
                          "size; 1 = every rank holds every expert)", resume="layout")
    gpus_per_node: int = arg(0, "GPUs per node to request from Slurm (0 on CPU clusters)", resume="runs")

    def problems(self) -> list[str]:
        return below_one(self, ("nproc", "nodes", "ep_size"), "parallel")


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
    generate: GenerateSection = field(default_factory=GenerateSection)
    plan: PlanSection = field(default_factory=PlanSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    campaign: CampaignSection = field(default_factory=CampaignSection)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 1e-3, "allocate.flexora.steps": 50, ...}``: the form resume guards compare."""
        return {key: reduce(getattr, key.split("."), self) for key in field_paths(Recipe)}

    def problems(self, *sections: str) -> list[str]:
        """Every problem of the named sections (default: all): choices the parser would refuse (for objects built
        in code), each section's own checks, then those across sections."""
        names, flat = sections or [f.name for f in fields(self)], self.flat()
        found = [f"{key} must be one of {allowed}, got {flat[key]!r}" for key, allowed in choices().items()
                 if key.split(".")[0] in names and flat[key] not in allowed]
        found += [p for n in names if hasattr(getattr(self, n), "problems") for p in getattr(self, n).problems()]
        if {"search", "allocate"} <= set(names) and self.allocate.file and self.search.candidates:
            found.append("give allocate.file or search.candidates, not both (a candidate may be that file)")
        return found

    def validate(self, *sections: str) -> None:
        """``problems`` as one error."""
        found = self.problems(*sections)
        if found:
            raise ValueError("bad settings:\n  - " + "\n  - ".join(found))


def is_section(f) -> bool:
    """A field that holds a nested section (a dataclass default factory), not a setting."""
    return callable(f.default_factory) and is_dataclass(f.default_factory)


def choices() -> dict[str, tuple]:
    """{key: allowed values} of every ``Literal`` setting."""
    found = {}
    for prefix, section in section_paths(Recipe).items():
        hints = get_type_hints(section)
        found.update({f"{prefix}.{f.name}": get_args(hints[f.name]) for f in fields(section)
                      if not is_section(f) and get_origin(hints[f.name]) is Literal})
    return found


def marked(*kinds: str) -> set[str]:
    """The settings whose field is marked with one of these resume kinds (config.RESUME_KINDS)."""
    return {key for key, f in field_paths(Recipe).items() if f.metadata.get("resume") in kinds}


def settings_of(recipe: Recipe, sections: tuple[str, ...]) -> dict[str, Any]:
    """The flat settings of some sections: what a stage's resume guard compares."""
    return {k: v for k, v in recipe.flat().items() if k.split(".")[0] in sections}


# ----------------------------------------------------------------------------------------- files
def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(asset_dir("recipes").glob("*.yaml"))}


def recipe_path(name_or_path: str) -> Path:
    """A recipe file, or the name of a shipped one (``tiny``, ``smollm2-sst2``, ...; ``default``: the default)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = {**shipped_recipes(), "default": shipped_recipes()[DEFAULT_RECIPE]}
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise FileNotFoundError(f"recipe {name_or_path!r}: no such file, and not a shipped recipe "
                            f"({', '.join(shipped)})")


def dump_recipe(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(asdict(recipe), sort_keys=False)


def write_recipe(folder: Path, recipe: Recipe) -> Path:
    """The fully resolved recipe beside a stage's outputs (``recipe.yaml``)."""
    from floe_dist.files import write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(folder / "recipe.yaml", dump_recipe(recipe))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """A section (or the Recipe) from plain nested values, e.g. a saved ``recipe.yaml`` or ``trial.json``; a
    compact setting written as YAML (``ranks: [2, 4]``) becomes its string, as on the command line."""
    kwargs, hints = {}, get_type_hints(cls)
    for f in fields(cls):
        if f.name in data:
            value = data[f.name]
            if is_section(f):
                value = from_dict(f.default_factory, value or {})
            elif isinstance(hints[f.name], type) and issubclass(hints[f.name], Compact):
                value = hints[f.name].parse(value)
            kwargs[f.name] = value
    return cls(**kwargs)


def read_recipe(path: Path) -> Recipe:
    import yaml

    return from_dict(Recipe, yaml.safe_load(Path(path).read_text()) or {})


# ---------------------------------------------------------------------------------------- parsing
def recipe_parser(prog: str = "floe-dist", description: str | None = None):
    """jsonargparse parser of a Recipe: ``--config FILE``, dotted ``--section.key value`` settings and
    ``--print_config``; each flag's help is its field's ``arg()`` help, each group's title its section's."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    register_compact_types()
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a recipe file or shipped recipe name; later --section.key flags override it")
    parser.add_class_arguments(Recipe, fail_untyped=True, sub_configs=False)
    helps = {key: f.metadata["help"] for key, f in field_paths(Recipe).items()}
    for action in parser._actions:
        if action.dest in helps:
            action.help = helps[action.dest]
    for key, cls in section_paths(Recipe).items():  # group titles: the section docstrings
        if key in getattr(parser, "groups", {}):
            parser.groups[key].title = cls.__doc__
    return parser


def field_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": Field, "allocate.flexora.steps": Field, ...}: every setting of the tree."""
    out = {}
    for f in fields(cls):
        if is_section(f):
            out.update(field_paths(f.default_factory, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def section_paths(cls: type, prefix: str = "") -> dict[str, type]:
    """{"train": TrainSection, "allocate.flexora": FlexoraSection, ...}."""
    out = {}
    for f in fields(cls):
        if is_section(f):
            out[f"{prefix}{f.name}"] = f.default_factory
            out.update(section_paths(f.default_factory, f"{prefix}{f.name}."))
    return out


def resolve_config_names(argv: list[str]) -> list[str]:
    """``--config tiny`` names a shipped recipe; the path is what jsonargparse reads."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            out[i + 1] = str(recipe_path(out[i + 1]))
        elif a.startswith("--config="):
            out[i] = "--config=" + str(recipe_path(a.split("=", 1)[1]))
    return out


def recipe_from_namespace(parser, cfg) -> Recipe:
    built = parser.instantiate_classes(cfg)
    return Recipe(**{f.name: getattr(built, f.name) for f in fields(Recipe)})


def parse_recipe(argv: list[str], parser=None):
    """(Recipe, namespace) from ``--config`` and dotted settings; a bad key or value is a ValueError naming it."""
    from jsonargparse import ArgumentError

    parser = parser or recipe_parser()
    try:
        cfg = parser.parse_args(resolve_config_names(argv))
    except ArgumentError as err:
        raise ValueError(f"bad settings: {readable(str(err))}") from None
    return recipe_from_namespace(parser, cfg), cfg


def readable(error: str) -> str:
    """jsonargparse's ``Parser key "train.lr":\n  Expected a <class 'float'>. Got value: [0.001]`` as one line:
    ``train.lr: expected one float, got [0.001]``; a compact setting's own message as ``search.ranks: expected
    ...``."""
    import re

    match = re.match(r'Parser key "([^"]+)":\s*(.*)', error, re.S)
    if not match:
        return error
    key, why = match.group(1), " ".join(match.group(2).split())
    if choice := re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", why):
        return f"{key}: expected one of {choice.group(1)}, got {choice.group(2)}"
    if typed := re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)", why):
        return f"{key}: expected one {typed.group(1)}, got {typed.group(2)}"
    if compact := re.match(r"Not of type \w+: (.*)", why):
        return f"{key}: {compact.group(1)}"
    return f"{key}: {why}"


def load_recipe(config: str | None = None, overrides: list[str] = ()) -> Recipe:
    """The recipe in ``config`` (default: the shipped default recipe) with dotted ``overrides`` applied: what the
    command line does, for scripts and tests."""
    return parse_recipe(["--config", str(recipe_path(config or DEFAULT_RECIPE)), *overrides])[0]
