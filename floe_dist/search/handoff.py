"""The final run continues the search's winning line instead of training its first steps again.

A trial trains the first steps of the final run (floe_dist/stages/search.py ``trial_recipe``): the final run's
settings and schedule, only its split (fit, without the validation part) and its end (``train.until``) differ. So
the winning line's latest checkpoint (adapters, optimizer moments, learning-rate schedule, step and so data
position) is the final run's checkpoint at that step: the final run resumes it and trains on to ``train.steps`` on
the whole training split. Where the line was trained otherwise (another batch, seed, schedule or allocation), the
final run starts from step 0 and says why.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from floe_dist.allocation import Allocation
from floe_dist.files import write_json_atomic, write_text_atomic
from floe_dist.recipe import Recipe
from floe_dist.resume import changed_settings, describe

HANDOFF = "handoff.json"


def global_batch(settings: dict) -> int:
    return (settings["train.micro_batch"] * settings["train.accumulation"] * settings["parallel.nproc"]
            * settings["parallel.nodes"])


def lr_factors(settings: dict, steps: int) -> list[float]:
    """The learning-rate multipliers of a run's first steps (a time-limited run's before it sets its length)."""
    from floe_dist.trainer import UNSET, saved_train

    train = saved_train(settings)
    factor = train.lr_factor(UNSET if train.time_limit else None)
    return [factor(step) for step in range(steps)]


def why_not(line: Path, final: Recipe, step: int) -> str | None:
    """Why the final run cannot continue ``line`` (a trial's training folder) at ``step``; None when it can."""
    from floe_dist.trainer import LAYOUT_KEYS, RESUME_MAY_CHANGE, run_settings

    trained, wanted = json.loads((line / "train_args.json").read_text()), run_settings(final)
    # layouts: portable checkpoints; the schedule's settings: compared by the rates they give (below)
    ignore = RESUME_MAY_CHANGE | LAYOUT_KEYS | {"train.split", "allocate.file", "train.warmup_steps",
                                                 "train.warmup_ratio", "train.schedule", "train.decay_ratio"}
    changed = changed_settings(trained, wanted, ignore)
    if changed:
        return f"the trials trained with other settings: {describe(changed)}"
    if global_batch(trained) != global_batch(wanted):
        return (f"the trials' global batch ({global_batch(trained)}) is not the final run's ({global_batch(wanted)});"
                f" leave search.micro_batch unset")
    if not final.train.time_limit and step >= final.train.end:  # a time-limited run sets its end later
        return f"the line is at step {step}, not before the final run's end ({final.train.end})"
    if lr_factors(trained, step + 1) != lr_factors(wanted, step + 1):
        return (f"the final run's learning-rate schedule differs from the trials' before step {step} (train.steps "
                f"{final.train.steps} puts the cooldown of train.schedule {final.train.schedule} before it)")
    if shape(line / "allocation.json") != shape(final.allocate.file):
        return "the final allocation is not the line's"
    return None


def shape(allocation_file) -> dict:
    """An allocation's modules and sizes, without its provenance (method, meta)."""
    return {k: v for k, v in Allocation.load(allocation_file).to_json().items() if k not in ("meta", "method")}


def continue_line(line: Path, final: Recipe, run_dir: Path) -> dict:
    """Copy the line's latest checkpoint into ``run_dir``'s checkpoints (once: a run that has checkpoints of its
    own resumes those) and write ``handoff.json``: ``{"line", "step"}``, or ``{"line", "step": 0, "reason"}``."""
    run_dir = Path(run_dir)
    if (run_dir / HANDOFF).is_file():
        return json.loads((run_dir / HANDOFF).read_text())
    tag = (line / "checkpoints" / "latest").read_text().strip()
    step = int(tag.removeprefix("step_"))
    reason = why_not(line, final, step)
    if reason is None and (run_dir / "checkpoints" / "latest").is_file():
        reason = f"{run_dir} has checkpoints of its own"
    if reason is None:
        shutil.copytree(line / "checkpoints" / tag, run_dir / "checkpoints" / tag, dirs_exist_ok=True)
        write_text_atomic(run_dir / "checkpoints" / "latest", tag)  # last: the copy is complete
    record = {"line": str(line), "step": 0 if reason else step, **({"reason": reason} if reason else {})}
    return json.loads(write_json_atomic(run_dir / HANDOFF, record).read_text())
