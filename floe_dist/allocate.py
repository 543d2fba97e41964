"""``floe-dist allocate``: write an allocation file with any registered method.

    floe-dist allocate --method uniform --model smollm2-135m --rank 8 --output alloc.json
    floe-dist allocate --method random --k 8 --seed 1 --output alloc.json
    floe-dist allocate --method floe --scores runs/score/fisher.json --k 8 --output alloc.json
    floe-dist allocate --method hilo --expert-schedule 2468 --rank-schedule 2468 --output alloc.json
    floe-dist allocate --method flexora --task sst2 --flexora-steps 50 --output alloc.json

The model is built on the meta device from its config (no weights are loaded) to read its shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from floe_dist.allocation import Allocation
from floe_dist.config import arg


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    shapes: dict[str, tuple[int, int]]  # module name -> (d_in, d_out)


@dataclass
class AllocateArgs:
    method: str = arg("uniform", "uniform, random, floe, flexora or hilo")
    model: str = arg("smollm2-135m", "base model: smollm2-135m, tiny, a HF folder or a .gguf file")
    output: str = arg("allocation.json", "where to write the allocation file")
    targets: str = arg("q_proj,v_proj", "comma-separated module names")
    experts: int = arg(1, "experts per module")
    rank: int = arg(8, "rank of every expert")
    router: str = arg("topk", "topk or dense")
    top_k: int = arg(1, "experts per token (topk router)")
    alpha: float = arg(16.0, "LoRA alpha")
    dropout: float = arg(0.05, "adapter input dropout")
    k: int | None = arg(None, "random/floe: layers kept (default 25%% of the layers); flexora: top-k "
                              "instead of alpha > 0")
    seed: int = arg(0, "random: seed of the layer draw")
    budget: int | None = arg(None, "uniform/random/floe: pick the rank whose parameter count is closest")
    scores: str | None = arg(None, "floe: fisher.json written by `floe-dist score`")
    expert_schedule: str = arg("2468", "hilo: experts per layer group, e.g. 2468, 8642 or uniform")
    rank_schedule: str = arg("uniform", "hilo: rank per layer group, e.g. 2468, 8642 or uniform")
    task: str = arg("sst2", "flexora: the task whose data the search trains and validates on")
    flexora_steps: int = arg(50, "flexora: alternating steps (one LoRA step + one alpha step each)")
    flexora_batch: int = arg(8, "flexora: training examples per LoRA step")
    flexora_val: int = arg(200, "flexora: training examples held out for the alpha steps")
    flexora_lr: float = arg(1e-3, "flexora: learning rate of the LoRA steps during the search")

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
    from floe_dist.allocators import get

    method = get(args.method)  # unknown names fail before the model is read
    shape = model_shape(args.model)
    allocation = method(args, shape)
    allocation.validate(shape.num_layers, shape.shapes)
    allocation.save(Path(args.output))
    print(f"{args.method}: {len(allocation.layers)} layers, {allocation.trainable_parameters:,} adapter "
          f"parameters -> {args.output}")
    return allocation
