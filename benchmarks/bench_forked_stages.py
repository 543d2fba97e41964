"""What forking a command's local stages, workers and trials from one zygote saves against starting each as a
fresh interpreter (floe_dist/distributed/forked_ranks.py), side by side in one run.

Per repeat, alternating, `floe-dist campaign --config tiny` (FLoE's path on the tiny random Llama: zero-shot,
a 2-rank score stage, the search on 2 warm workers, a 2-rank final run, the final evaluation) with the zygote and
with ``FLOE_DIST_FORK=0`` (every stage torchrun or one process, every worker a fresh interpreter, as before). Wall
time of the whole command and each stage's seconds as the campaign records them.

    python benchmarks/bench_forked_stages.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402


def campaign(fork: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "campaign"
        env = {**os.environ, "FLOE_DIST_FORK": "1" if fork else "0"}
        start = time.time()
        subprocess.run([sys.executable, "-m", "launcher.cli", "campaign", "--config", "tiny", "--output", str(out)],
                       cwd=REPO, env=env, check=True, capture_output=True)
        wall = time.time() - start
        summary = json.loads((out / "campaign.json").read_text())
    return {"wall_s": wall, "stage_seconds": summary["stage_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = {"forked": [], "fresh": []}
    for repeat in range(args.repeats):
        for arm in ("fresh", "forked"):
            runs[arm].append(campaign(arm == "forked"))
            print(f"repeat {repeat} {arm}: {runs[arm][-1]['wall_s']:.1f} s", flush=True)
    rows = []
    for arm, done in runs.items():
        stages = done[0]["stage_seconds"]
        rows.append({"arm": arm, "wall_s": [r["wall_s"] for r in done], "mean_wall_s": mean(r["wall_s"] for r in done),
                     "stage_seconds": {s: mean(r["stage_seconds"][s] for r in done) for s in stages}})
    forked, fresh = rows[0]["mean_wall_s"], rows[1]["mean_wall_s"]
    print(f"forked {forked:.1f} s, fresh {fresh:.1f} s: fresh/forked {fresh / forked:.2f}x")
    write_result("forked_stages", rows)


if __name__ == "__main__":
    main()
