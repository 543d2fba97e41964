"""Does the campaign's search find what a user's grid of PEFT LoRA runs would? A 6-point PEFT grid at the
campaign's own final steps, against the campaign.

    python benchmarks/bench_peft_grid.py        # arithmetic, seeds 0 1 2, steps from the 350 s campaigns (~80 min)
    python benchmarks/bench_peft_grid.py --campaign campaign_vs_peft_arithmetic_packed --result peft_grid_packed

Per seed, PEFT LoRA through PEFT itself (``bench_task_arms.peft_lora``: q_proj and v_proj of every layer, alpha 16,
dropout 0.05, AdamW with 10% warm-up and cosine decay to a tenth, the recipe's global batch and batches (packed rows
where the recipe packs), one process with every core, scored by the campaign's own evaluation on the test split) at
each of lr 3e-4, 1e-3, 3e-3 x r 8, 16, for as many steps as that seed's campaign trained its final run in
``--campaign``'s rows (benchmarks/results/NAME.json; by default the campaign given 350 s on one question a row; its
accuracy and wall time are read from that file, not rerun). The grid's best is chosen on the test split it is scored
on: an oracle, the most a grid can give. Writes benchmarks/results/RESULT.json, a row per seed and grid point as
each finishes.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_task_arms import LORA, peft_lora  # noqa: E402
from benchmarks.result_file import RESULTS, write_result  # noqa: E402

GRID = [(lr, rank) for rank in (8, 16) for lr in (3e-4, 1e-3, 3e-3)]


def main() -> None:
    from floe_dist.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smollm2-arithmetic")
    parser.add_argument("--campaign", default="campaign_vs_peft_arithmetic_budget",
                        help="benchmarks/results/NAME.json: the campaign rows whose final steps the grid trains")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--result", default="peft_grid", help="benchmarks/results/NAME.json")
    ns = parser.parse_args()
    campaigns = {r["seed"]: r["campaign"] for r in json.loads((RESULTS / f"{ns.campaign}.json").read_text())["rows"]}
    recipe = load_recipe(ns.config)
    rows = []
    for seed in ns.seeds:
        steps = campaigns[seed]["train_steps"]
        for lr, rank in GRID:
            run = replace(recipe, train=replace(recipe.train, steps=steps, time_limit=None))
            result = peft_lora(run, seed, {**LORA, "lr": lr, "rank": rank})
            rows.append({"recipe": ns.config, "seed": seed, "lr": lr, "rank": rank, "campaign_file": ns.campaign,
                         "campaign_accuracy": campaigns[seed]["accuracy"], "campaign_wall_s": campaigns[seed]["wall_s"],
                         **result})
            print(json.dumps(rows[-1]), flush=True)
            write_result(ns.result, rows)


if __name__ == "__main__":
    main()
