"""``floe-dist evaluate``: accuracy (multiple choice), exact match and loss (generative) of the base model or
an exported adapter; the scoring itself is floe_dist/evaluation.py's.

    floe-dist evaluate --model smollm2-135m --task sst2 --adapter runs/x/adapter
    floe-dist evaluate --config my_recipe.yaml --model.adapter runs/c/train/adapter --evaluate.split val
"""
from __future__ import annotations

from floe_dist.distributed.runtime import discover
from floe_dist.evaluation import evaluate
from floe_dist.files import output_file, write_json_atomic
from floe_dist.recipe import Recipe

SECTIONS = ("evaluate", "model", "data", "parallel")  # parallel: on several ranks (distributed/sharded_eval.py)
OUTPUT = None  # printed; --output also writes the result as JSON
OUTPUT_FILE = "evaluate.json"


def run(recipe: Recipe, output: str | None = OUTPUT) -> dict:
    place = discover()
    result = evaluate(recipe, on_ranks=place.world_size > 1)
    if output and place.rank == 0:
        print(f"-> {write_json_atomic(output_file(output, OUTPUT_FILE), result)}")
    return result
