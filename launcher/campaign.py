"""``floe-dist campaign``: the stages of one recipe end to end, each resumable, each timed.

    floe-dist campaign                                   # recipes/smollm2-sst2.yaml: SmolLM2-135M on SST-2
    floe-dist campaign --config tiny                     # FLoE's path on a tiny random Llama, about a minute
    floe-dist campaign --config my.yaml --train.lr 1e-4 --output runs/mine

Stages: prepare the model (GGUF -> safetensors, cached) -> zero-shot accuracy -> allocate (for FLoE, the score
stage: warm-up and Fisher layer selection; any other registered method otherwise) -> search (SMAC picks rank and
learning rate for the allocated layers from short parallel trials) -> train -> accuracy of the exported adapter.
With a local search on several workers the zero-shot evaluation is the search's spare work instead: a worker that
has no trial to run while others train runs it (floe_dist/search/spare_work.py). Score and train run as groups of
``parallel.nproc`` ranks per node: on this machine forked from the campaign's zygote, which has the stack imported
(floe_dist/distributed/forked_ranks.py; a campaign called as a function starts torchrun or one process), under Slurm
as ``srun`` steps; search trials are single processes (forked from it too), as many at once as the machine holds.
The resolved recipe is written to ``<output>/recipe.yaml`` and each stage's folder. A stage whose result file exists
is skipped when the campaign is rerun, so an interrupted campaign continues where it stopped; a rerun whose recipe
changed a setting that a finished stage used is refused with the keys that changed.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from floe_dist.distributed.runtime import die_with_parent, free_port
from floe_dist.files import write_json_atomic
from floe_dist.recipe import Recipe, marked, read_recipe, write_recipe
from floe_dist.resume import changed_settings, describe

# Settings each finished stage's result depends on (prefixes of the recipe's dotted keys) ...
EVALUATION = ("evaluate.limit", "evaluate.max_new_tokens", "evaluate.stop", "evaluate.lm_eval")
DEPENDS = {"prepare": ("model.name",), "zero_shot": ("model.", "data.", *EVALUATION)}
DEPENDS["allocate"] = ("model.", "data.", "adapter.", "score.", "allocate.", "parallel.zero", "parallel.ep_size")
DEPENDS["search"] = DEPENDS["allocate"] + ("search.",)
DEPENDS["train"] = DEPENDS["search"] + ("train.", "parallel.nproc", "parallel.nodes")
DEPENDS["final_eval"] = DEPENDS["train"] + EVALUATION
# ... except those that say only how to run (but the world size: it sets the final run's global batch) or what is
# logged, and the budget: it moves where training ends, not what a finished stage did (a resumed campaign takes it).
HOW_TO_RUN = (marked("runs", "observes") - {"parallel.nproc", "parallel.nodes"}) | {"campaign.budget",
                                                                                   "campaign.search_share"}
JOB_END_MARGIN = 60.0  # of an sbatch job's time left, kept for the campaign to end in: summary, srun steps' teardown
START_MARGIN = 8.0  # seconds a launched stage takes to start its processes before its own clock runs (4 s measured)
RESERVE_PROBE_BATCHES = 8  # test batches from which the final run times one (train.eval_reserve): the timing then
# costs at most an eighth of the evaluation; the arithmetic recipe's 7 took 15-20 s against a zero-shot evaluation's
# 19-22 s (campaign_vs_peft_arithmetic_packed.json), a gap of about what timing a batch would cost
FORKED_START_MARGIN = 2.0  # the same forked from the zygote (the tiny campaign's whole final run: 1.8 s, measured)
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
        self.eval_reserve = 0.0  # seconds kept back for the final evaluation: the zero-shot one's, once it ran

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

    def spent(self) -> float:
        """Seconds the finished stages took (a resumed campaign counts those of its earlier runs)."""
        return sum(self.timings.values())

    def time_left(self) -> float:
        """What ``campaign.budget`` leaves after the finished stages, keeping back the final evaluation (as long as
        the zero-shot one took; nothing before it ran, as when the search runs it) and a stage's start."""
        budget = self.recipe.campaign.budget_seconds()
        return budget - self.spent() - self.eval_reserve - start_margin()

    def wait_for_imports(self) -> None:
        """Before the final run's time limit is set, wait until the zygote has imported the stack, and count the
        wait as spent ("imports"): a fresh campaign's earlier stages waited for it, but one resumed at its final
        run paid it out of that run's limit (``tiny`` resumed with a 90 s budget: its stages took 94.5 s, the final
        run 4.7 s more than its own clock; with the wait counted, 90.3 s). Only the final run's limit needs it: the
        search's is not a deadline, and what a wait takes from it comes back to the final run, planned from what the
        stages took."""
        from floe_dist.distributed.forked_ranks import zygote

        start, forks = time.time(), zygote()
        if forks is not None:
            forks.ready()
        self.timings["imports"] = time.time() - start

    def zero_shot(self, recipe: Recipe) -> dict:
        """The zero-shot evaluation: the search's spare work's result when a worker ran it, else run here (under a
        budget, for at most ``campaign.zero_shot_share`` of it). Its duration for the whole test split, on this
        process's threads, is what ``time_left`` keeps back for the final evaluation."""
        import torch

        from floe_dist.search.spare_work import evaluation_result

        def run() -> dict:
            result = evaluation_result(self.out / "zero_shot", recipe)
            if result is None:
                result = evaluation(self, recipe, "zero_shot", self.zero_shot_stop())
                return {**result, "reserve_seconds": whole_split_seconds(result)} if "examples_of" in result else result
            # it ran on a search worker of result["threads"] threads, in its spare time
            part = f", {result['examples']} of {result['examples_of']} examples" if "examples_of" in result else ""
            print(f"[campaign] zero_shot: a search worker ran it while it had no trial to run ({result['seconds']:.0f}s"
                  f" on {result['threads']} thread(s){part})")
            scale = 1.0 if torch.cuda.is_available() else eval_scale(result["threads"], torch.get_num_threads())
            pace = validation_pace(self.out / "search" / "search.json") if "choice_loss" in result else None
            whole = whole_split_seconds(result, pace)  # a generative trial's validation need not generate
            return {**result, "on_search_worker": True, "reserve_seconds": whole * scale}

        result = self.step("zero_shot", run)
        self.eval_reserve = result.get("reserve_seconds", result["_seconds"])
        return result

    def zero_shot_stop(self) -> Callable[[], bool] | None:
        """Under a budget, when the zero-shot evaluation run here ends: after ``campaign.zero_shot_share`` of the
        budget, with the part of the test split it scored. It decides nothing (the search chooses on validation
        data), so the rest of the budget trains the final run."""
        budget = self.recipe.campaign.budget_seconds()
        if budget is None:
            return None
        deadline = time.time() + self.recipe.campaign.zero_shot_share * budget
        return lambda: time.time() > deadline

    def launch(self, stage: str, recipe: Recipe, folder: Path, result: str) -> dict:
        """Run a stage as a group of ranks (local ranks forked from the zygote or started, ``run_local_ranks``; srun
        inside an sbatch job) on ``recipe``, written as ``<folder>/recipe.yaml``: the stage reads exactly the
        objects the campaign made. A killed campaign leaves no stage."""
        from floe_dist.distributed.forked_ranks import zygote
        from launcher.cluster import run_local_ranks, srun_stage_command, threads_per_rank

        p = self.recipe.parallel
        argv = [stage, "--config", str(write_recipe(folder, recipe)), "--output", str(folder)]
        env = {**os.environ, "OMP_NUM_THREADS": threads_per_rank(p.nproc)}
        if p.launcher == "srun":  # this script runs on the allocation's first node, MASTER_ADDR
            env["MASTER_PORT"] = str(free_port())
            code = subprocess.call(srun_stage_command(argv, p.nodes, p.nproc), env=env, preexec_fn=die_with_parent)
        else:
            if zygote() is not None:  # no interpreter start, no imports
                print(f"[campaign] {stage}: {p.nproc} rank(s) forked from the campaign's zygote", flush=True)
            code = run_local_ranks(argv, p.nproc, env)
        if code != 0:
            raise ChildProcessError(f"{stage} stage failed (exit {code}, its error is printed above); "
                                    f"rerun the campaign to resume it")
        return json.loads((folder / result).read_text())


def start_margin() -> float:
    """What the final run's start is given: forked ranks start at once, fresh interpreters import first."""
    from floe_dist.distributed.forked_ranks import zygote

    return FORKED_START_MARGIN if zygote() is not None else START_MARGIN


def problems(recipe: Recipe) -> list[str]:
    """Every section's problems and the campaign's own (also what ``--print_config`` reports)."""
    problems, p = recipe.problems(), recipe.parallel
    if p.nodes > 1 and p.launcher != "srun":
        problems.append("parallel.nodes > 1 needs parallel.launcher srun (run the campaign from an sbatch "
                        "script: floe-dist slurm --action render --config RECIPE)")
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
    c = recipe.campaign  # search_share in [0, 1) too; a job's budget is checked once read (budget_in_job)
    budget = None if c.problems() or c.from_job else c.budget_seconds()
    least = smallest_budget(recipe) if budget is not None else 0.0
    if budget is not None and budget < least:
        problems.append(f"campaign.budget {recipe.campaign.budget} ({budget:.0f}s) cannot hold the smallest trial and "
                        f"a final run: give at least {least:.0f}s (what starting their stages takes; the steps and "
                        f"both evaluations come on top)")
    elif budget is not None and recipe.search.enabled and recipe.campaign.search_share == 0:
        problems.append("campaign.search_share 0 leaves the search no time: give it a share, or search.enabled false")
    return problems


def smallest_budget(recipe: Recipe) -> float:
    """The least ``campaign.budget`` known to be needed before any step's speed is: a launched stage's start for
    the scoring stage, the search's share holding one trial's start, the final run's start and first checkpoint
    (``train_time``'s floor), and the margin ``time_left`` keeps back. Steps and evaluations come on top, measured
    as the campaign runs (``search_time`` and ``train_time`` refuse then with the measured figures)."""
    scoring = START_MARGIN if recipe.allocate.method == "floe" and not recipe.allocate.file else 0.0
    share = recipe.campaign.search_share if recipe.search.enabled else 0.0  # no search: the final run gets it all
    search = START_MARGIN / share if share > 0 else 0.0
    return START_MARGIN + scoring + max(search, 2 * START_MARGIN / (1 - share))


def validate(recipe: Recipe) -> None:
    """``problems`` at once, before any stage runs, and a note where the warm-up outlasts the shortest trials."""
    found = problems(recipe)
    if found:
        raise ValueError("bad recipe:\n  - " + "\n  - ".join(found))
    s = recipe.search
    if s.enabled and recipe.train.warmup > (s.min_steps if s.mode in ("smac", "random") else s.max_steps):
        print(f"[campaign] note: the warm-up ({recipe.train.warmup} steps) outlasts the shortest trials "
              f"({s.min_steps} steps): they are the final run's first steps, so they compare learning rates below "
              f"their peak; train.warmup_steps sets it")


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
    from floe_dist.modeling.backbone import resolve_model
    from floe_dist.search.spare_work import evaluation_job
    from floe_dist.stages.search import run as search

    recipe = budget_in_job(recipe, Path(output))
    validate(recipe)
    c = Campaign(recipe, output)
    check_finished_stages(c.out, recipe)
    write_recipe(c.out, recipe)
    recipe = c.recipe = budgeted(recipe, c.out)
    c.step("prepare", lambda: {"model_dir": str(resolve_model(recipe.model.name))})
    base = replace(recipe, model=replace(recipe.model, adapter=None))
    spare = zero_shot_on_search_worker(c, base)
    zero_shot = None if spare else c.zero_shot(base)
    allocation, lr = allocate_stage(c), recipe.train.lr
    if recipe.search.enabled:
        chosen = replace(recipe.allocate, file=allocation)
        candidates = ""
        if recipe.search.allocations:
            files = search_candidates(c, allocation)
            chosen, candidates = replace(chosen, file=None), ",".join(f"{n}={f}" for n, f in files.items())
        searched = replace(recipe, allocate=chosen, search=replace(recipe.search, candidates=candidates))
        if not (c.out / RESULT_FILES["search"]).is_file():  # a finished search's recipe stays as it ran
            if recipe.campaign.budget:
                searched = replace(searched, search=replace(searched.search, time_limit=search_time(c)))
            write_recipe(c.out / "search", searched)
        jobs = [evaluation_job("the zero-shot evaluation", c.out / "zero_shot", base)] if spare else []
        found = c.step("search", lambda: search(searched, str(c.out / "search"), jobs))
        allocation, lr = str(c.out / "search" / "allocation.json"), found["lr"]
        print(f"[campaign] search chose allocation {found.get('allocation')}, rank {found['rank']}, learning rate "
              f"{lr:.2e} (proposed by: {found.get('incumbent_origin') or 'unknown'}; top-budget origins "
              f"{found.get('top_budget_origins')})")
    zero_shot = zero_shot or c.zero_shot(base)
    trained_recipe = replace(recipe, allocate=replace(recipe.allocate, file=allocation),
                             train=replace(recipe.train, lr=lr))
    if recipe.campaign.budget and not (c.out / RESULT_FILES["train"]).is_file():
        trained_recipe = replace(trained_recipe, train=replace(trained_recipe.train, time_limit=train_time(c),
                                                               eval_reserve=generation_reserve(c, recipe, zero_shot)))
    trained = c.step("train", lambda: train_stage(c, trained_recipe))
    adapter = replace(recipe.model, adapter=str(c.out / "train" / "adapter"))
    final = c.step("final_eval", lambda: evaluation(c, replace(recipe, model=adapter), "final_eval"))
    return summarise(c, allocation, lr, zero_shot, trained, final)


def evaluation(c: Campaign, recipe: Recipe, name: str, stop: Callable[[], bool] | None = None) -> dict:
    """An evaluation of the campaign: in its own process, or launched on the job's ranks (``evaluate.ranks``; auto:
    when ZeRO-3 training spreads a backbone that does not fit one device) as the ``evaluate`` stage, each rank
    scoring its share of the examples (floe_dist/distributed/sharded_eval.py); ``stop``: in its own process only
    (floe_dist/evaluation.py ``evaluate_lm``)."""
    from floe_dist.evaluation import evaluate

    if not on_ranks(recipe):
        return evaluate(recipe, stop=stop)
    return c.launch("evaluate", recipe, c.out / name, "evaluate.json")


def whole_split_seconds(result: dict, pace: float | None = None) -> float:
    """An evaluation's seconds for its whole split: a stopped one's loading, and the split's tokens sorted at once at
    the seconds a token took in its chunks finished (``padded_tokens``: chunks of random examples pad more; a
    generative evaluation, whose time goes with the tokens it writes, at the seconds an example took), or every
    example at ``pace`` where that is faster."""
    if "examples_of" not in result:
        return result["seconds"]
    finished = result["seconds_per_example"] * result["examples"]
    scoring = (finished * result["split_tokens"] / result["scored_tokens"] if result.get("scored_tokens")
               else result["seconds_per_example"] * result["examples_of"])
    return result["seconds"] - result["scoring_seconds"] + min(scoring, (pace or float("inf")) * result["examples_of"])


def validation_pace(search_file: Path) -> float | None:
    """The median seconds a search trial took to score one validation example (on a worker's threads, with its
    adapter): a second measure of the final evaluation's pace where the zero-shot one stopped after a batch or two,
    whose pace carries the first forward's start."""
    if not search_file.is_file():
        return None
    paces = [t["metrics"]["eval_seconds"] / t["metrics"]["val_examples"]
             for t in json.loads(search_file.read_text())["trials"]
             if (t.get("metrics") or {}).get("eval_seconds") and t["metrics"].get("val_examples")]
    return statistics.median(paces) if paces else None


def on_ranks(recipe: Recipe) -> bool:
    """Whether an evaluation runs on the job's ranks rather than in one process (``evaluation``)."""
    from floe_dist.distributed.engine import read_config
    from floe_dist.distributed.layout import zero_stage

    p, choice = recipe.parallel, recipe.evaluate.ranks
    return choice == "all" or (choice == "auto" and zero_stage(read_config(p.zero)) == 3
                               and p.nproc * p.nodes > 1 and not fits_one_device(recipe.model))


def zero_shot_on_search_worker(c: Campaign, recipe: Recipe) -> bool:
    """Whether the zero-shot evaluation (of ``recipe``) is the search's spare work (``campaign.zero_shot spare``): a
    local search on several workers of one process each, an evaluation in one process whose backbone fits beside a
    worker's own, and neither stage finished (a resumed campaign whose search is done runs it here)."""
    from floe_dist.search.runners import default_workers

    s = recipe.search
    if recipe.campaign.zero_shot != "spare" or not s.enabled or s.runner != "local" or s.trial_nproc != 1 \
            or on_ranks(recipe):
        return False
    if (s.workers or default_workers(s.trial_nproc, s.trial_threads)) < 2 or not fits_one_device(recipe.model, 2):
        return False
    return not any((c.out / RESULT_FILES[stage]).is_file() for stage in ("zero_shot", "search"))


def eval_scale(measured_threads: int, threads: int) -> float:
    """What an evaluation timed on ``measured_threads`` CPU threads is scaled by for the final one on ``threads``:
    the square root of their ratio, a speed-up the final evaluation has so far always beaten (1.46-2.1 on two threads
    against one, SST-2 at 1500 s; the ratio itself, 2, fell short there and on Social IQa, whose 610 examples then
    ran 11-18 s past the reserve and the campaigns as much past their budget). A Slurm job's limit is hard: an unused
    second costs a second of training, an overrun the final evaluation."""
    return min(1.0, measured_threads / threads) ** 0.5


def fits_one_device(model, copies: int = 1) -> bool:
    """Whether ``copies`` of the backbone's weights (their files' size, a quarter of it in NF4) take at most 80% of
    one GPU's memory, or of this machine's available memory without one."""
    import psutil
    import torch

    from floe_dist.modeling.backbone import resolve_model

    stored = sum(f.stat().st_size for f in Path(resolve_model(model.name)).glob("*.safetensors"))
    need = copies * (stored / 4 if model.quant == "nf4" else stored)
    if torch.cuda.is_available():
        return need <= 0.8 * torch.cuda.get_device_properties(0).total_memory
    return need <= 0.8 * psutil.virtual_memory().available


def finished_seconds(out: Path) -> float:
    """What the stages finished in ``out`` took (``Campaign.spent`` before they are read)."""
    return sum(json.loads((out / f).read_text()).get("_seconds", 0.0) for f in RESULT_FILES.values()
               if (out / f).is_file())


def budget_in_job(recipe: Recipe, out: Path) -> Recipe:
    """Inside an sbatch job, the budget against the job's time limit, before any stage: ``campaign.budget job``
    becomes what the job has left (less ``JOB_END_MARGIN``) on top of what the stages finished in ``out`` took (a
    requeued job's earlier runs), in seconds; a duration that would outlast the job is refused, since Slurm would
    kill the final run or its evaluation."""
    from launcher.cluster import job_seconds_left

    c, job = recipe.campaign, os.environ.get("SLURM_JOB_ID")
    if not c.from_job and not (job and c.budget.strip() and not c.problems()):
        return recipe
    if not job:
        raise ValueError("campaign.budget job spends the time an sbatch job has left: run the campaign in one "
                         "(floe-dist slurm --template campaign), or give a duration such as 2h")
    try:
        left = job_seconds_left(job)
    except (ValueError, FileNotFoundError):
        if c.from_job:
            raise
        return recipe  # a duration, where the job's limit cannot be read: as outside a job
    if left is None:
        if c.from_job:
            raise ValueError(f"campaign.budget job: Slurm job {job} has no time limit; give a duration such as 2h")
        return recipe
    spent = finished_seconds(out)
    if c.from_job:
        if left <= JOB_END_MARGIN:
            raise ValueError(f"campaign.budget job: Slurm job {job} has {left:.0f}s left, no more than the "
                             f"{JOB_END_MARGIN:.0f}s the campaign keeps to end in")
        print(f"[campaign] campaign.budget job: Slurm job {job} has {left:.0f}s left; the campaign spends "
              f"{left - JOB_END_MARGIN:.0f}s of it ({JOB_END_MARGIN:.0f}s kept to end in)"
              + (f", on top of the {spent:.0f}s its finished stages took" if spent else ""))
        return replace(recipe, campaign=replace(c, budget=f"{spent + left - JOB_END_MARGIN:.0f}"))
    to_spend = c.budget_seconds() - spent
    if to_spend > left - JOB_END_MARGIN:
        raise ValueError(f"campaign.budget {c.budget} leaves {to_spend:.0f}s to spend, but Slurm job {job} ends in "
                         f"{left:.0f}s ({JOB_END_MARGIN:.0f}s of it kept to end in): give sbatch a longer --time, a "
                         f"smaller budget, or campaign.budget job")
    return recipe


def budgeted(recipe: Recipe, out: Path) -> Recipe:
    """With ``campaign.budget``, the warm-up fixed in steps (``warmup_ratio`` x ``train.steps``) before anything
    trains: the trials and the final run, whose length the budget sets later, then share it. A resumed campaign
    whose budget changed says so (the stages still to run take the new one)."""
    c, t = recipe.campaign, recipe.train
    record = out / "budget.json"
    before = json.loads(record.read_text()) if record.is_file() else {"budget": c.budget}
    if before["budget"] != c.budget:
        spent = finished_seconds(out)
        left = {k: f"{s - spent:.0f}s" if s else "train.steps" for k, s in
                (("before", before.get("seconds")), ("now", c.budget_seconds()))}
        print(f"[campaign] campaign.budget changed from {before['budget'] or 'none'} to {c.budget or 'none'}: after "
              f"the {spent:.0f}s the finished stages took, the stages still to run get {left['now']} instead of "
              f"{left['before']}")
    write_json_atomic(record, {"budget": c.budget, "seconds": c.budget_seconds()})
    if not c.budget or t.warmup_steps is not None:
        return recipe
    return replace(recipe, train=replace(t, warmup_steps=t.warmup))


def search_time(c: Campaign) -> float:
    """The search's share of the budget that zero-shot evaluation and allocation left (floe-dist plan shows it)."""
    budget, left = c.recipe.campaign.budget_seconds(), c.time_left()
    if left <= 0:
        raise ValueError(f"campaign.budget {c.recipe.campaign.budget} ({budget:.0f}s) is spent before the search: "
                         f"zero-shot evaluation and allocation took {c.spent():.0f}s and the final evaluation needs "
                         f"about {c.eval_reserve:.0f}s; give at least those "
                         f"{budget - left:.0f}s plus the search's and the final run's time")
    share = c.recipe.campaign.search_share
    if share * left < START_MARGIN:
        raise ValueError(f"campaign.budget {c.recipe.campaign.budget} ({budget:.0f}s) leaves the search "
                         f"{share * left:.0f}s ({share:.0%} of {left:.0f}s) after {c.spent():.0f}s of zero-shot "
                         f"evaluation and allocation, less than a trial's start ({START_MARGIN:.0f}s); give at least "
                         f"{budget - left + START_MARGIN / share:.0f}s plus the trials' and the final run's steps")
    print(f"[campaign] budget {budget:.0f}s: {c.spent():.0f}s spent, {share:.0%} of the {left:.0f}s left "
          f"({share * left:.0f}s) for the search, the rest for the final run")
    return share * left


def train_time(c: Campaign) -> float:
    """What the budget leaves the final run (its own clock: loading, steps, checkpoints, export)."""
    c.wait_for_imports()
    budget, left = c.recipe.campaign.budget_seconds(), c.time_left()
    if left < 2 * START_MARGIN:
        evaluation = "" if c.eval_reserve <= c.spent() else " or evaluate.limit (the final evaluation's test examples)"
        raise ValueError(f"campaign.budget {c.recipe.campaign.budget} ({budget:.0f}s) leaves the final run "
                         f"{max(left, 0):.0f}s after {c.spent():.0f}s of earlier stages and about "
                         f"{c.eval_reserve:.0f}s kept for the final evaluation; give at least "
                         f"{budget - left + 2 * START_MARGIN:.0f}s plus the final run's time, or a smaller "
                         f"campaign.search_share{evaluation}")
    print(f"[campaign] budget {budget:.0f}s: {c.spent():.0f}s spent, {left:.0f}s for the final run")
    return left


def generation_reserve(c: Campaign, recipe: Recipe, zero_shot: dict) -> float | None:
    """What the final run may take back of the final evaluation's reserve (``train.eval_reserve``: its scoring part,
    loading left out): where the task generates, which the base model did more slowly than the trained one, the
    final run and evaluation each run in one process (the trainer times a batch as the evaluation will run it), and the
    test split holds RESERVE_PROBE_BATCHES batches or more."""
    single = recipe.parallel.nproc * recipe.parallel.nodes == 1 and not on_ranks(recipe)
    examples = zero_shot.get("examples_of", zero_shot.get("examples", 0))
    if "exact_match" not in zero_shot or not single or recipe.evaluate.lm_eval_task_list \
            or examples < RESERVE_PROBE_BATCHES * recipe.evaluate.batch_size:
        return None
    scoring = c.eval_reserve - (zero_shot["seconds"] - zero_shot.get("scoring_seconds", zero_shot["seconds"]))
    return scoring if scoring > 0 else None


def train_stage(c: Campaign, recipe: Recipe) -> dict:
    """The final run: it continues the search's winning line where it can (floe_dist/search/handoff.py)."""
    from floe_dist.search.handoff import HANDOFF, continue_line

    if c.recipe.search.enabled:
        line = Path(json.loads((c.out / RESULT_FILES["search"]).read_text())["line"]) / "train"
        resumed = (c.out / "train" / HANDOFF).is_file()  # a run interrupted after the handoff resumes its own steps
        handoff = continue_line(line, recipe, c.out / "train")
        if resumed:
            began = f"it continued the search's winning line at step {handoff['step']}" if handoff["step"] else \
                f"it started from step 0: {handoff['reason']}"
            print(f"[campaign] train resumes its own checkpoints ({began})")
        elif handoff["step"]:
            print(f"[campaign] train continues the search's winning line at step {handoff['step']} ({line})")
        else:
            print(f"[campaign] train starts from step 0: {handoff['reason']}")
    return c.launch("train", recipe, c.out / "train", "train.json")


def summarise(c: Campaign, allocation: str, lr: float, zero_shot: dict, trained: dict, final: dict) -> dict:
    r = c.recipe
    searched = json.loads((c.out / RESULT_FILES["search"]).read_text()) if r.search.enabled else {}
    summary = {"model": r.model.name, "task": r.data.name, "method": r.allocate.method,
               "searched_allocation": searched.get("allocation"), "candidates": searched.get("candidates"),
               "ranks": r.parallel.nproc * r.parallel.nodes, "allocation": allocation, "lr": lr,
               "zero_shot_accuracy": zero_shot["accuracy"], "zero_shot_examples": zero_shot["examples"],
               "final_accuracy": final["accuracy"],
               "trainable_parameters": trained["trainable_parameters"], "stage_seconds": c.timings,
               "train_steps": trained["steps"], "steps_reused": trained.get("resumed_from", 0),
               "budget_seconds": r.campaign.budget_seconds(), "start_margin_seconds": start_margin(),
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
    part = f" (on {zero_shot['examples']} of {zero_shot['examples_of']})" if "examples_of" in zero_shot else ""
    print(f"  zero-shot accuracy    {zero_shot['accuracy']:.4f}{part}")
    print(f"  final accuracy        {final['accuracy']:.4f}")
    print(f"  trainable parameters  {trained['trainable_parameters']:,}")
    print(f"  final training        {trained['steps']} steps, the first {summary['steps_reused']} the search's")
    for name, seconds in c.timings.items():
        print(f"  {name:<21} {seconds:7.1f} s")
    print(f"  total                 {sum(c.timings.values()):7.1f} s")
    return summary
