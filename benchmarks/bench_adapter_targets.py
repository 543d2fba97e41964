"""Which modules should a budgeted campaign put its adapters on, and should it pack its rows? Decided on validation
data, never the test split.

    python benchmarks/bench_adapter_targets.py --seeds 0 1 --override --campaign.budget 350   # ~40 min, 2 cores

Per seed and arm, the whole campaign (bench_campaign_vs_peft.py's ``campaign``: search, then the final run that
continues the winning trial, given the same ``campaign.budget``) with ``--adapter.targets`` set (and, in the packed
arm, ``--data.pack true``: several questions per row), its final run trained on the fit part of the training split
only (``--train.split fit``) and scored on the search's validation part (``--evaluate.split val``; the first
``evaluate.limit`` of it, whose first ``search.val_limit`` the trials were scored on as well). A wider target set
learns more per step and costs more per step, a packed row trains several examples for more than one's cost: at
equal wall time, which wins is what this measures. Result: benchmarks/results/adapter_targets.json (one row per seed
and arm).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_campaign_vs_peft import campaign  # noqa: E402
from benchmarks.result_file import write_result  # noqa: E402

QV, MLP = "q_proj,v_proj", "gate_proj,up_proj,down_proj"
ONE_A_ROW, PACKED = ["--data.pack", "false"], ["--data.pack", "true"]  # explicit: the recipe packs since this ran
ARMS = {"attention q,v": ["--adapter.targets", QV, *ONE_A_ROW], "mlp": ["--adapter.targets", MLP, *ONE_A_ROW],
        "all linear": ["--adapter.targets", f"{QV},k_proj,o_proj,{MLP}", *ONE_A_ROW],
        "attention q,v, packed": ["--adapter.targets", QV, *PACKED]}
ON_VALIDATION = ["--train.split", "fit", "--evaluate.split", "val"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smollm2-arithmetic")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--result", default="adapter_targets", help="benchmarks/results/NAME.json")
    parser.add_argument("--override", nargs=argparse.REMAINDER, default=[],
                        help="last: recipe settings for every campaign, as --section.key value pairs")
    ns = parser.parse_args()
    for seed in ns.seeds:
        for arm in ns.arms:  # arms alternate within a seed, so a machine that slows down slows them all
            ran = campaign(ns.config, seed, [*ns.override, *ON_VALIDATION, *ARMS[arm]])
            step_s = ran["stage_seconds"]["train"] / max(1, ran["train_steps"])
            print(f"seed {seed}, {arm}: validation accuracy {ran['accuracy']:.4f}, rank {ran['rank']}, lr "
                  f"{ran['lr']:.2e}, {ran['train_steps']} final steps (~{step_s:.2f} s each), {ran['wall_s']:.0f}s",
                  flush=True)
            row = {"run": f"seed {seed}, {arm}", "seed": seed, "targets": arm, "recipe": ns.config, "campaign": ran}
            write_result(ns.result, [row], merge_key="run", overrides=ns.override)


if __name__ == "__main__":
    main()
