"""``floe-dist allocate``: write an allocation file with any registered method.

    floe-dist allocate --method uniform --model smollm2-135m --rank 8 --output alloc.json
    floe-dist allocate --config my_recipe.yaml --output alloc.json     # the recipe's allocate and adapter sections
    floe-dist allocate --method random --k 8 --seed 1 --output alloc.json
    floe-dist allocate --method floe --scores runs/score/fisher.json --k 8 --output alloc.json
    floe-dist allocate --method hilo --expert-schedule 2468 --rank-schedule 2468 --top-p 0.6 --output alloc.json
    floe-dist allocate --method flexora --task sst2 --flexora-steps 50 --output alloc.json
    floe-dist allocate --method guilomo --task sst2 --guilomo-steps 40 --output alloc.json

The model is built on the meta device from its config (no weights are loaded) to read its shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

from floe_dist.allocation import Allocation
from floe_dist.files import output_file
from floe_dist.recipe import Recipe


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    shapes: dict[str, tuple[int, int]]  # module name -> (d_in, d_out)


SECTIONS = ("allocate", "adapter", "model", "data")
OUTPUT = "allocation.json"
OUTPUT_FILE = "allocation.json"


def model_shape(model: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from floe_dist.modeling.backbone import resolve_model
    from floe_dist.modeling.inject import module_shapes

    config = AutoConfig.from_pretrained(resolve_model(model))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return ModelShape(*module_shapes(meta))


def run(recipe: Recipe, output: str = OUTPUT) -> Allocation:
    from floe_dist.distributed.runtime import discover
    from floe_dist.methods import get

    a = recipe.allocate
    method = get(a.method)  # unknown names and bad settings fail before the model is read
    recipe.validate(*SECTIONS)
    shape = model_shape(recipe.model.name)
    allocation = method(recipe, shape)
    if a.budget:
        allocation = allocation.scaled_to_budget(a.budget, shape.shapes)
    allocation.validate(shape.num_layers, shape.shapes)
    if discover().is_main:  # data-parallel searches (flexora) end with the same result on every rank
        output = output_file(output, OUTPUT_FILE)
        allocation.save(output)
        off = f" ({allocation.trainable_parameters / a.budget - 1:+.1%} of allocate.budget)" if a.budget else ""
        print(f"{a.method}: {len(allocation.layers)} layers, {allocation.trainable_parameters:,} adapter "
              f"parameters{off}, at most {allocation.count_active_parameters(shape.shapes):,} active per token "
              f"-> {output}")
    return allocation  # the CLI's main shuts the process group down
