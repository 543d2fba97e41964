"""``floe-dist search``: pick the LoRA rank (and learning rate) with SMAC from short parallel trials.

    floe-dist search --allocation runs/score/allocation.json --output runs/search          # SMAC, local
    floe-dist search --config my_recipe.yaml --output runs/search    # the recipe's search section
    floe-dist search ... --mode grid                       # the exhaustive grid, for comparison
    floe-dist search ... --runner slurm --sbatch-args "--partition=gpu --gres=gpu:1"

Each trial trains the layers of ``allocate.file`` with a sampled rank and learning rate for a budget
of optimizer steps and reports its validation cost (floe_dist/search/trial.py). ``search.mode smac`` is SMAC's
multi-fidelity facade (Hyperband over steps, ``min_steps`` .. ``max_steps``); ``bo`` is plain
BO with every trial at ``max_steps``; ``grid`` tries every rank x learning rate (x experts x top-k) at
``max_steps``. SMAC and BO stop at ``max_trials`` or when the trials' steps would pass
``max_compute`` full trials, then wait for the running ones; the grid always runs to the end.

With ``search.candidates NAME=FILE,...`` the allocation is searched too (a categorical beside rank and lr);
``search.experts`` and ``search.top_ks`` add experts per module and experts per token (top-k routers) to the space.
Trials run on warm workers (floe_dist/search/worker.py): local processes by default, Slurm jobs with
``runner slurm`` and ``trial_workers warm``; ``trial_workers cold`` starts a process or job per trial.

Outputs in ``--output``: ``smac/`` (SMAC's own state), ``candidates/`` (the allocations trials scale),
``trials/NNNN/`` (one folder per trial: its spec, log, training run and result), ``workers/`` (warm
workers' task files and logs), ``search.json`` (every trial: config, budget, cost, status, wall time,
worker, origin), ``search.png`` and ``allocation.json`` (the chosen allocation at the chosen rank).

Resume: rerun the same command. ``search.json`` is rewritten after every event and SMAC's state
after every ask and tell, so no finished trial is lost or rerun; trials that were running are
issued again (a Slurm job that is still queued is adopted instead).
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from floe_dist.allocation import Allocation
from floe_dist.files import write_json_atomic
from floe_dist.recipe import Recipe, marked, settings_of
from floe_dist.resume import guard
from floe_dist.search.ledger import Ledger, Trial
from floe_dist.search.loop import SearchLoop
from floe_dist.search.proposers import GridProposer, SmacProposer
from floe_dist.search.report import base_of, candidate_costs, candidate_report, decide, plot_search, unresolved
from floe_dist.search.spare_work import SpareJob
from floe_dist.search.trial import TrialSpec, searched_allocation

# adapter: the allocation trials scale without allocate.file; train: trials are the final run's start
SECTIONS = ("search", "allocate", "adapter", "model", "data", "evaluate", "train")
OUTPUT = "runs/search"
# A resume may change how the search runs and how long, what it logs, what only the campaign reads, and what of
# train a trial sets itself (its lr, split and seed); not train.steps, whose share sets the trials' warm-up.
RESUME_MAY_CHANGE = (marked("runs", "length", "observes", "campaign") - {"train.steps"}) | {
    "train.lr", "train.split", "train.seed"}


def base_allocations(recipe: Recipe, shape) -> dict[str, Allocation]:
    """The allocations trials scale: search.candidates, or allocate.file (the adapter section on every layer
    without)."""
    from floe_dist.trainer import build_allocation

    candidates = recipe.search.candidate_files()
    if candidates:
        return {name: Allocation.load(path) for name, path in candidates.items()}
    return {"given": build_allocation(recipe, shape.num_layers)}


def run(recipe: Recipe, output: str = OUTPUT, spare: list[SpareJob] = ()) -> dict:
    """The search; ``spare``: work for a worker that has no trial to run (the campaign's zero-shot evaluation)."""
    from floe_dist.stages.allocate import model_shape

    recipe.validate(*SECTIONS)
    args, start, out = recipe.search, time.time(), Path(output)
    out.mkdir(parents=True, exist_ok=True)
    guard(out / "search_args.json", settings_of(recipe, SECTIONS), what="a search", may_change=RESUME_MAY_CHANGE)
    shape = model_shape(recipe.model.name)  # meta device: shapes only, no weights
    bases = base_allocations(recipe, shape)
    for name, base in bases.items():
        base.validate(shape.num_layers, shape.shapes)  # a candidate for another model fails here, not in a trial
        if args.expert_choices() and not base.is_uniform:
            raise ValueError(f"search.experts would give every module of allocation {name!r} the same shape, "
                             f"flattening its per-layer/per-expert sizes; search the rank (a scale on its ranks) alone")
    most = max(args.expert_choices(), default=None)  # search.experts resizes every module before top-k applies
    if args.top_k_choices() and not any((base.resized(1, most) if most else base).routes_top_k
                                        for base in bases.values()):
        raise ValueError(f"search.top_ks {args.top_ks}: no module of the allocation(s) {sorted(bases)} routes its "
                         f"tokens top-k over several experts, so the choice would change nothing")
    files = {name: write_json_atomic(out / "candidates" / f"{name}.json", base.to_json()).resolve()
             for name, base in bases.items()}
    ledger = Ledger(out / "search.json", args)
    proposer = GridProposer(args) if args.mode == "grid" else SmacProposer(args, out)
    names = list(bases)
    loop = SearchLoop(args, out, ledger, proposer,
                      lambda trial: trial_spec(recipe, trial, out, files[base_of(trial.config, names)], ledger), spare,
                      start=start)
    loop.run()
    return finish(args, out, ledger, bases, shape, time.time() - start, loop.spare_done)


def trial_batch(recipe: Recipe) -> dict:
    """A trial's micro-batch and accumulation: search.micro_batch when set, else the final run's global batch on
    the trial's ranks (where its ranks divide it), so that the trial is the first steps of the final run."""
    s, p, t = recipe.search, recipe.parallel, recipe.train
    if s.micro_batch is not None:
        return {"micro_batch": s.micro_batch, "accumulation": 1}
    per_step = t.accumulation * p.nproc * p.nodes  # micro-batches in one final-run step
    if per_step % s.trial_nproc:  # the trials' batch is another: the final run will start from step 0 (handoff.py)
        return {"micro_batch": t.micro_batch, "accumulation": 1}
    return {"micro_batch": t.micro_batch, "accumulation": per_step // s.trial_nproc}


def trial_recipe(recipe: Recipe, trial: Trial, line_dir: Path) -> Recipe:
    """What a trial runs: the first ``budget`` steps of the final run (the recipe's train settings and schedule over
    train.steps, the trial's learning rate and seed) on the fit split, scored on val (search.val_limit). It trains in
    its line's folder, which every trial of one configuration shares: a promotion continues the line's checkpoint.
    A trial runs no lm-eval tasks: they are the final evaluation's."""
    s = recipe.search
    train = replace(recipe.train, split="fit", until=int(trial.budget), lr=float(trial.config["lr"]),
                    seed=int(trial.seed), checkpoint_every=0, keep_checkpoints=1, eval_every=0, report_to="none",
                    **trial_batch(recipe))
    return replace(recipe, train=train, allocate=replace(recipe.allocate, file=str(line_dir / "allocation.json")),
                   parallel=replace(recipe.parallel, zero=s.zero, ep_size=1, nproc=s.trial_nproc, nodes=1),
                   model=replace(recipe.model, adapter=str(line_dir / "train" / "adapter")),
                   evaluate=replace(recipe.evaluate, split="val", limit=s.val_limit, lm_eval_tasks=""))


def trial_spec(recipe: Recipe, trial: Trial, out: Path, base_file: Path, ledger: Ledger) -> TrialSpec:
    line_dir = line_folder(out, ledger, trial)
    s = recipe.search
    return TrialSpec(trial.id, trial.config, trial.budget, trial.seed, str(base_file), s.objective,
                     asdict(trial_recipe(recipe, trial, line_dir)), line=str(line_dir),
                     generations=s.trial_accuracy or s.objective == "error")  # the loss needs no generated answer


def line_folder(out: Path, ledger: Ledger, trial: Trial) -> Path:
    """``lines/NNNN``: the training shared by every trial of one configuration, named by its first trial."""
    first = min(t.id for t in ledger.trials if t.config == trial.config)
    return (out / "lines" / f"{first:04d}").resolve()


def finish(args, out: Path, ledger: Ledger, bases: dict[str, Allocation], shape, seconds: float,
           spare_done: list[dict] = ()) -> dict:
    lowest = ledger.incumbent()
    if lowest is None:
        reasons = "\n  - ".join(f"trial {t.id}: {t.status}: {t.reason}" for t in ledger.finished()[-5:])
        raise ValueError(f"no trial succeeded, so there is no rank to choose; last failures:\n  - {reasons}")
    names = list(bases)

    def parameters(trial: Trial) -> int:
        return searched_allocation(bases[base_of(trial.config, names)], trial.config).count_parameters(shape.shapes)
    best, tied = decide(ledger, parameters, args.separation)
    won = base_of(best.config, names)
    base = bases[won]
    chosen = searched_allocation(base, best.config, method=f"{base.method}+{args.mode}")
    chosen.with_parameter_count(shape.shapes)
    per_candidate = candidate_report(ledger, list(bases))
    line = line_folder(out, ledger, best)
    chosen.meta["search"] = {"config": best.config, "cost": best.cost, "budget": best.budget, "allocation": won,
                             "objective": args.objective, "search": str(out / "search.json"), "line": str(line)}
    if len(bases) > 1:
        chosen.meta["search"]["candidates"] = per_candidate
    chosen.save(out / "allocation.json")
    finished = ledger.finished()
    summary = {"mode": args.mode, "incumbent": asdict(best), "trials": len(finished),
               "lowest_cost_trial": lowest.id, "not_separated": [t.id for t in tied],
               "failed": sum(t.status != "success" for t in finished),
               "compute_steps": sum(t.budget for t in finished),
               "compute_full_trials": sum(t.budget for t in finished) / args.max_steps,
               "trained_steps": sum(t.budget - ledger.resumes_from(t) for t in finished),
               "steps_reused": sum(ledger.resumes_from(t) for t in finished), "line": str(line),
               "trial_seconds": sum(t.seconds or 0.0 for t in finished), "wall_seconds": seconds,
               "lr": best.config["lr"], "rank": best.config["rank"], "incumbent_origin": best.origin,
               "top_budget_origins": ledger.top_budget_origins(), "allocation": won, "candidates": per_candidate,
               "trainable_parameters": chosen.trainable_parameters, "spare_work": list(spare_done)}
    ledger.extra = {"summary": summary}
    ledger.save()
    plot_search(ledger, out / "search.png", args.max_steps)
    print(f"[search] {args.mode}: {len(finished)} trials ({summary['failed']} failed), "
          f"{summary['compute_full_trials']:.2f} full-trial equivalents ({summary['trained_steps']} steps trained, "
          f"{summary['steps_reused']} continued from promoted trials' checkpoints), {seconds:.0f}s; incumbent rank "
          f"{best.config['rank']} lr {best.config['lr']:.2e} cost {best.cost:.4f} at {best.budget} steps "
          f"-> {out / 'allocation.json'}")
    if best is not lowest:
        print(f"[search] trial {lowest.id} had the lowest validation cost ({lowest.cost:.4f}, rank "
              f"{lowest.config['rank']}), but not beyond {args.separation:g} paired standard errors of trials "
              f"{[t.id for t in tied if t is not lowest]}: the one with the fewest adapter parameters is trained")
    origins = ", ".join(f"{n} from {o}" for o, n in summary["top_budget_origins"].items())
    print(f"[search] configurations at the top budget: {origins}; the incumbent came from {best.origin or 'unknown'}")
    if len(bases) > 1:
        print(f"[search] allocation {won!r} won; best validation cost at {best.budget} steps per candidate: "
              + ", ".join(candidate_costs(per_candidate)))
        examples = len(best.metrics.get("example_costs") or [])
        for name in unresolved(per_candidate, won):
            c = per_candidate[name]
            print(f"[search] note: {name!r} is {c['margin']:.4f} ± {c['margin_se']:.4f} behind {won!r} (paired "
                  f"standard error over {examples} validation examples): within two standard errors, so the "
                  f"validation set does not resolve the choice between them")
    return summary
