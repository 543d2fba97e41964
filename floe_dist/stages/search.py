"""``floe-dist search``: pick the LoRA rank (and learning rate) with SMAC from short parallel trials.

    floe-dist search --allocation runs/score/allocation.json --output runs/search          # SMAC, local
    floe-dist search ... --mode grid                       # the exhaustive grid, for comparison
    floe-dist search ... --runner slurm --sbatch-args "--partition=gpu --gres=gpu:1"

Each trial trains the layers of ``--allocation`` with a sampled rank and learning rate for a budget
of optimizer steps and reports its validation cost (floe_dist/search/trial.py). ``--mode smac`` is SMAC's
multi-fidelity facade (Hyperband over steps, ``--min-steps`` .. ``--max-steps``); ``bo`` is plain
BO with every trial at ``--max-steps``; ``grid`` tries every rank x learning rate (x experts x top-k) at
``--max-steps``. SMAC and BO stop at ``--max-trials`` or when the trials' steps would pass
``--max-compute`` full trials, then wait for the running ones; the grid always runs to the end.

With ``--candidates NAME=FILE,...`` the allocation is searched too (a categorical beside rank and lr);
``--experts`` and ``--top-ks`` add experts per module and experts per token (top-k routers) to the space.
Trials run on warm workers (floe_dist/search/worker.py): local processes by default, Slurm jobs with
``--runner slurm --trial-workers warm``; ``--trial-workers cold`` starts a process or job per trial.

Outputs in ``--output``: ``smac/`` (SMAC's own state), ``candidates/`` (the allocations trials scale),
``trials/NNNN/`` (one folder per trial: its spec, log, training run and result), ``workers/`` (warm
workers' task files and logs), ``search.json`` (every trial: config, budget, cost, status, wall time,
worker, origin), ``search.png`` and ``allocation.json`` (the chosen allocation at the chosen rank).

Resume: rerun the same command. ``search.json`` is rewritten after every event and SMAC's state
after every ask and tell, so no finished trial is lost or rerun; trials that were running are
issued again (a Slurm job that is still queued is adopted instead).
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from floe_dist.allocation import Allocation, write_json_atomic
from floe_dist.config import arg, below_one
from floe_dist.distributed.runtime import free_port
from floe_dist.resume import guard
from floe_dist.search.ledger import Ledger, Trial
from floe_dist.search.loop import SearchLoop
from floe_dist.search.proposers import GridProposer, SmacProposer
from floe_dist.search.trial import TrialSpec, searched_allocation

MODES = ("smac", "bo", "random", "grid")


@dataclass
class SearchArgs:
    output: str = arg("runs/search", "search folder; rerun the same command to resume")
    mode: str = arg("smac", "smac (multi-fidelity BO over steps), bo (every trial at --max-steps), random (smac's "
                            "fidelities and halving, random configurations: the control) or grid")
    surrogate: str = arg("rf", "smac/bo: the surrogate model, rf (SMAC's random forest) or gp (Gaussian process)")
    random_interleave: float = arg(0.2, "smac/bo: share of proposals drawn at random instead of from the model")
    model_min_points: int = arg(0, "smac: the model learns from the highest budget holding at least this many "
                                   "results (SMAC's own default, 1, fits it on the first top-budget trial alone); "
                                   "0 = the space's dimensions + 1, as BOHB")
    model_data: str = arg("budget", "smac: the model learns from one budget's results (budget: SMAC's way, with "
                                    "--model-min-points) or from every configuration at the highest budget it "
                                    "reached (pooled)")
    pending: str = arg("none", "smac/bo: proposals not yet run count, for the model, as none (SMAC's way) or "
                               "worst (a constant liar: as bad as the worst result, so a rung's proposals spread)")
    allocation: str | None = arg(None, "allocation.json whose layers get the searched rank (e.g. from score); "
                                       "none = q,v on every layer")
    model: str = arg("smollm2-135m", "base model: smollm2-135m, tiny, a HF folder or a .gguf file")
    task: str = arg("sst2", "sst2, boolq, or a JSONL file; trials train on its fit split, score on val")
    data_format: str = arg("auto", "a data file's format: auto, multiple_choice, alpaca, chat or text")
    columns: str = arg("", "a data file's field names: FIELD=COLUMN,... (e.g. instruction=question,output=answer)")
    pack: bool = arg(False, "pack several examples into each max_length row (fewer, fuller rows; training only)")
    ranks: str = arg("2,4,8,16,32,64", "rank choices (ordinal, so the surrogate sees a log scale): the largest rank of "
                                       "the allocation, whose other ranks scale with it (a HILO or GuiLoMo shape is kept)")
    lr: str = arg("1e-4:3e-3", "learning rate: LO:HI searched on a log scale, or one fixed value")
    experts: str = arg("", "experts-per-module choices, e.g. 2,4,8; empty keeps the allocation's")
    top_ks: str = arg("", "experts-per-token choices of top-k routers, e.g. 1,2 (capped at each module's experts); "
                          "empty keeps the allocation's")
    candidates: str = arg("", "allocations to choose among, NAME=FILE,... (e.g. floe=a.json,uniform=b.json): a "
                              "categorical 'allocation' joins the space; each keeps its shape, the rank scales it")
    min_steps: int = arg(4, "smallest trial budget in optimizer steps (smac mode)")
    max_steps: int = arg(36, "largest trial budget; every bo and grid trial uses it")
    eta: int = arg(3, "successive-halving ratio between budgets (smac mode)")
    brackets: str = arg("sh", "smac mode: sh (successive halving: each bracket ends with one --max-steps "
                              "trial; the cheapest) or hyperband (also brackets that start at higher budgets)")
    max_trials: int = arg(40, "stop issuing trials after this many (a bracket starts only if all of it fits)")
    max_compute: float = arg(8.0, "stop issuing trials before their steps pass this many --max-steps trials "
                              "(smac, random: a bracket starts only when all of it fits; a cap below one bracket "
                              "runs the first as far as it goes)")
    grid_lr_points: int = arg(3, "grid mode: learning rates tried, log-spaced over --lr")
    initial_configs: int = arg(5, "smac/bo: random configurations before the surrogate model takes over")
    objective: str = arg("loss", "loss (validation choice cross-entropy) or error (1 - accuracy)")
    failed_cost: float = arg(10.0, "cost SMAC is told for a crashed or timed-out trial (above any real cost)")
    micro_batch: int = arg(4, "trial training: examples per rank per step")
    zero: str = arg("0", "trial training: DeepSpeed config (0, 2, 3 or a JSON path)")
    quant: str = arg("none", "trial backbone: none or nf4")
    max_length: int = arg(256, "tokens per example")
    val_limit: int | None = arg(None, "score trials on the first N validation examples only")
    seed: int = arg(0, "seed of SMAC's sampling")
    trial_seed: int = arg(0, "seed of every trial's training (the same for all: a deterministic objective)")
    runner: str = arg("local", "local (worker processes), slurm (one sbatch job per trial) or slurm-array "
                               "(trials that start together go out as one job array, slurm/search_array.sbatch)")
    workers: int | None = arg(None, "concurrent trials; default: as many as the machine holds")
    trial_nproc: int = arg(1, "ranks per trial; > 1 launches each trial with --trial-launcher")
    trial_launcher: str = arg("torchrun", "torchrun or deepspeed (for trials of more than one rank)")
    trial_threads: int = arg(1, "CPU threads per trial rank (local runner)")
    trial_timeout: float = arg(3600.0, "seconds before a trial is killed and recorded as a timeout")
    trial_workers: str = arg("auto", "warm (long-lived workers, local processes or Slurm jobs, that load the backbone "
                                     "and data once and run trial after trial), cold (a fresh process or job per "
                                     "trial) or auto (warm locally, a job per trial on Slurm)")
    trial_module: str = arg("floe_dist.search.trial", "trial program: `python -m MODULE TRIAL_DIR`, and its "
                                                      "run_trial(trial_dir, resources) on warm workers")
    sbatch_args: str = arg("", "slurm runner: extra sbatch flags, e.g. '--partition=gpu --gres=gpu:1'")

    def rank_choices(self) -> list[int]:
        return _int_list(self.ranks, "--ranks")

    def expert_choices(self) -> list[int]:
        return _int_list(self.experts, "--experts") if self.experts.strip() else []

    def top_k_choices(self) -> list[int]:
        return _int_list(self.top_ks, "--top-ks") if self.top_ks.strip() else []

    def candidate_files(self) -> dict[str, str]:
        """{name: allocation file} of --candidates (empty without)."""
        found = {}
        for item in (i.strip() for i in self.candidates.split(",") if i.strip()):
            name, eq, path = item.partition("=")
            if not eq or not name.strip() or not path.strip():
                raise ValueError(f"--candidates must be NAME=FILE,..., got {item!r}")
            if name.strip() in found:
                raise ValueError(f"--candidates names {name.strip()!r} twice")
            found[name.strip()] = path.strip()
        return found

    def lr_range(self) -> tuple[float, float]:
        try:
            lo, _, hi = self.lr.partition(":")
            lo_f = float(lo)
            hi_f = float(hi) if hi else lo_f
        except ValueError:
            raise ValueError(f"--lr must be LO:HI or one value, got {self.lr!r}") from None
        if not 0 < lo_f <= hi_f:
            raise ValueError(f"--lr needs 0 < LO <= HI, got {self.lr!r}")
        return lo_f, hi_f

    def validate(self) -> None:
        problems = []
        for check in (self.rank_choices, self.expert_choices, self.top_k_choices, self.lr_range, self.candidate_files):
            try:
                check()
            except ValueError as err:
                problems.append(str(err))
        choices = {"mode": MODES, "brackets": ("sh", "hyperband"), "objective": ("loss", "error"),
                   "runner": ("local", "slurm", "slurm-array"), "trial_launcher": ("torchrun", "deepspeed"),
                   "trial_workers": ("auto", "warm", "cold"), "surrogate": ("rf", "gp")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.max_steps < 1 or (self.mode in ("smac", "random") and not 1 <= self.min_steps <= self.max_steps):
            problems.append(f"need 1 <= --min-steps <= --max-steps, got {self.min_steps} and {self.max_steps}")
        for name in ("eta",):
            if getattr(self, name) < 2:
                problems.append(f"--{name} must be >= 2")
        problems += below_one(self, ("max_trials", "grid_lr_points", "trial_nproc", "trial_threads", "micro_batch",
                                     "initial_configs"))
        if self.model_min_points < 0:
            problems.append(f"--model-min-points must be >= 0 (0 = automatic), got {self.model_min_points}")
        if self.workers is not None and self.workers < 1:
            problems.append("--workers must be >= 1")
        if not 0 <= self.random_interleave <= 1:
            problems.append(f"--random-interleave must be in [0, 1], got {self.random_interleave}")
        if self.model_data not in ("budget", "pooled"):
            problems.append(f"--model-data must be budget or pooled, got {self.model_data!r}")
        if self.pending not in ("none", "worst"):
            problems.append(f"--pending must be none or worst, got {self.pending!r}")
        if self.max_compute <= 0 or self.trial_timeout <= 0:
            problems.append("--max-compute and --trial-timeout must be > 0")
        if self.allocation and not Path(self.allocation).is_file():
            problems.append(f"--allocation {self.allocation}: file not found")
        try:
            candidates = self.candidate_files()
        except ValueError:
            candidates = {}
        if candidates and self.allocation:
            problems.append("give --allocation or --candidates, not both (a candidate may be that file)")
        problems += [f"--candidates {name}={path}: file not found" for name, path in candidates.items()
                     if not Path(path).is_file()]
        if problems:
            raise ValueError("bad search arguments:\n  - " + "\n  - ".join(problems))


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"{flag} needs integers >= 1, got {text!r}")
    return values


RESUME_MAY_CHANGE = {"max_trials", "max_compute", "workers", "trial_timeout", "runner", "sbatch_args",
                     "trial_threads", "trial_workers"}


def base_allocations(args: SearchArgs, shape) -> dict[str, Allocation]:
    """The allocations trials scale: the --candidates, or the one --allocation (q,v on every layer without)."""
    if args.candidate_files():
        return {name: Allocation.load(path) for name, path in args.candidate_files().items()}
    if args.allocation:
        return {"given": Allocation.load(args.allocation)}
    return {"given": Allocation.uniform(shape.num_layers, ["q_proj", "v_proj"], rank=8, dropout=0.05)}


def base_of(config: dict, names: list[str]) -> str:
    """The candidate a trial's configuration scales (the only one when the space has no choice)."""
    return config.get("allocation", names[0])


def launch_argv(args: SearchArgs, module: str, *module_args: str) -> list[str]:
    """``python -m MODULE ARGS`` as one process, or as a group of --trial-nproc ranks on a free port."""
    if args.trial_nproc == 1:
        return [sys.executable, "-m", module, *module_args]
    if args.trial_launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={args.trial_nproc}",
                f"--master_port={free_port()}", "--module", module, *module_args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.trial_nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", module, *module_args]


def trial_argv(args: SearchArgs, trial_dir: Path) -> list[str]:
    return launch_argv(args, args.trial_module, str(trial_dir))


def worker_argv(args: SearchArgs, worker_dir: Path) -> list[str]:
    return launch_argv(args, "floe_dist.search.worker", str(worker_dir), "--trial-module", args.trial_module)


def run(args: SearchArgs) -> dict:
    args.validate()
    start = time.time()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    guard(out / "search_args.json", asdict(args), what="a search", may_change=RESUME_MAY_CHANGE)
    from floe_dist.stages.allocate import model_shape

    shape = model_shape(args.model)  # meta device: shapes only, no weights
    bases = base_allocations(args, shape)
    for name, base in bases.items():
        base.validate(shape.num_layers, shape.shapes)  # a candidate for another model fails here, not in a trial
        if args.expert_choices() and not base.is_uniform:
            raise ValueError(f"--experts would give every module of allocation {name!r} the same shape, flattening "
                             f"its per-layer/per-expert sizes; search the rank (a scale on its ranks) alone")
    most = max(args.expert_choices(), default=None)  # --experts resizes every module before top-k applies
    if args.top_k_choices() and not any((base.resized(1, most) if most else base).routes_top_k
                                        for base in bases.values()):
        raise ValueError(f"--top-ks {args.top_ks}: no module of the allocation(s) {sorted(bases)} routes its tokens "
                         f"top-k over several experts, so the choice would change nothing")
    files = {name: write_json_atomic(out / "candidates" / f"{name}.json", base.to_json()).resolve()
             for name, base in bases.items()}
    ledger = Ledger(out / "search.json", args)
    proposer = GridProposer(args) if args.mode == "grid" else SmacProposer(args, out)
    names = list(bases)
    loop = SearchLoop(args, out, ledger, proposer,
                      lambda trial: trial_spec(args, trial, out, files[base_of(trial.config, names)]),
                      lambda trial_dir: trial_argv(args, trial_dir), lambda worker_dir: worker_argv(args, worker_dir))
    loop.run()
    return finish(args, out, ledger, bases, shape, time.time() - start)


def trial_spec(args: SearchArgs, trial: Trial, out: Path, base_file: Path) -> TrialSpec:
    """A trial as the train and evaluate configurations it runs: fit split to train, val split to score."""
    from floe_dist.stages.evaluate import EvalArgs
    from floe_dist.stages.train import TrainArgs

    trial_dir = (out / "trials" / f"{trial.id:04d}").resolve()
    common = {"model": args.model, "task": args.task, "data_format": args.data_format, "columns": args.columns,
              "quant": args.quant, "max_length": args.max_length}
    train = TrainArgs(**common, pack=args.pack, output=str(trial_dir / "train"),
                      allocation=str(trial_dir / "allocation.json"),
                      split="fit", steps=int(trial.budget), lr=float(trial.config["lr"]), micro_batch=args.micro_batch,
                      zero=args.zero, seed=int(trial.seed), checkpoint_every=0, keep_checkpoints=1)
    evaluate = EvalArgs(**common, split="val", adapter=str(trial_dir / "train" / "adapter"), limit=args.val_limit)
    return TrialSpec(trial.id, trial.config, trial.budget, trial.seed, str(base_file), args.objective,
                     asdict(train), asdict(evaluate))


def finish(args: SearchArgs, out: Path, ledger: Ledger, bases: dict[str, Allocation], shape, seconds: float) -> dict:
    best = ledger.incumbent()
    if best is None:
        reasons = "\n  - ".join(f"trial {t.id}: {t.status}: {t.reason}" for t in ledger.finished()[-5:])
        raise ValueError(f"no trial succeeded, so there is no rank to choose; last failures:\n  - {reasons}")
    won = base_of(best.config, list(bases))
    base = bases[won]
    chosen = searched_allocation(base, best.config, method=f"{base.method}+{args.mode}")
    chosen.with_parameter_count(shape.shapes)
    per_candidate = candidate_report(ledger, list(bases))
    chosen.meta["search"] = {"config": best.config, "cost": best.cost, "budget": best.budget, "allocation": won,
                             "objective": args.objective, "search": str(out / "search.json")}
    if len(bases) > 1:
        chosen.meta["search"]["candidates"] = per_candidate
    chosen.save(out / "allocation.json")
    finished = ledger.finished()
    summary = {"mode": args.mode, "incumbent": asdict(best), "trials": len(finished),
               "failed": sum(t.status != "success" for t in finished),
               "compute_steps": sum(t.budget for t in finished),
               "compute_full_trials": sum(t.budget for t in finished) / args.max_steps,
               "trial_seconds": sum(t.seconds or 0.0 for t in finished), "wall_seconds": seconds,
               "lr": best.config["lr"], "rank": best.config["rank"], "incumbent_origin": best.origin,
               "top_budget_origins": ledger.top_budget_origins(), "allocation": won, "candidates": per_candidate,
               "trainable_parameters": chosen.trainable_parameters}
    ledger.extra = {"summary": summary}
    ledger.save()
    plot_search(ledger, out / "search.png", args.max_steps)
    print(f"[search] {args.mode}: {len(finished)} trials ({summary['failed']} failed), "
          f"{summary['compute_full_trials']:.2f} full-trial equivalents, {seconds:.0f}s; incumbent rank "
          f"{best.config['rank']} lr {best.config['lr']:.2e} cost {best.cost:.4f} at {best.budget} steps "
          f"-> {out / 'allocation.json'}")
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


def candidate_costs(report: dict[str, dict]) -> list[str]:
    """'name cost (+margin ± se, N trials)' per candidate, for the search's and the campaign's summaries."""
    def one(name: str, c: dict) -> str:
        if c["best_cost"] is None:
            return f"{name} - ({c['trials']} trials, none promoted that far)"
        margin = "" if not c.get("margin") else f"+{c['margin']:.4f}" + (
            f" ± {c['margin_se']:.4f}" if c.get("margin_se") is not None else "") + ", "
        return f"{name} {c['best_cost']:.4f} ({margin}{c['trials']} trials)"
    return [one(name, c) for name, c in report.items()]


def candidate_report(ledger: Ledger, names: list[str]) -> dict[str, dict]:
    """Per candidate allocation: trials run, and its best cost at the top budget any trial reached (the
    fidelity the incumbent is taken at, so the figures compare); with its margin over the incumbent and that
    margin's paired standard error over the validation examples (None where trials carry no per-example costs)."""
    ok = [t for t in ledger.trials if t.status == "success"]
    top = max((t.budget for t in ok), default=None)
    best = ledger.incumbent()
    report = {}
    for name in names:
        mine = [t for t in ledger.trials if base_of(t.config, names) == name]
        at_top = [t for t in ok if t.budget == top and base_of(t.config, names) == name]
        report[name] = {"trials": len(mine), "best_cost": None, "budget": top, "top_budget_trials": len(at_top),
                        "margin": None, "margin_se": None}
        if at_top:
            mine_best = min(at_top, key=lambda t: (t.cost, t.id))
            report[name].update(best_cost=mine_best.cost, margin=mine_best.cost - best.cost,
                                margin_se=paired_se(mine_best, best))
    return report


def paired_se(trial: Trial, incumbent: Trial) -> float | None:
    """Standard error of the mean of ``trial``'s per-example cost minus the incumbent's on the same validation
    examples: the noise of the margin between them (0 for the incumbent itself)."""
    mine, theirs = trial.metrics.get("example_costs"), incumbent.metrics.get("example_costs")
    if not mine or not theirs or len(mine) != len(theirs) or len(mine) < 2:
        return None
    diffs = [a - b for a, b in zip(mine, theirs)]
    return statistics.stdev(diffs) / math.sqrt(len(diffs))


def unresolved(report: dict[str, dict], won: str) -> list[str]:
    """The candidates whose best cost is within two paired standard errors of the winner's."""
    return [name for name, c in report.items() if name != won and c.get("margin_se") is not None
            and c["margin"] < 2 * c["margin_se"]]


def plot_search(ledger: Ledger, path: Path, max_steps: int) -> None:
    """Cost of every trial (colour = budget) and the incumbent at the top budget over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [t for t in ledger.trials if t.status == "success"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for budget in sorted({t.budget for t in ok}):
        pts = [t for t in ok if t.budget == budget]
        ax.scatter([t.id for t in pts], [t.cost for t in pts], s=18, label=f"{budget} steps")
    best, xs, ys = math.inf, [], []
    for t in sorted(ok, key=lambda t: t.id):
        if t.budget == max(x.budget for x in ok) and t.cost < best:
            best = t.cost
        if best < math.inf:
            xs.append(t.id)
            ys.append(best)
    ax.step(xs, ys, where="post", color="black", label="incumbent (top budget)")
    failed = [t.id for t in ledger.trials if t.status in ("crashed", "timeout")]
    for x in failed:
        ax.axvline(x, color="red", alpha=0.3, lw=1)
    ax.set_xlabel("trial" + (" (red: failed)" if failed else ""))
    ax.set_ylabel("validation cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
