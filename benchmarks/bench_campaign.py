"""The default campaign end to end, timed per stage: what README's first command does, from an empty folder.

    python benchmarks/bench_campaign.py                   # recipes/smollm2-sst2.yaml: SmolLM2-135M on SST-2
    python benchmarks/bench_campaign.py --config tiny

Writes benchmarks/results/campaign.json (one row per run: accuracies, trainable parameters, the chosen
rank and learning rate, seconds per stage). The model conversion cache is kept between runs (its
``prepare`` time is then close to 0 s).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402


def run_campaign(recipe: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "campaign"
        subprocess.run([sys.executable, "-m", "launcher.cli", "campaign", "--config", recipe, "--output", str(out)],
                       cwd=REPO, check=True)
        summary = json.loads((out / "campaign.json").read_text())
        allocation = json.loads(Path(summary["allocation"]).read_text())
    layers = sorted(int(layer) for layer in allocation["layers"])
    ranks = sorted({max(m["ranks"]) for mods in allocation["layers"].values() for m in mods.values()})
    return {"recipe": recipe, "model": summary["model"], "task": summary["task"], "ranks": summary["ranks"],
            "layers": layers, "expert_ranks": ranks, "lr": summary["lr"],
            "zero_shot_accuracy": summary["zero_shot_accuracy"], "final_accuracy": summary["final_accuracy"],
            "trainable_parameters": summary["trainable_parameters"], "stage_seconds": summary["stage_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smollm2-sst2", help="recipe: a file or a shipped name (recipes/)")
    args = parser.parse_args()
    row = run_campaign(args.config)
    print(json.dumps(row, indent=1))
    write_result("campaign" if args.config == "smollm2-sst2" else f"campaign_{Path(args.config).stem}", [row])


if __name__ == "__main__":
    main()
