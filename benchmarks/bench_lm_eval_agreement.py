"""Does lm-evaluation-harness score a trained adapter as `floe-dist evaluate` does, on the real model and task?

SST-2's test split (272 examples, the default campaign's) written as a JSONL and an lm-eval task YAML over it
(multiple choice, the same prompt and choices, no delimiter added); then one `floe-dist evaluate --adapter A
--lm-eval-tasks sst2_floe_test` prints floe-dist's accuracy and lm-eval's (its `hf` model run on the loaded
model by the `floe-dist` integration). The adapter is any export, e.g. the default campaign's.

    python benchmarks/bench_lm_eval_agreement.py --adapter runs/campaign/train/adapter
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

TASK = "sst2_floe_test"


def write_task(folder: Path) -> int:
    from floe_dist.data import load_task

    examples = load_task("sst2", "test")
    rows = [{"prompt": e.prompt, "choices": list(e.choices), "label": e.label} for e in examples]
    (folder / "sst2_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(json.dumps({
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "sst2_test.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "label", "target_delimiter": "",
        "metric_list": [{"metric": "acc"}]}))
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n = write_task(Path(tmp))
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", "evaluate", "--adapter", str(a.adapter),
                               "--lm-eval-tasks", TASK, "--lm-eval-include", tmp], cwd=REPO, check=True,
                              capture_output=True, text=True)
    ours = float(re.search(r"sst2/test: accuracy (\d\.\d+)", proc.stdout).group(1))
    theirs = float(re.search(rf"lm-eval {TASK}: acc,none (\d\.\d+)", proc.stdout).group(1))
    row = {"examples": n, "floe_dist_accuracy": ours, "lm_eval_accuracy": theirs, "seconds": round(time.time() - start)}
    print(json.dumps(row))
    write_result("lm_eval_agreement", [row], adapter=str(a.adapter))


if __name__ == "__main__":
    main()
