"""FLoE: keep the top-k layers by the Fisher scores that ``floe-dist score`` wrote (re-select with another
k without rescoring), with adapters sized by the adapter section (``score``'s own allocation.json keeps
the warm-up adapter's size instead). Scoring itself lives in floe_dist/stages/score.py and floe_dist/methods/fisher.py."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from floe_dist.methods import register
from floe_dist.methods.baselines import k_layers, uniform_on
from floe_dist.methods.fisher import select_top_k


@register("floe")
def floe(recipe, shape):
    if not recipe.allocate.scores:
        raise ValueError("floe needs allocate.scores (--scores): the fisher.json written by `floe-dist score`")
    path = Path(recipe.allocate.scores)
    if not path.is_file():
        raise FileNotFoundError(f"allocate.scores {path}: file not found")
    scores = {int(l): s for l, s in json.loads(path.read_text())["scores"].items()}
    layers = sorted(scores)
    kept = [layers[i] for i in select_top_k(torch.tensor([scores[l] for l in layers]), k_layers(recipe, shape))]
    allocation = uniform_on(kept, recipe, shape, "floe")
    allocation.meta["scores"] = str(path)
    return allocation
