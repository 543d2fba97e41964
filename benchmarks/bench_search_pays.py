"""Does the search pay for its time? The same budgeted campaign with its search, and without it (the recipe's rank
and ``train.lr``, the whole budget to the final run), on development tasks no default was chosen on.

    python benchmarks/dev_tasks.py piqa runs/piqa.jsonl
    python benchmarks/bench_search_pays.py --tasks runs/piqa.jsonl --seeds 0 1 2 --override --campaign.budget 500

Per task and seed, the two arms one after the other (bench_campaign_vs_peft.py's ``campaign``: the seed sets the
search's and the training's seeds), each scored by the campaign's own final evaluation on the task's test carving
(``data.test_size`` of the file): a split of a development task, on which a default may be chosen, not one reported
as a headline. Same layers and targets in both arms; the searched arm's rank is its choice. Result:
benchmarks/results/search_pays.json (one row per task, seed and arm, written as each finishes).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_campaign_vs_peft import campaign  # noqa: E402
from benchmarks.result_file import write_result  # noqa: E402

ARMS = {"searched": [], "no search": ["--search.enabled", "false"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smollm2-sst2")
    parser.add_argument("--tasks", nargs="+", required=True, help="data.task of each development task (JSONL files)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--result", default="search_pays", help="benchmarks/results/NAME.json")
    parser.add_argument("--override", nargs=argparse.REMAINDER, default=[],
                        help="last: recipe settings for every campaign, as --section.key value pairs")
    ns = parser.parse_args()
    for task in ns.tasks:
        name = Path(task).stem
        for seed in ns.seeds:
            for arm, setting in ARMS.items():  # in turn within a seed: a slow spell of the machine falls on both
                ran = campaign(ns.config, seed, [*ns.override, "--data.task", str(Path(task).resolve()), *setting])
                print(f"{name}, seed {seed}, {arm}: accuracy {ran['accuracy']:.4f}, rank {ran['rank']}, lr "
                      f"{ran['lr']:.2e}, {ran['train_steps']} final steps, {ran['wall_s']:.0f}s", flush=True)
                row = {"run": f"{name}, seed {seed}, {arm}", "task": name, "seed": seed, "arm": arm,
                       "recipe": ns.config, "campaign": ran}
                write_result(ns.result, [row], merge_key="run", overrides=ns.override)


if __name__ == "__main__":
    main()
