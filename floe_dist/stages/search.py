"""``floe-dist search``: pick the LoRA rank (and learning rate) with SMAC from short parallel trials.

    floe-dist search --allocation runs/score/allocation.json --output runs/search          # SMAC, local
    floe-dist search ... --mode grid                       # the exhaustive grid, for comparison
    floe-dist search ... --runner slurm --sbatch-args "--partition=gpu --gres=gpu:1"

Each trial trains the layers of ``--allocation`` with a sampled rank and learning rate for a budget
of optimizer steps and reports its validation cost (floe_dist/search/trial.py). ``--mode smac`` is SMAC's
multi-fidelity facade (Hyperband over steps, ``--min-steps`` .. ``--max-steps``); ``bo`` is plain
BO with every trial at ``--max-steps``; ``grid`` tries every rank x learning rate (x experts) at
``--max-steps``. SMAC and BO stop at ``--max-trials`` or when the trials' steps would pass
``--max-compute`` full trials, then wait for the running ones; the grid always runs to the end.

Outputs in ``--output``: ``smac/`` (SMAC's own state), ``trials/NNNN/`` (one folder per trial: its
spec, log, training run and result), ``search.json`` (every trial: config, budget, cost, status,
wall time, worker), ``search.png`` and ``allocation.json`` (the chosen rank applied to the layers).

Resume: rerun the same command. ``search.json`` is rewritten after every event and SMAC's state
after every ask and tell, so no finished trial is lost or rerun; trials that were running are
issued again (a Slurm job that is still queued is adopted instead).
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from floe_dist.allocation import Allocation, write_json_atomic
from floe_dist.config import arg, below_one
from floe_dist.distributed.runtime import free_port
from floe_dist.resume import guard
from floe_dist.search.runners import Launch, LocalPool, Outcome, SlurmRunner, default_workers

MODES = ("smac", "bo", "grid")
FINISHED = ("success", "crashed", "timeout")
SEARCH_FORMAT = "floe-dist/search@1"


@dataclass
class SearchArgs:
    output: str = arg("runs/search", "search folder; rerun the same command to resume")
    mode: str = arg("smac", "smac (multi-fidelity BO over steps), bo (every trial at --max-steps) or grid")
    allocation: str | None = arg(None, "allocation.json whose layers get the searched rank (e.g. from score); "
                                       "none = q,v on every layer")
    model: str = arg("smollm2-135m", "base model: smollm2-135m, tiny, a HF folder or a .gguf file")
    task: str = arg("sst2", "sst2, boolq, or a JSONL file; trials train on its fit split, score on val")
    ranks: str = arg("2,4,8,16,32,64", "rank choices (ordinal, so the surrogate sees a log scale)")
    lr: str = arg("1e-4:3e-3", "learning rate: LO:HI searched on a log scale, or one fixed value")
    experts: str = arg("", "experts-per-module choices, e.g. 2,4,8; empty keeps the allocation's")
    min_steps: int = arg(4, "smallest trial budget in optimizer steps (smac mode)")
    max_steps: int = arg(36, "largest trial budget; every bo and grid trial uses it")
    eta: int = arg(3, "successive-halving ratio between budgets (smac mode)")
    brackets: str = arg("sh", "smac mode: sh (successive halving: each bracket ends with one --max-steps "
                              "trial; the cheapest) or hyperband (also brackets that start at higher budgets)")
    max_trials: int = arg(40, "stop issuing trials after this many")
    max_compute: float = arg(8.0, "stop issuing trials before their steps pass this many --max-steps trials")
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
    trial_module: str = arg("floe_dist.search.trial", "trial program, run as `python -m MODULE TRIAL_DIR`")
    sbatch_args: str = arg("", "slurm runner: extra sbatch flags, e.g. '--partition=gpu --gres=gpu:1'")

    def rank_choices(self) -> list[int]:
        return _int_list(self.ranks, "--ranks")

    def expert_choices(self) -> list[int]:
        return _int_list(self.experts, "--experts") if self.experts.strip() else []

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
        for check in (self.rank_choices, self.expert_choices, self.lr_range):
            try:
                check()
            except ValueError as err:
                problems.append(str(err))
        choices = {"mode": MODES, "brackets": ("sh", "hyperband"), "objective": ("loss", "error"),
                   "runner": ("local", "slurm", "slurm-array"), "trial_launcher": ("torchrun", "deepspeed")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.max_steps < 1 or (self.mode == "smac" and not 1 <= self.min_steps <= self.max_steps):
            problems.append(f"need 1 <= --min-steps <= --max-steps, got {self.min_steps} and {self.max_steps}")
        for name in ("eta",):
            if getattr(self, name) < 2:
                problems.append(f"--{name} must be >= 2")
        problems += below_one(self, ("max_trials", "grid_lr_points", "trial_nproc", "trial_threads", "micro_batch",
                                     "initial_configs"))
        if self.workers is not None and self.workers < 1:
            problems.append("--workers must be >= 1")
        if self.max_compute <= 0 or self.trial_timeout <= 0:
            problems.append("--max-compute and --trial-timeout must be > 0")
        if self.allocation and not Path(self.allocation).is_file():
            problems.append(f"--allocation {self.allocation}: file not found")
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


# --------------------------------------------------------------------------------------- the ledger
@dataclass
class Trial:
    id: int
    config: dict
    budget: int
    seed: int
    status: str = "running"  # running | success | crashed | timeout
    cost: float | None = None
    seconds: float | None = None
    worker: str = ""
    attempts: int = 0
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    smac_seed: int | None = None

    @property
    def key(self) -> str:
        return trial_key(self.config, self.budget)


def trial_key(config: dict, budget: float) -> str:
    return json.dumps({"config": config, "budget": int(round(budget))}, sort_keys=True)


class Ledger:
    """``search.json``: every trial and its fate, rewritten atomically after every event."""

    def __init__(self, path: Path, args: SearchArgs):
        self.path, self.args = path, args
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.trials = [Trial(**t) for t in data.get("trials", [])]
        self.extra: dict = {}

    def add(self, config: dict, budget: int, smac_seed: int | None = None) -> Trial:
        trial = Trial(len(self.trials), config, budget, self.args.trial_seed, smac_seed=smac_seed)
        self.trials.append(trial)
        self.save()
        return trial

    def find(self, key: str) -> Trial | None:
        return next((t for t in self.trials if t.key == key), None)

    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.status in FINISHED]

    def compute_used(self) -> int:
        return sum(t.budget for t in self.trials)

    def incumbent(self) -> Trial | None:
        """Best successful trial at the largest budget that has one (the most trusted fidelity)."""
        ok = [t for t in self.trials if t.status == "success"]
        if not ok:
            return None
        top = max(t.budget for t in ok)
        return min((t for t in ok if t.budget == top), key=lambda t: (t.cost, t.id))

    def save(self) -> None:
        write_json_atomic(self.path, {"format": SEARCH_FORMAT, "args": asdict(self.args),
                                      "trials": [asdict(t) for t in self.trials], **self.extra})


# ------------------------------------------------------------------------------------ proposers
def build_space(args: SearchArgs, seed: int):
    from ConfigSpace import ConfigurationSpace, Constant, Float, OrdinalHyperparameter

    space = ConfigurationSpace(seed=seed)
    space.add(OrdinalHyperparameter("rank", args.rank_choices()))
    lo, hi = args.lr_range()
    space.add(Float("lr", (lo, hi), log=True) if hi > lo else Constant("lr", lo))
    if args.expert_choices():
        space.add(OrdinalHyperparameter("experts", args.expert_choices()))
    return space


def _plain(config) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in dict(config).items()}


class GridProposer:
    """Every rank x learning rate (x experts) point at ``--max-steps``, in a fixed order."""

    def __init__(self, args: SearchArgs):
        lo, hi = args.lr_range()
        n = args.grid_lr_points if hi > lo else 1
        lrs = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)] if n > 1 else [lo]
        experts = args.expert_choices() or [None]
        self.points = [{k: v for k, v in (("rank", r), ("lr", lr), ("experts", e)) if v is not None}
                       for r, e, lr in itertools.product(args.rank_choices(), experts, lrs)]
        self.budget = args.max_steps

    def resume(self, ledger: Ledger) -> list[Trial]:
        return [t for t in ledger.trials if t.status == "running"]

    def ask(self, ledger: Ledger) -> Trial | None:
        for point in self.points:
            if ledger.find(trial_key(point, self.budget)) is None:
                return ledger.add(point, self.budget)
        return None

    def tell(self, trial: Trial) -> None:
        pass


class SmacProposer:
    """SMAC ask/tell with our own trial runner. SMAC's state is saved after every ask and tell."""

    def __init__(self, args: SearchArgs, out: Path):
        from smac import HyperparameterOptimizationFacade as HPO
        from smac import MultiFidelityFacade as MF
        from smac import Scenario

        multi = args.mode == "smac"
        facade = MF if multi else HPO
        budgets = dict(min_budget=args.min_steps, max_budget=args.max_steps) if multi else {}
        scenario = Scenario(build_space(args, args.seed), name="search", output_directory=out / "smac",
                            deterministic=True, n_trials=100_000, seed=args.seed, crash_cost=args.failed_cost,
                            **budgets)
        self._check_same_scenario(scenario)
        if not multi:
            intensifier = HPO.get_intensifier(scenario, max_config_calls=1)
        elif args.brackets == "hyperband":
            intensifier = MF.get_intensifier(scenario, eta=args.eta)
        else:
            from smac.intensifier.successive_halving import SuccessiveHalving

            intensifier = SuccessiveHalving(scenario, eta=args.eta)
        self.smac = facade(scenario, target_function=None, intensifier=intensifier, overwrite=False,
                           initial_design=facade.get_initial_design(scenario, n_configs=args.initial_configs),
                           config_selector=facade.get_config_selector(scenario, retrain_after=1),
                           logging_level=40)
        self.max_steps = args.max_steps
        self.multi = multi
        self.asked: dict[str, object] = {}  # trial key -> SMAC's own TrialInfo (tell must match it exactly)

    @staticmethod
    def _check_same_scenario(scenario) -> None:
        """SMAC asks on stdin when a saved run differs; we check first and fail with a message."""
        from smac import Scenario

        def plain(sc) -> dict:  # the facade adds its own ``_meta`` later: compare everything else
            return {k: v for k, v in Scenario.make_serializable(sc).items() if k != "_meta"}

        saved = Path(scenario.output_directory) / "scenario.json"
        if saved.is_file() and plain(Scenario.load(saved.parent)) != plain(scenario):
            raise ValueError(f"{saved.parent} holds a SMAC run with another search space or seed; "
                             f"use another --output, or the same flags to resume it")

    def _info(self, trial: Trial):
        from ConfigSpace import Configuration
        from smac.runhistory.dataclasses import TrialInfo

        if trial.key in self.asked:
            return self.asked[trial.key]
        config = Configuration(self.smac.scenario.configspace, values=trial.config)
        return TrialInfo(config, seed=trial.smac_seed, budget=float(trial.budget) if self.multi else None)

    def resume(self, ledger: Ledger) -> list[Trial]:
        """Reconcile SMAC's runhistory with the ledger; return the trials to issue again."""
        from smac.runhistory.enumerations import StatusType

        rh = self.smac.runhistory
        for info in rh.get_running_trials():
            self.asked[trial_key(_plain(info.config), info.budget if self.multi else self.max_steps)] = info
        smac_state = {}
        for k, v in rh.items():
            budget = k.budget if self.multi else self.max_steps
            smac_state[trial_key(_plain(rh.get_config(k.config_id)), budget)] = (k, v.status)
        for key, (k, status) in smac_state.items():  # asked by SMAC, unknown to the ledger: issue it
            if status == StatusType.RUNNING and ledger.find(key) is None:
                info = json.loads(key)
                ledger.add(info["config"], info["budget"], smac_seed=k.seed)
        for trial in ledger.trials:  # finished here, not (yet) told to SMAC: tell it now
            known = smac_state.get(trial.key)
            if trial.status in FINISHED and (known is None or known[1] == StatusType.RUNNING):
                self.tell(trial)
        return [t for t in ledger.trials if t.status == "running"]

    def ask(self, ledger: Ledger) -> Trial | None:
        try:
            info = self.smac.ask()
        except StopIteration:  # SMAC found no new configuration: the space is exhausted
            return None
        self.smac.optimizer.save()  # the RUNNING entry is durable before the trial starts
        budget = int(round(info.budget)) if self.multi else self.max_steps
        trial = ledger.add(_plain(info.config), budget, smac_seed=info.seed)
        self.asked[trial.key] = info
        return trial

    def tell(self, trial: Trial) -> None:
        from smac.runhistory.dataclasses import TrialValue
        from smac.runhistory.enumerations import StatusType

        status = {"success": StatusType.SUCCESS, "timeout": StatusType.TIMEOUT}.get(trial.status, StatusType.CRASHED)
        cost = trial.cost if trial.status == "success" else self.smac.scenario.crash_cost
        self.smac.tell(self._info(trial), TrialValue(cost=cost, time=trial.seconds or 0.0, status=status))
        if self.multi:
            self._promotions_first()

    def _promotions_first(self) -> None:
        """Make successive halving issue promotions before new configurations.

        SMAC's bracket generator walks its tracker from the lowest stage up and stays suspended
        inside it between asks, so with several workers it keeps opening fresh lowest-budget groups
        while a finished rung waits for its promotions (measured: 26 cheap trials before the first
        promotion with 2 workers). Walking the highest stages first and restarting the generator
        after every tell (SMAC itself restarts it on load) promotes as soon as a rung is complete.
        Touches two private attributes of smac 2.4.1 (pinned).
        """
        intensifier = self.smac.intensifier
        stages = sorted(intensifier._tracker.items(), key=lambda item: -item[0][1])
        intensifier._tracker.clear()
        intensifier._tracker.update(stages)
        self.smac.optimizer._trial_generator = iter(intensifier)


# ---------------------------------------------------------------------------------------- the loop
RESUME_MAY_CHANGE = {"max_trials", "max_compute", "workers", "trial_timeout", "runner", "sbatch_args",
                     "trial_threads"}


def base_allocation(args: SearchArgs, shape) -> Allocation:
    if args.allocation:
        return Allocation.load(args.allocation)
    return Allocation.uniform(shape.num_layers, ["q_proj", "v_proj"], rank=8, dropout=0.05)


def trial_argv(args: SearchArgs, trial_dir: Path) -> list[str]:
    if args.trial_nproc == 1:
        return [sys.executable, "-m", args.trial_module, str(trial_dir)]
    if args.trial_launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={args.trial_nproc}",
                f"--master_port={free_port()}", "--module", args.trial_module, str(trial_dir)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.trial_nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", args.trial_module, str(trial_dir)]


def run(args: SearchArgs) -> dict:
    args.validate()
    start = time.time()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    guard(out / "search_args.json", asdict(args), what="a search", may_change=RESUME_MAY_CHANGE)
    from floe_dist.stages.allocate import model_shape

    shape = model_shape(args.model)  # meta device: shapes only, no weights
    base = base_allocation(args, shape)
    base_file = write_json_atomic(out / "base_allocation.json", base.to_json())
    settings = {"model": args.model, "task": args.task, "allocation": str(base_file.resolve()),
                "micro_batch": args.micro_batch, "zero": args.zero, "quant": args.quant,
                "max_length": args.max_length, "val_limit": args.val_limit, "objective": args.objective}
    ledger = Ledger(out / "search.json", args)
    proposer = GridProposer(args) if args.mode == "grid" else SmacProposer(args, out)
    workers = args.workers or default_workers(args.trial_nproc, args.trial_threads)
    runner = (SlurmRunner(workers, args.sbatch_args, array=args.runner == "slurm-array")
              if args.runner.startswith("slurm") else LocalPool(workers, args.trial_nproc, args.trial_threads))
    by_id = {t.id: t for t in ledger.trials}
    cap = args.max_compute * args.max_steps

    def prepare(trial: Trial) -> Launch | None:
        """The trial's launch, with its trial.json written; None when there is nothing to start."""
        trial_dir = out / "trials" / f"{trial.id:04d}"
        result = trial_dir / "result.json"
        if trial.attempts and result.is_file():  # finished while the search was down (a Slurm job)
            record(Outcome(trial.id, "success", trial.seconds or 0.0, trial.worker))
            return None
        job = Launch(trial.id, trial_argv(args, trial_dir), trial_dir, args.trial_timeout)
        if trial.attempts and isinstance(runner, SlurmRunner) and runner.adopt(job, trial.worker):
            return None
        result.unlink(missing_ok=True)
        trial_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(trial_dir / "trial.json", {"trial_id": trial.id, "config": trial.config,
                                                     "budget": trial.budget, "seed": trial.seed,
                                                     "settings": settings})
        return job

    def submit_batch(batch: list[tuple[Trial, Launch]]) -> None:
        """Submit trials that start together (one job array with --runner slurm-array)."""
        for (trial, _), worker in zip(batch, runner.submit_all([job for _, job in batch])):
            trial.worker, trial.attempts, trial.status = worker, trial.attempts + 1, "running"
        if batch:
            ledger.save()

    def record(outcome: Outcome) -> None:
        trial = by_id[outcome.trial_id]
        trial.status, trial.seconds, trial.worker, trial.reason = (outcome.status, outcome.seconds,
                                                                   outcome.worker, outcome.reason)
        if outcome.status == "success":
            result = json.loads((out / "trials" / f"{trial.id:04d}" / "result.json").read_text())
            trial.cost, trial.metrics = float(result["cost"]), result
            if not math.isfinite(trial.cost):
                trial.status, trial.reason = "crashed", f"non-finite cost {trial.cost}"
        else:
            print(f"[search] trial {trial.id} {outcome.status}: {outcome.reason}", file=sys.stderr)
        ledger.save()  # the result is durable before SMAC hears of it (resume tells SMAC again)
        proposer.tell(trial)
        pbar.update(trial.budget / args.max_steps)
        best = ledger.incumbent()
        if best:
            pbar.set_postfix(best=f"{best.cost:.4f}", rank=best.config["rank"], steps=best.budget)

    pending = proposer.resume(ledger)
    by_id.update({t.id: t for t in ledger.trials})
    if ledger.trials:
        print(f"[search] resuming: {len(ledger.finished())} trials finished, {len(pending)} to issue again")
    total = len(proposer.points) if args.mode == "grid" else args.max_compute
    pbar = tqdm(total=total, desc=f"search ({args.mode})", unit="trial",
                initial=sum(t.budget for t in ledger.finished()) / args.max_steps,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} full trials [{elapsed}{postfix}]")
    try:
        while True:
            batch: list[tuple[Trial, Launch]] = []
            while runner.free_slots - len(batch) > 0:
                if pending:
                    trial = pending.pop(0)
                elif args.mode == "grid" or (len(ledger.trials) < args.max_trials
                                             and ledger.compute_used() + args.max_steps <= cap):
                    trial = proposer.ask(ledger)
                    if trial is None:  # the grid or the space is exhausted
                        break
                    by_id[trial.id] = trial
                else:
                    break
                job = prepare(trial)
                if job is not None:
                    batch.append((trial, job))
            submit_batch(batch)
            if not runner.running:
                break
            for outcome in runner.wait():
                record(outcome)
    finally:
        runner.shutdown()
        pbar.close()
    return finish(args, out, ledger, base, shape, time.time() - start)


def finish(args: SearchArgs, out: Path, ledger: Ledger, base: Allocation, shape, seconds: float) -> dict:
    best = ledger.incumbent()
    if best is None:
        reasons = "\n  - ".join(f"trial {t.id}: {t.status}: {t.reason}" for t in ledger.finished()[-5:])
        raise ValueError(f"no trial succeeded, so there is no rank to choose; last failures:\n  - {reasons}")
    chosen = base.resized(int(best.config["rank"]), best.config.get("experts"), method=f"{base.method}+{args.mode}")
    chosen.with_parameter_count(shape.shapes)
    chosen.meta["search"] = {"config": best.config, "cost": best.cost, "budget": best.budget,
                             "objective": args.objective, "search": str(out / "search.json")}
    chosen.save(out / "allocation.json")
    finished = ledger.finished()
    summary = {"mode": args.mode, "incumbent": asdict(best), "trials": len(finished),
               "failed": sum(t.status != "success" for t in finished),
               "compute_steps": sum(t.budget for t in finished),
               "compute_full_trials": sum(t.budget for t in finished) / args.max_steps,
               "trial_seconds": sum(t.seconds or 0.0 for t in finished), "wall_seconds": seconds,
               "lr": best.config["lr"], "rank": best.config["rank"],
               "trainable_parameters": chosen.trainable_parameters}
    ledger.extra = {"summary": summary}
    ledger.save()
    plot_search(ledger, out / "search.png", args.max_steps)
    print(f"[search] {args.mode}: {len(finished)} trials ({summary['failed']} failed), "
          f"{summary['compute_full_trials']:.2f} full-trial equivalents, {seconds:.0f}s; incumbent rank "
          f"{best.config['rank']} lr {best.config['lr']:.2e} cost {best.cost:.4f} at {best.budget} steps "
          f"-> {out / 'allocation.json'}")
    return summary


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
