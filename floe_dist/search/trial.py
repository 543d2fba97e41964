"""One search trial: train the sparse model to step ``budget`` on the *fit* split, score it on *val*.

    python -m floe_dist.search.trial runs/search/trials/0007            # one process
    torchrun --nproc_per_node 2 -m floe_dist.search.trial runs/search/trials/0007

The trial folder holds ``trial.json`` (written by ``floe-dist search``: the sampled config, the budget in optimizer
steps, the seed, and the recipe it runs: floe_dist/stages/search.py ``trial_recipe``). The trial writes
``allocation.json`` (the searched rank applied to the selected layers) and ``train/`` (a normal training run,
resumable) in its *line* folder, which every trial of one configuration shares: a promoted trial, or a re-issued one,
continues the line's checkpoint instead of starting over; and, last, in the trial folder, ``result.json`` with
``cost``: the mean choice cross-entropy (generative tasks: answer loss) on the validation split (``objective: loss``)
or ``1 - accuracy`` (``objective: error``), and ``example_costs``, each validation example's share of it, in order, so
that two trials can be compared example by example. A generative task's trial generates no answer unless its objective
is the error (or ``search.trial_accuracy``): its ``val_accuracy`` is then None. The test split is never read."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from floe_dist.allocation import Allocation
from floe_dist.files import write_json_atomic
from floe_dist.resources import Resources


@dataclass
class TrialSpec:
    """``trial.json``: one trial, as the stage configurations it runs (written by ``floe-dist search``)."""
    trial_id: int
    config: dict  # the sampled point: rank, lr (and allocation, experts, top_k)
    budget: int  # optimizer steps
    seed: int
    base_allocation: str  # the allocation whose layers the sampled rank is applied to
    objective: str  # loss | error
    recipe: dict = field(default_factory=dict)  # the Recipe it trains (train, ...) and scores (evaluate, ...) with
    line: str = ""  # the training folder all trials of this configuration continue (empty: the trial's own)
    generations: bool = True  # generate the validation answers of a generative task (the error objective needs them)

    def save(self, trial_dir: Path) -> Path:
        return write_json_atomic(trial_dir / "trial.json", asdict(self))

    @classmethod
    def load(cls, trial_dir: Path) -> TrialSpec:
        return cls(**json.loads((trial_dir / "trial.json").read_text()))


def searched_allocation(base: Allocation, config: dict, method: str | None = None) -> Allocation:
    """The base allocation at a sampled point: its ranks scaled so the largest is ``rank`` (the shape of a
    heterogeneous allocation is kept), or, when experts are searched too, every module resized; a searched
    ``top_k`` then applies to every top-k router."""
    if config.get("experts"):
        sized = base.resized(int(config["rank"]), int(config["experts"]), method=method)
    else:
        sized = base.rank_scaled(int(config["rank"]), method=method)
    return sized.with_top_k(int(config["top_k"])) if config.get("top_k") else sized


def run_trial(trial_dir: Path, resources: Resources) -> dict | None:
    """Train and score one trial on this rank; the result on rank 0 (None on the others). A warm worker passes
    the resources it keeps between trials; a trial computes the same on a fresh worker as on a warm one."""
    from floe_dist.distributed.runtime import discover
    from floe_dist.evaluation import evaluate, evaluate_lm
    from floe_dist.recipe import Recipe, from_dict
    from floe_dist.trainer import Trainer

    start = time.time()
    spec = TrialSpec.load(trial_dir)
    recipe = from_dict(Recipe, spec.recipe)
    allocation_file = Path(recipe.allocate.file)
    if discover().is_main:
        base = Allocation.load(spec.base_allocation)
        searched_allocation(base, spec.config).save(allocation_file)
    else:  # every rank of the group reads the same file
        while not allocation_file.is_file():
            time.sleep(0.1)
    recipe.validate("train", "model", "data", "parallel")
    trainer = Trainer(recipe, str(Path(spec.line or trial_dir) / "train"), resources)
    summary = trainer.fit()
    layout, lm, tokenizer = trainer.layout, trainer.lm, trainer.tokenizer
    trainer.engine.destroy()
    del trainer
    eval_start = time.time()
    if layout.world_size == 1 and layout.zero_stage < 3:  # the trained modules as they are
        scored = evaluate_lm(recipe, lm, tokenizer, layout.torch_device, resources, per_example=True,
                             generations=spec.generations)
    elif layout.world_size == 1:  # partitioned on one rank: the export on a whole backbone (kept by a warm worker)
        scored = evaluate(recipe, resources=resources, per_example=True, generations=spec.generations)
    else:  # the export (written before fit returned) on the trial's ranks, each scoring its share (ZeRO-3 as trained)
        scored = evaluate(recipe, resources=resources, per_example=True, on_ranks=True, generations=spec.generations)
    if not layout.is_main:
        return None
    cost = scored["loss"] if spec.objective == "loss" else 1.0 - scored["accuracy"]
    per_example = scored.get("example_losses" if spec.objective == "loss" else "example_errors")
    return {"cost": cost, "val_loss": scored["loss"], "val_accuracy": scored["accuracy"],
            **({"example_costs": [round(c, 6) for c in per_example]} if per_example is not None else {}),
            "val_examples": scored["examples"], "train_seconds": summary["step_seconds"],
            "resumed_from": summary["resumed_from"],
            "eval_seconds": time.time() - eval_start, "seconds": time.time() - start}


def main(argv: list[str]) -> int:
    from floe_dist.distributed.runtime import shutdown

    args = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    if len(args) != 1 or not (Path(args[0]) / "trial.json").is_file():
        print("usage: python -m floe_dist.search.trial TRIAL_DIR (a folder holding trial.json)", file=sys.stderr)
        return 2
    try:
        result = run_trial(Path(args[0]), Resources())
    finally:
        shutdown()
    if result is not None:
        write_json_atomic(Path(args[0]) / "result.json", result)  # last: its presence means success
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
