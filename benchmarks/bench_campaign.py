"""The default campaign end to end, timed per stage: what README's first command does, from an empty folder; with
``--repeats``, the same recipe and seed run again, to see whether it makes the same choice.

    python benchmarks/bench_campaign.py                   # recipes/smollm2-sst2.yaml: SmolLM2-135M on SST-2
    python benchmarks/bench_campaign.py --config tiny
    python benchmarks/bench_campaign.py --repeats 2 --result campaign_sst2_budget600 --override --campaign.budget 600
    python benchmarks/bench_campaign.py --arms campaign.zero_shot=first campaign.zero_shot=spare --repeats 2 ...

Writes benchmarks/results/campaign.json, or ``--result`` (one row per run: accuracies, trainable parameters, the
chosen allocation, rank and learning rate, seconds per stage, wall time from the command's start to its end; with a
search, its trials, the steps they continued from promoted trials' checkpoints, the final run's steps continued from
the winning trial, and each trial's worker, steps and seconds, and the spare work's: the zero-shot evaluation). The
model conversion cache is kept between runs (its ``prepare`` time is then close to 0 s). With ``--arms KEY=VALUE
...``, each repeat runs every arm (the setting added to the overrides) one after the other, in turn, so that a slow
spell of the machine falls on both.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402


def worker_time(trials: list[dict], spare_work: list[dict]) -> list[dict]:
    """Where each search worker's time went: per trial (a ledger's), its worker, budget, wall, training and validation
    seconds; then the spare work a worker took when it had no trial (the zero-shot evaluation)."""
    return [{"id": t["id"], "worker": t["worker"].split(":pid")[0], "steps": t["budget"], "seconds": t["seconds"],
             "train_seconds": t["metrics"].get("train_seconds"), "eval_seconds": t["metrics"].get("eval_seconds")}
            for t in trials] + [
        {"spare": w["name"], "worker": w["worker"].split(":pid")[0], "seconds": w["seconds"], "status": w["status"]}
        for w in spare_work]


def overhead_share(runs: list[dict], search_s: float) -> float:
    """1 - the trials' training and validation seconds, and the spare work's, / (workers x the search's wall time)."""
    useful = sum((t.get("train_seconds") or 0) + (t.get("eval_seconds") or 0) for t in runs if "spare" not in t)
    useful += sum(t["seconds"] for t in runs if "spare" in t and t["status"] == "success")
    return 1 - useful / ((len({t["worker"] for t in runs}) or 1) * search_s)


def final_run_timing(train_dir: Path) -> dict:
    """A budgeted final run's length (steps.json: when it was set, and each move of its end), the seconds its last
    checkpoint and export took after its last step, its slowest checkpoint save, and the final evaluation it timed
    (``eval_reserve``: the seconds it took back of the reserve)."""
    length, summary = train_dir / "steps.json", json.loads((train_dir / "train.json").read_text())
    return {"final_length": json.loads(length.read_text()) if length.is_file() else None,
            **{key: summary.get(key) for key in ("closing_seconds", "longest_save_seconds", "eval_reserve")}}


# what the zero-shot evaluation scored and took, and what it kept back for the final evaluation (a stopped one's
# part of the split, its pace and tokens: launcher/campaign.py whole_split_seconds)
ZERO_SHOT_KEYS = ("examples", "examples_of", "seconds", "scoring_seconds", "seconds_per_example", "scored_tokens",
                  "split_tokens", "threads", "reserve_seconds")


def run_campaign(recipe: str, overrides: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "campaign"
        start = time.time()
        subprocess.run([sys.executable, "-m", "launcher.cli", "campaign", "--config", recipe, "--output", str(out),
                        *overrides], cwd=REPO, check=True)
        wall = time.time() - start
        summary = json.loads((out / "campaign.json").read_text())
        allocation = json.loads(Path(summary["allocation"]).read_text())
        searched = out / "search" / "search.json"
        ledger = json.loads(searched.read_text()) if searched.is_file() else None
        timing = final_run_timing(out / "train")
        zero_shot = json.loads((out / "zero_shot.json").read_text())
    layers = sorted(int(layer) for layer in allocation["layers"])
    ranks = sorted({max(m["ranks"]) for mods in allocation["layers"].values() for m in mods.values()})
    row = {"recipe": recipe, "model": summary["model"], "task": summary["task"], "ranks": summary["ranks"],
           "layers": layers, "expert_ranks": ranks, "lr": summary["lr"],
           "zero_shot_accuracy": summary["zero_shot_accuracy"], "final_accuracy": summary["final_accuracy"],
           "trainable_parameters": summary["trainable_parameters"], "stage_seconds": summary["stage_seconds"],
           "wall_s": wall, "budget_s": summary.get("budget_seconds"), "train_steps": summary.get("train_steps"),
           "steps_reused": summary.get("steps_reused"), **timing,
           "zero_shot_eval": {k: zero_shot.get(k) for k in ZERO_SHOT_KEYS}}
    if ledger:
        search = ledger["summary"]
        row["search"] = {k: search.get(k) for k in ("allocation", "rank", "lr", "trials", "trained_steps",
                                                    "steps_reused", "not_separated")}
        row["search"]["incumbent"] = {k: search["incumbent"][k] for k in ("id", "config", "budget", "cost")}
        row["search"]["trials_run"] = worker_time(ledger["trials"], search.get("spare_work", []))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smollm2-sst2", help="recipe: a file or a shipped name (recipes/)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the same recipe and seed, one after another")
    parser.add_argument("--arms", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings compared: each repeat runs every arm in turn (a row's 'arm')")
    parser.add_argument("--result", help="benchmarks/results/NAME.json (default: campaign, or campaign_RECIPE)")
    parser.add_argument("--override", nargs=argparse.REMAINDER, default=[],
                        help="last: recipe settings, as --section.key value pairs")
    args = parser.parse_args()
    rows = []
    for run in range(args.repeats):
        for arm in args.arms or [None]:
            setting = ["--" + arm.split("=", 1)[0], arm.split("=", 1)[1]] if arm else []
            rows.append({"run": run, **({"arm": arm} if arm else {}), **run_campaign(args.config,
                                                                                  args.override + setting)})
            print(json.dumps(rows[-1], indent=1), flush=True)
    name = args.result or ("campaign" if args.config == "smollm2-sst2" else f"campaign_{Path(args.config).stem}")
    # arms measured in separate runs fill one table: a rerun replaces its own arms' rows and keeps the others
    write_result(name, rows, merge_key="arm" if args.arms else None, overrides=args.override)


if __name__ == "__main__":
    main()
