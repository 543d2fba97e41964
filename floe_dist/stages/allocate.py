"""``floe-dist allocate``: write an allocation file with any registered method.

    floe-dist allocate --method uniform --model smollm2-135m --rank 8 --output alloc.json
    floe-dist allocate --method random --k 8 --seed 1 --output alloc.json
    floe-dist allocate --method floe --scores runs/score/fisher.json --k 8 --output alloc.json
    floe-dist allocate --method hilo --expert-schedule 2468 --rank-schedule 2468 --top-p 0.6 --output alloc.json
    floe-dist allocate --method flexora --task sst2 --flexora-steps 50 --output alloc.json
    floe-dist allocate --method guilomo --task sst2 --guilomo-steps 40 --output alloc.json

The model is built on the meta device from its config (no weights are loaded) to read its shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from floe_dist.allocation import Allocation
from floe_dist.config import arg, below_one


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    shapes: dict[str, tuple[int, int]]  # module name -> (d_in, d_out)


@dataclass
class AllocateArgs:
    method: str = arg("uniform", "uniform, random, floe, flexora, hilo or guilomo")
    model: str = arg("smollm2-135m", "base model: smollm2-135m, tiny, a HF folder or a .gguf file")
    output: str = arg("allocation.json", "where to write the allocation file")
    targets: str = arg("q_proj,v_proj", "comma-separated module names")
    experts: int = arg(1, "experts per module")
    rank: int = arg(8, "rank of every expert")
    router: str = arg("topk", "topk or dense")
    top_k: int = arg(1, "experts per token (topk router); with --top-p, the most experts per token")
    top_p: float = arg(0.0, "top-p activation (HILO): a token uses its fewest top experts whose router "
                            "probability reaches this (0 = plain top-k)")
    min_k: int = arg(1, "with --top-p: the fewest experts a token uses")
    alpha: float = arg(16.0, "LoRA alpha")
    dropout: float = arg(0.05, "adapter input dropout")
    k: int | None = arg(None, "random/floe: layers kept (default 25%% of the layers); flexora: top-k "
                              "instead of alpha > 0")
    seed: int = arg(0, "random: seed of the layer draw")
    budget: int | None = arg(None, "scale every rank by one factor so the adapter parameter count is closest "
                                   "to this (any method; the allocation's shape is kept)")
    scores: str | None = arg(None, "floe: fisher.json written by `floe-dist score`")
    expert_schedule: str = arg("2468", "hilo: experts per layer group, e.g. 2468, 8642 or uniform")
    rank_schedule: str = arg("uniform", "hilo: rank per layer group, e.g. 2468, 8642 or uniform")
    task: str = arg("sst2", "flexora: the task whose data the search trains and validates on")
    data_format: str = arg("auto", "flexora/guilomo: a data file's format: auto, multiple_choice, alpaca, chat or text")
    columns: str = arg("", "flexora/guilomo: a data file's field names: FIELD=COLUMN,... (e.g. instruction=question,output=answer)")
    flexora_steps: int = arg(50, "flexora: alternating steps (one LoRA step + one alpha step each)")
    flexora_batch: int = arg(8, "flexora: training examples per LoRA step")
    flexora_val: int = arg(200, "flexora: training examples held out for the alpha steps")
    flexora_lr: float = arg(1e-3, "flexora: learning rate of the LoRA steps during the search")
    guilomo_steps: int = arg(40, "guilomo: bilevel steps (each takes two training batches)")
    guilomo_order: str = arg("second", "guilomo: second (DARTS implicit term, 5 passes a step) or first (2)")
    guilomo_batch: int = arg(8, "guilomo: training examples per batch")
    guilomo_experts: int = arg(8, "guilomo: experts per module during the search (the most it can keep)")
    guilomo_rank: int = arg(8, "guilomo: rank of each expert during the search (the most it can keep)")
    guilomo_lr: float = arg(3e-4, "guilomo: learning rate of the lower level (adapters)")

    def validate(self) -> None:
        """Every bad flag at once, before any model or data is read."""
        problems = below_one(self, ("experts", "rank", "top_k", "min_k", "flexora_steps", "flexora_batch",
                                    "guilomo_steps", "guilomo_batch", "guilomo_rank"))
        if not 0 <= self.top_p <= 1:
            problems.append(f"--top-p must be in [0, 1] (0 = plain top-k), got {self.top_p}")
        if self.guilomo_order not in ("first", "second"):
            problems.append(f"--guilomo-order must be first or second, got {self.guilomo_order!r}")
        if self.guilomo_experts < 2:
            problems.append(f"--guilomo-experts must be >= 2 (the search always keeps 2), got {self.guilomo_experts}")
        if self.budget is not None and self.budget < 1:
            problems.append(f"--budget must be a positive parameter count, got {self.budget}")
        if not self.target_list:
            problems.append("--targets names no module")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]


def model_shape(model: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from floe_dist.modeling.backbone import resolve_model
    from floe_dist.modeling.inject import module_shapes

    config = AutoConfig.from_pretrained(resolve_model(model))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return ModelShape(*module_shapes(meta))


def run(args: AllocateArgs) -> Allocation:
    from floe_dist.methods import get
    from floe_dist.distributed.runtime import discover

    method = get(args.method)  # unknown names and bad flags fail before the model is read
    args.validate()
    shape = model_shape(args.model)
    allocation = method(args, shape)
    if args.budget:
        allocation = allocation.scaled_to_budget(args.budget, shape.shapes)
    allocation.validate(shape.num_layers, shape.shapes)
    if discover().is_main:  # data-parallel searches (flexora) end with the same result on every rank
        allocation.save(Path(args.output))
        off = f" ({allocation.trainable_parameters / args.budget - 1:+.1%} of --budget)" if args.budget else ""
        print(f"{args.method}: {len(allocation.layers)} layers, {allocation.trainable_parameters:,} adapter "
              f"parameters{off}, at most {allocation.count_active_parameters(shape.shapes):,} active per token "
              f"-> {args.output}")
    return allocation  # the CLI's main shuts the process group down
