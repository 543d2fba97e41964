"""Work a search worker takes when it would otherwise wait: the campaign's zero-shot evaluation.

A search on several workers has moments when a worker has no trial to run while others train: a rung's promotion
waits for the rung's last trial, the model's next configuration for the results it must know (loop.py), and the
last trials of the search leave workers with nothing to take. The campaign hands the search work that depends on
nothing the search decides (the base model's zero-shot evaluation, which it ran alone before the search), and such
a worker runs it in that time; the campaign reads its result afterwards. It is offered only where no trial can be
issued and a trial is running, so it takes no trial's place: under a time limit it ends as soon as a trial could use
its worker (loop.py ``trial_waits_for_spare``), and without one at most it delays such a trial. A worker takes it
only once it has waited ``GRACE`` of a finished trial's mean seconds: offered however short the wait, on the
arithmetic recipe, whose trials finish in pairs, it took a worker that would have waited 0.4 s and the search ran
17 s longer (BENCHMARKS.md, "The zero-shot evaluation as the search's spare work"). Before any trial has finished
there is no grace: the wait lasts until one does. Local workers only (a Slurm worker may sit in another
allocation), one process a trial.

    python -m floe_dist.search.spare_work JOB_DIR     # on a cold worker; a warm one calls run_trial
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from floe_dist.files import write_json_atomic

MODULE = "floe_dist.search.spare_work"
GRACE = 0.25  # of a finished trial's mean seconds: a shorter wait is not worth a job that runs 25-40 s (zero-shot)


@dataclass
class SpareJob:
    name: str
    folder: Path  # holds what the job reads (recipe.yaml here); result.json once it succeeded
    module: str = MODULE  # run_trial(folder, resources) -> the result, as a trial module's

    @property
    def result(self) -> Path:
        return self.folder / "result.json"

    @property
    def stop_file(self) -> Path:
        """Written by the search under a time limit once it has no trial left to run, or a trial waits for this
        job's worker (SearchLoop.stop_spare): the evaluation then ends before its next batch, with the part of the
        split it finished."""
        return self.folder / "stop"


def evaluation_job(name: str, folder: Path, recipe) -> SpareJob:
    """``recipe``'s evaluation (floe_dist/evaluation.py ``evaluate``) as spare work in ``folder``; a result left there
    by another recipe's is removed."""
    from floe_dist.recipe import write_recipe

    if evaluation_result(folder, recipe) is None:
        (folder / "result.json").unlink(missing_ok=True)
    write_recipe(folder, recipe)
    job = SpareJob(name, folder)
    job.stop_file.unlink(missing_ok=True)
    return job


def evaluation_result(folder: Path, recipe) -> dict | None:
    """The result of ``recipe``'s evaluation run as spare work in ``folder``, None unless it ran."""
    from floe_dist.recipe import dump_recipe

    saved, result = folder / "recipe.yaml", folder / "result.json"
    if result.is_file() and saved.is_file() and saved.read_text() == dump_recipe(recipe):
        return json.loads(result.read_text())
    return None


def run_trial(job_dir: Path, resources=None) -> dict:
    """The evaluation of ``JOB_DIR/recipe.yaml``, with the threads it ran on (the campaign scales its duration to
    its own threads when it keeps time back for the final evaluation); it stops early once ``JOB_DIR/stop`` exists.
    Its backbone is its own, not a warm worker's kept one: the worker's later trials do not carry a second copy."""
    import torch

    from floe_dist.evaluation import evaluate
    from floe_dist.recipe import read_recipe

    stop_file = SpareJob("", job_dir).stop_file
    result = evaluate(read_recipe(job_dir / "recipe.yaml"), stop=stop_file.is_file)
    return {**result, "threads": torch.get_num_threads()}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / "recipe.yaml").is_file():
        print(f"usage: python -m {MODULE} JOB_DIR (a folder holding recipe.yaml)", file=sys.stderr)
        return 2
    write_json_atomic(Path(argv[0]) / "result.json", run_trial(Path(argv[0])))  # last: its presence means success
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
