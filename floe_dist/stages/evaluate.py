"""``floe-dist evaluate``: accuracy (multiple choice), exact match and loss (generative) of the base model or
an exported adapter; the scoring itself is floe_dist/evaluation.py's.

    floe-dist evaluate --model smollm2-135m --task sst2 --adapter runs/x/adapter
    floe-dist evaluate --config my_recipe.yaml --model.adapter runs/c/train/adapter --evaluate.split val
"""
from __future__ import annotations

from pathlib import Path

from floe_dist.evaluation import evaluate
from floe_dist.files import write_json_atomic
from floe_dist.recipe import Recipe

SECTIONS = ("evaluate", "model", "data")
OUTPUT = None  # printed; --output DIR (or FILE.json) also writes the result as JSON


def run(recipe: Recipe, output: str | None = OUTPUT) -> dict:
    result = evaluate(recipe)
    if output:
        write_json_atomic(Path(output) / "evaluate.json" if not Path(output).suffix else Path(output), result)
    return result
