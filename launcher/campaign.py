"""``floe-dist campaign``: the stages of one recipe end to end, each resumable, each timed.

    floe-dist campaign                                   # recipes/smollm2-sst2.yaml: SmolLM2-135M on SST-2
    floe-dist campaign --config tiny                     # FLoE's path on a tiny random Llama, about a minute
    floe-dist campaign --config my.yaml --train.lr 1e-4 --output runs/mine

Stages: prepare the model (GGUF -> safetensors, cached) -> zero-shot accuracy -> allocate (for FLoE,
the score stage: warm-up and Fisher layer selection; any other registered method otherwise) -> search
(SMAC picks rank and learning rate for the allocated layers from short parallel trials) -> train ->
accuracy of the exported adapter. Score and train run as ``torchrun`` (or ``srun``) groups of
``parallel.nproc`` ranks per node; search trials are single processes, as many at once as the machine
holds. The resolved recipe is written to ``<output>/recipe.yaml`` and each stage's folder. A stage
whose result file exists is skipped when the campaign is rerun, so an interrupted campaign continues
where it stopped; a rerun whose recipe changed a setting that a finished stage used is refused with
the keys that changed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from floe_dist.distributed.runtime import die_with_parent, free_port
from floe_dist.files import write_json_atomic
from floe_dist.recipe import Recipe, read_recipe, write_recipe
from floe_dist.resume import changed_settings, describe
from floe_dist.tracking import OBSERVING

# Settings each finished stage's result depends on (prefixes of the recipe's dotted keys) ...
EVALUATION = ("evaluate.limit", "evaluate.max_new_tokens", "evaluate.stop", "evaluate.lm_eval")
DEPENDS = {"prepare": ("model.name",), "zero_shot": ("model.", "data.", *EVALUATION)}
DEPENDS["allocate"] = ("model.", "data.", "adapter.", "score.", "allocate.", "parallel.zero", "parallel.ep_size")
DEPENDS["search"] = DEPENDS["allocate"] + ("search.",)
DEPENDS["train"] = DEPENDS["search"] + ("train.", "parallel.nproc", "parallel.nodes")
DEPENDS["final_eval"] = DEPENDS["train"] + EVALUATION
# ... except those that say only how to run.
HOW_TO_RUN = {"parallel.launcher", "parallel.gpus_per_node", "search.runner", "search.workers", "search.trial_timeout",
              "search.trial_threads", "search.trial_workers", "search.sbatch_args", "evaluate.batch_size",
              *OBSERVING}
RESULT_FILES = {"prepare": "prepare.json", "zero_shot": "zero_shot.json", "allocate": "allocate_stage.json",
                "search": "search_stage.json", "train": "train_stage.json", "final_eval": "final_eval.json"}


SECTIONS = ()  # every section: --help shows them all
OUTPUT = "runs/campaign"


def check_finished_stages(out: Path, recipe: Recipe) -> None:
    """Refuse a rerun whose recipe changed what a finished stage used; name the keys."""
    saved = out / "recipe.yaml"
    if not saved.is_file():
        return
    changed = changed_settings(read_recipe(saved).flat(), recipe.flat(), HOW_TO_RUN)
    stale = [stage for stage, file in RESULT_FILES.items() if (out / file).is_file()
             and any(key.startswith(DEPENDS[stage]) for key in changed)]
    if stale:
        raise ValueError(f"{out} holds finished stages ({', '.join(stale)}) made with other settings: "
                         f"{describe(changed)}; use another --output, or the same settings to resume it")


class Campaign:
    """The stages in order; ``step`` runs one unless its result file exists."""

    def __init__(self, recipe: Recipe, output: str):
        self.recipe, self.out = recipe, Path(output)
        self.timings: dict[str, float] = {}

    def step(self, name: str, fn: Callable[[], dict]) -> dict:
        result_file = self.out / RESULT_FILES[name]
        if result_file.is_file():
            print(f"[campaign] {name}: done earlier ({result_file})")
            result = json.loads(result_file.read_text())
            self.timings[name] = result.get("_seconds", 0.0)
            return result
        print(f"[campaign] {name} ...", flush=True)
        start = time.time()
        result = fn()
        result["_seconds"] = self.timings[name] = time.time() - start
        write_json_atomic(result_file, result)
        return result

    def launch(self, stage: str, recipe: Recipe, folder: Path, result: str) -> dict:
        """Run a stage as a group of ranks (torchrun here, or srun inside an sbatch job) on ``recipe``, written
        as ``<folder>/recipe.yaml``: the stage reads exactly the objects the campaign made."""
        from launcher.cluster import srun_stage_command

        p = self.recipe.parallel
        argv = [stage, "--config", str(write_recipe(folder, recipe)), "--output", str(folder)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // p.nproc))}
        if p.launcher == "srun":  # this script runs on the allocation's first node, MASTER_ADDR
            env["MASTER_PORT"] = str(free_port())
            command = srun_stage_command(argv, p.nodes, p.nproc)
        else:
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={p.nproc}",
                       "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "launcher.cli", *argv]
        code = subprocess.call(command, env=env, preexec_fn=die_with_parent)  # a killed campaign leaves no stage
        if code != 0:
            raise ChildProcessError(f"{stage} stage failed (exit {code}, its error is printed above); "
                                    f"rerun the campaign to resume it")
        return json.loads((folder / result).read_text())


def validate(recipe: Recipe) -> None:
    """Every section's problems and the campaign's own, at once, before any stage runs."""
    problems, p = recipe.problems(), recipe.parallel
    if p.nodes > 1 and p.launcher != "srun":
        problems.append("parallel.nodes > 1 needs parallel.launcher srun (run the campaign from an sbatch "
                        "script: floe-dist slurm render --config RECIPE)")
    if p.launcher == "srun" and "MASTER_ADDR" not in os.environ:
        problems.append("parallel.launcher srun needs MASTER_ADDR (the sbatch template exports it)")
    from floe_dist.methods import REGISTRY

    if recipe.allocate.file is None and recipe.allocate.method not in REGISTRY:
        problems.append(f"allocate.method {recipe.allocate.method!r} is not one of {sorted(REGISTRY)}")
    if recipe.search.enabled:  # now rather than after zero-shot and scoring
        try:
            searched_allocations(recipe)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("bad recipe:\n  - " + "\n  - ".join(problems))


def allocate_stage(c: Campaign) -> str:
    """The allocation to search and train: a given file, FLoE's score stage, or another method."""
    from floe_dist.stages.allocate import run as allocate

    a = c.recipe.allocate
    if a.file:
        return a.file
    folder = c.out / "allocate"
    if a.method == "floe":
        scored = c.step("allocate", lambda: c.launch("score", c.recipe, folder, "fisher.json"))
        print(f"[campaign] selected layers {scored['selected_layers']}")
    else:
        write_recipe(folder, c.recipe)
        c.step("allocate", lambda: {"method": a.method,
                                    "layers": sorted(allocate(c.recipe, str(folder / "allocation.json")).layers)})
    return str(folder / "allocation.json")


def searched_allocations(recipe: Recipe) -> list[tuple[str, str, str]]:
    """``search.allocations`` as (method, K, "") or (NAME, "", FILE) items; a bad item is a ValueError that names
    it, raised by ``validate`` before any stage runs."""
    items = []
    for item in (i.strip() for i in recipe.search.allocations.split(",") if i.strip()):
        name, eq, path = item.partition("=")
        if eq:
            items.append((name.strip(), "", path.strip()))
            continue
        method, _, k = item.partition(":")
        if method not in ("uniform", "random", "floe") or (k and not k.isdigit()) or (method == "uniform" and k):
            raise ValueError(f"search.allocations: {item!r} is not uniform, random, random:K, floe:K or NAME=FILE")
        if method == "floe" and (recipe.allocate.method != "floe" or recipe.allocate.file):
            raise ValueError(f"search.allocations: {item!r} needs Fisher scores: allocate.method floe (and no "
                             f"allocate.file)")
        items.append((method, k, ""))
    return items


def search_candidates(c: Campaign, selected: str) -> dict[str, str]:
    """{name: allocation file} the search chooses among: the allocate stage's, then ``search.allocations``."""
    from floe_dist.allocation import Allocation
    from floe_dist.stages.allocate import run as allocate

    a = c.recipe.allocate
    files = {"given" if a.file else a.method: selected}
    folder = c.out / "allocate" / "candidates"
    for method, k, path in searched_allocations(c.recipe):
        if path:
            files[method] = path
            continue
        layers = int(k) if k else len(Allocation.load(selected).layers)
        name = f"{method}-{layers}" if method != "uniform" else method
        if name in files:  # e.g. uniform when allocate.method is uniform: that candidate is there already
            continue
        files[name] = str(folder / f"{name}.json")
        if not Path(files[name]).is_file():
            chosen = replace(a, method=method, k=None if method == "uniform" else layers,
                             scores=str(c.out / "allocate" / "fisher.json"))
            allocate(replace(c.recipe, allocate=chosen), files[name])
    return files


def run(recipe: Recipe, output: str = OUTPUT) -> dict:
    from floe_dist.evaluation import evaluate
    from floe_dist.modeling.backbone import resolve_model
    from floe_dist.stages.search import run as search

    validate(recipe)
    c = Campaign(recipe, output)
    check_finished_stages(c.out, recipe)
    write_recipe(c.out, recipe)
    c.step("prepare", lambda: {"model_dir": str(resolve_model(recipe.model.name))})
    zero_shot = c.step("zero_shot", lambda: evaluate(recipe))
    allocation, lr = allocate_stage(c), recipe.train.lr
    if recipe.search.enabled:
        chosen = replace(recipe.allocate, file=allocation)
        candidates = ""
        if recipe.search.allocations:
            files = search_candidates(c, allocation)
            chosen, candidates = replace(chosen, file=None), ",".join(f"{n}={f}" for n, f in files.items())
        searched = replace(recipe, allocate=chosen, search=replace(recipe.search, candidates=candidates))
        write_recipe(c.out / "search", searched)
        found = c.step("search", lambda: search(searched, str(c.out / "search")))
        allocation, lr = str(c.out / "search" / "allocation.json"), found["lr"]
        print(f"[campaign] search chose allocation {found.get('allocation')}, rank {found['rank']}, learning rate "
              f"{lr:.2e} (proposed by: {found.get('incumbent_origin') or 'unknown'}; top-budget origins "
              f"{found.get('top_budget_origins')})")
    trained_recipe = replace(recipe, allocate=replace(recipe.allocate, file=allocation),
                             train=replace(recipe.train, lr=lr))
    trained = c.step("train", lambda: c.launch("train", trained_recipe, c.out / "train", "train.json"))
    adapter = replace(recipe.model, adapter=str(c.out / "train" / "adapter"))
    final = c.step("final_eval", lambda: evaluate(replace(recipe, model=adapter)))
    return summarise(c, allocation, lr, zero_shot, trained, final)


def summarise(c: Campaign, allocation: str, lr: float, zero_shot: dict, trained: dict, final: dict) -> dict:
    r = c.recipe
    searched = json.loads((c.out / RESULT_FILES["search"]).read_text()) if r.search.enabled else {}
    summary = {"model": r.model.name, "task": r.data.name, "method": r.allocate.method,
               "searched_allocation": searched.get("allocation"), "candidates": searched.get("candidates"),
               "ranks": r.parallel.nproc * r.parallel.nodes, "allocation": allocation, "lr": lr,
               "zero_shot_accuracy": zero_shot["accuracy"], "final_accuracy": final["accuracy"],
               "trainable_parameters": trained["trainable_parameters"], "stage_seconds": c.timings,
               "recipe": str(c.out / "recipe.yaml")}
    write_json_atomic(c.out / "campaign.json", summary)
    print("\n[campaign] summary")
    print(f"  model / task          {r.model.name} / {r.data.name} ({final['examples']} test examples)")
    print(f"  allocation            {r.allocate.file or r.allocate.method}")
    if summary["candidates"] and len(summary["candidates"]) > 1:
        from floe_dist.search.report import candidate_costs, unresolved

        costs = ", ".join(candidate_costs(summary["candidates"]))
        print(f"  searched allocations  {summary['searched_allocation']} won (best validation cost: {costs})")
        close = unresolved(summary["candidates"], summary["searched_allocation"])
        if close:
            print(f"                        (its margin over {', '.join(close)} is within two paired standard "
                  f"errors: the validation set does not resolve the choice)")
    print(f"  zero-shot accuracy    {zero_shot['accuracy']:.4f}")
    print(f"  final accuracy        {final['accuracy']:.4f}")
    print(f"  trainable parameters  {trained['trainable_parameters']:,}")
    for name, seconds in c.timings.items():
        print(f"  {name:<21} {seconds:7.1f} s")
    print(f"  total                 {sum(c.timings.values()):7.1f} s")
    return summary
