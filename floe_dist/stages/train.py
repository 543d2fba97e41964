"""``floe-dist train``: LoRA-MoE adapters on a frozen (optionally 4-bit) backbone under DeepSpeed.

    floe-dist train --model tiny --steps 20 --output runs/tiny                     # one process
    floe-dist train --config my_recipe.yaml --allocation runs/c/search/allocation.json --output runs/t
    deepspeed --num_gpus 2 --module launcher.cli train --model smollm2-135m --zero 3 ...  # ZeRO-3, 2 ranks
    torchrun --nproc_per_node 2 -m launcher.cli train ...                          # same, torchrun
    torchrun --nproc_per_node 4 -m launcher.cli train --experts 8 --router topk --ep-size 2 ...  # 2 EP x 2 DP

It trains ``allocate.file`` as it is, or, without one, the adapter section on every layer, with the
train, model, data and parallel sections. Outputs in ``--output``: ``checkpoints/`` (DeepSpeed,
resumed automatically: rerun the same command), ``metrics.jsonl`` and ``tensorboard/`` (loss, lr,
balance loss, gradient norm, step time, expert load per layer, dropped picks with a capacity),
``adapter/`` (the export; see floe_dist.modeling.export) and ``train.json`` (summary).
The work itself is floe_dist/trainer.py's: setup, resume, step, save, export.
"""
from __future__ import annotations

from floe_dist.recipe import Recipe
from floe_dist.trainer import Trainer

SECTIONS = ("train", "adapter", "allocate", "model", "data", "parallel")
OUTPUT = "runs/train"


def run(recipe: Recipe, output: str = OUTPUT) -> dict:
    recipe.validate(*SECTIONS)
    return Trainer(recipe, output).fit()
