"""The search loop: keep every worker busy with proposed trials, record each outcome, stop on budget.

A trial's outcome is written to the ledger before the proposer is told, and trials that were running
when a search died are issued again (a Slurm job still queued is adopted instead), so a resumed
search loses and repeats no finished trial.

Results reach a proposer that learns (SMAC) in trial order, and trial k is proposed once the results of
trials 0 .. k - workers have reached it and no others: what it knows at each proposal does not depend on which
trial happened to finish first, so the same recipe and seed make the same choices whatever the workers' timing.
A worker that has no trial to run while others train takes the spare work it was given (the campaign's zero-shot
evaluation: floe_dist/search/spare_work.py) once it has waited its grace, else it waits; under a time limit the spare
work ends, with the part it finished, as soon as a trial could use its worker.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from floe_dist.search.ledger import FINISHED, Ledger, Trial
from floe_dist.search.proposers import Limits
from floe_dist.search.runners import Launch, LocalPool, Outcome, SlurmRunner, SlurmWorkers, WarmPool, default_workers
from floe_dist.search.spare_work import GRACE, SpareJob
from floe_dist.search.trial import TrialSpec

if TYPE_CHECKING:
    from floe_dist.recipe import SearchSection


def launch_argv(args: SearchSection, module: str, *module_args: str) -> list[str]:
    """``python -m MODULE ARGS`` as one process, or as a group of ``trial_nproc`` ranks on a free port."""
    from floe_dist.distributed.runtime import free_port

    if args.trial_nproc == 1:
        return [sys.executable, "-m", module, *module_args]
    if args.trial_launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={args.trial_nproc}",
                f"--master_port={free_port()}", "--module", module, *module_args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.trial_nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", module, *module_args]


def trial_prices(ledger: Ledger) -> tuple[float, float] | None:
    """(seconds a trial takes besides its training, seconds a trained step takes), from the finished trials: their
    wall seconds split by the training seconds each reports (``train_seconds``, floe_dist/search/trial.py). Trials
    of a program that reports none are priced per step only, loading and scoring included. None before a result.

    Priced per step only, the loading and validation scoring of the short first rung, which measures the prices,
    was charged to every step of the longer trials it admits: on SST-2's 8-step trials 2.9 s a step against the
    1.05 s their training took, which at a 500 s campaign budget refused a second bracket that would have fitted."""
    done = [(t, t.budget - ledger.resumes_from(t)) for t in ledger.finished() if t.seconds]  # (trial, trained)
    timed = [(t.seconds, t.metrics["train_seconds"], n) for t, n in done if n > 0 and "train_seconds" in t.metrics]
    if timed:
        per_step = sum(train for _, train, _ in timed) / sum(n for _, _, n in timed)
        return sum(max(0.0, wall - train) for wall, train, _ in timed) / len(timed), per_step
    trained = sum(n for _, n in done)
    return (0.0, sum(t.seconds for t, _ in done) / trained) if trained else None


class SearchLoop:
    def __init__(self, args: SearchSection, out: Path, ledger: Ledger, proposer, spec: Callable[[Trial], TrialSpec],
                 spare: list[SpareJob] = (), start: float | None = None):
        """``start``: when search.time_limit began (the stage's start, so that its set-up counts); none: now."""
        self.args, self.out, self.ledger, self.proposer, self.spec = args, out, ledger, proposer, spec
        self.start = time.time() if start is None else start
        worker_argv = lambda worker_dir: launch_argv(args, "floe_dist.search.worker", str(worker_dir),  # noqa: E731
                                                     "--trial-module", args.trial_module)
        workers = args.workers or default_workers(args.trial_nproc, args.trial_threads)
        if args.runner.startswith("slurm") and args.trial_workers == "warm":
            self.runner = SlurmWorkers(workers, worker_argv, out / "workers", args.sbatch_args)
        elif args.runner.startswith("slurm"):  # auto or cold: one job per trial, adopted on resume
            self.runner = SlurmRunner(workers, args.sbatch_args, array=args.runner == "slurm-array")
        elif args.trial_workers in ("auto", "warm"):
            self.runner = WarmPool(workers, worker_argv, out / "workers", args.trial_nproc, args.trial_threads)
        else:
            self.runner = LocalPool(workers, args.trial_nproc, args.trial_threads)
        self.by_id = {t.id: t for t in ledger.trials}
        self.slots = self.runner.free_slots  # the workers: trials running at once
        self.pbar = None
        local = isinstance(self.runner, LocalPool) and args.trial_nproc == 1  # WarmPool is one too
        self.spare = [job for job in spare if not job.result.is_file()] if local else []
        self.spare_running: dict[int, SpareJob] = {}  # by launch id: -1, -2, ...
        self.spare_done: list[dict] = []  # what became of each job: name, worker, status, seconds
        self.idle_since: float | None = None  # when a worker found no trial and spare work was left for it
        self.started: dict[int, float] = {}  # trial id -> when it was submitted (its time already spent)

    def spare_launch(self, batch: list) -> Launch | None:
        """Spare work for a free worker that has no trial to run, while a trial runs (otherwise the search is over
        and the campaign runs it itself, on all its threads), once the worker has waited its grace (spare_work.py)."""
        trials_running = len(self.runner.running) - len(self.spare_running) + sum(t is not None for t, _ in batch)
        if not self.spare or not trials_running:
            return None
        self.idle_since = self.idle_since or time.monotonic()
        if time.monotonic() < self.spare_due():
            return None
        self.idle_since = None
        job = self.spare.pop(0)
        launch_id = -1 - len(self.spare_running) - len(self.spare_done)
        self.spare_running[launch_id] = job
        return Launch(launch_id, launch_argv(self.args, job.module, str(job.folder)), job.folder,
                      self.args.trial_timeout, module=job.module)

    def spare_due(self) -> float:
        """When the waiting worker may take spare work: ``GRACE`` of the finished trials' mean seconds after it began
        to wait, at once before any trial has finished."""
        seconds = [t.seconds for t in self.ledger.finished() if t.seconds]
        return self.idle_since + (GRACE * sum(seconds) / len(seconds) if seconds else 0.0)

    def wait(self) -> list[Outcome]:
        """The outcomes of the trials (and spare work) that ended; with a worker waiting out its grace, none
        once the grace is over, so that the worker may take the spare work."""
        if self.idle_since is None:  # set only while spare work is left (spare_launch)
            return self.runner.wait()
        return self.runner.wait(until=self.spare_due())

    def spare_finished(self, outcome: Outcome) -> None:
        job = self.spare_running.pop(outcome.trial_id)
        self.spare_done.append({"name": job.name, "worker": outcome.worker, "status": outcome.status,
                                "seconds": outcome.seconds})
        if outcome.status == "success":
            tqdm.write(f"[search] {job.name} ran on {outcome.worker} while it had no trial ({outcome.seconds:.0f}s)")
        else:
            print(f"[search] {job.name} on {outcome.worker} {outcome.status}: {outcome.reason} (the campaign runs "
                  f"it itself)", file=sys.stderr)

    def stop_spare(self, why: str) -> None:
        """Under a time limit, tell the spare work still running to end with what it finished (a zero-shot
        evaluation scores part of the split): the search's time is the trials', and the rest of the budget the final
        run's. Without one, the spare work runs to its end (the campaign would otherwise run it itself)."""
        if self.args.time_limit is None:
            return
        for job in self.spare_running.values():
            if not job.stop_file.is_file():
                job.stop_file.touch()
                tqdm.write(f"[search] {why}: {job.name} ends with the part it finished")

    def trial_waits_for_spare(self, pending: list[Trial]) -> bool:
        """Whether a trial could be issued now but every worker is busy, one of them with spare work: under a time
        limit that work gives its worker back (``stop_spare``), since the limit counts every worker's seconds for
        the trials (``limits``). A proposer that then has nothing to give costs the spare work the rest of its
        split, never a trial."""
        if not self.spare_running or self.runner.free_slots or self.args.time_limit is None:
            return False
        return bool(pending) or (self.ready_to_ask() and self.proposer.fits(self.ledger, self.limits()))

    def trial_dir(self, trial: Trial) -> Path:
        return self.out / "trials" / f"{trial.id:04d}"

    def prepare(self, trial: Trial) -> Launch | None:
        """The trial's launch, with its trial.json written; None when there is nothing to start."""
        trial_dir = self.trial_dir(trial)
        result = trial_dir / "result.json"
        if trial.attempts and result.is_file():  # finished while the search was down (a Slurm job)
            self.record(Outcome(trial.id, "success", trial.seconds or 0.0, trial.worker))
            return None
        job = Launch(trial.id, launch_argv(self.args, self.args.trial_module, str(trial_dir)), trial_dir,
                     self.args.trial_timeout)
        if trial.attempts and isinstance(self.runner, SlurmRunner) and self.runner.adopt(job, trial.worker):
            return None
        result.unlink(missing_ok=True)
        self.spec(trial).save(trial_dir)
        return job

    def submit(self, batch: list[tuple[Trial | None, Launch]]) -> None:
        """Submit trials (and spare work: no trial) that start together (one job array with --runner slurm-array)."""
        for (trial, _), worker in zip(batch, self.runner.submit_all([job for _, job in batch])):
            if trial is not None:
                trial.worker, trial.attempts, trial.status = worker, trial.attempts + 1, "running"
                self.started[trial.id] = time.time()
        if batch:
            self.ledger.save()

    def record(self, outcome: Outcome) -> None:
        trial = self.by_id[outcome.trial_id]
        trial.status, trial.seconds, trial.worker, trial.reason = (outcome.status, outcome.seconds,
                                                                   outcome.worker, outcome.reason)
        if outcome.status == "success":
            result = json.loads((self.trial_dir(trial) / "result.json").read_text())
            trial.cost, trial.metrics = float(result["cost"]), result
            if not math.isfinite(trial.cost):
                trial.status, trial.reason = "crashed", f"non-finite cost {trial.cost}"
        else:
            print(f"[search] trial {trial.id} {outcome.status}: {outcome.reason}", file=sys.stderr)
        self.ledger.save()  # the result is durable before SMAC hears of it (resume tells SMAC again)
        self.pbar.update(trial.budget / self.args.max_steps)
        best = self.ledger.incumbent()
        if best:
            self.pbar.set_postfix(best=f"{best.cost:.4f}", rank=best.config["rank"], steps=best.budget)

    def tell_next(self) -> bool:
        """Tell the proposer the first untold trial's result if it has one; whether it did."""
        trial = next((t for t in self.ledger.trials if not t.told), None)
        if trial is None or trial.status not in FINISHED:
            return False
        self.proposer.tell(trial)
        self.ledger.save()
        return True

    def ready_to_ask(self) -> bool:
        """Whether the next trial may be proposed now: every trial up to ``next - workers`` has been told (in trial
        order), and the proposer does not wait for a result it would learn from (then that result is told first)."""
        if not self.proposer.learns:
            return True
        due = len(self.ledger.trials) - self.slots  # the trials whose results this proposal must know
        while any(not t.told and t.id <= due for t in self.ledger.trials):
            if not self.tell_next():
                return False  # the trial it needs is still running
        while self.proposer.waits(self.ledger):
            if not self.tell_next():
                return False
        return True

    def next_trial(self, pending: list[Trial]) -> Trial | None:
        """A trial to issue again, else a new proposal while the budget allows, else None."""
        ledger = self.ledger
        if pending:
            return pending.pop(0)
        if not self.ready_to_ask():  # a result is on its way that this proposal must know
            return None
        if not self.proposer.fits(ledger, self.limits()):
            return None
        trial = self.proposer.ask(ledger)  # None: the grid or the space is exhausted
        if trial is not None:
            self.by_id[trial.id] = trial
        return trial

    def limits(self) -> Limits:
        """What the search may issue: max_compute full trials and max_trials, and with a time limit no more than
        the workers' seconds left until then, less what the running trials still need, at the prices the finished
        trials measured (``trial_prices``). Before any result, the first bracket is let through: it measures them."""
        args, ledger = self.args, self.ledger
        limits = Limits(args.max_compute * args.max_steps, args.max_trials)
        prices = None if args.time_limit is None else trial_prices(ledger)
        if prices is None:
            return limits
        per_trial, per_step = prices
        now = time.time()
        running = [t for t in ledger.trials if t.status == "running"]
        still_needed = sum(max(0.0, per_trial + per_step * (t.budget - ledger.resumes_from(t))
                               - (now - self.started.get(t.id, now))) for t in running)
        seconds = max(0.0, args.time_limit - (now - self.start)) * self.slots - still_needed
        return replace(limits, seconds=seconds, per_trial=per_trial, per_step=per_step)

    def run(self) -> None:
        args, ledger = self.args, self.ledger
        pending = self.proposer.resume(ledger)
        self.by_id.update({t.id: t for t in ledger.trials})
        if ledger.trials:
            print(f"[search] resuming: {len(ledger.finished())} trials finished, {len(pending)} to issue again")
        total = len(self.proposer.points) if args.mode == "grid" else args.max_compute
        self.pbar = tqdm(total=total, desc=f"search ({args.mode})", unit="trial",
                         initial=sum(t.budget for t in ledger.finished()) / args.max_steps,
                         bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} full trials [{elapsed}{postfix}]")
        try:
            while True:
                batch: list[tuple[Trial | None, Launch]] = []
                while self.runner.free_slots - len(batch) > 0:
                    trial = self.next_trial(pending)
                    if trial is None:
                        spare = self.spare_launch(batch)
                        if spare is None:
                            break
                        batch.append((None, spare))
                        continue
                    self.idle_since = None  # the worker that waited has a trial
                    job = self.prepare(trial)
                    if job is not None:
                        batch.append((trial, job))
                self.submit(batch)
                if self.trial_waits_for_spare(pending):
                    self.stop_spare("a trial waits for a worker")
                if len(self.runner.running) == len(self.spare_running):  # no trial running
                    if self.tell_next():  # a finished trial the proposer has not heard of: it may propose again
                        continue
                    if not self.runner.running:
                        break
                    self.stop_spare("no trial left")  # the search is over but for spare work
                for outcome in self.wait():
                    self.spare_finished(outcome) if outcome.trial_id < 0 else self.record(outcome)
        finally:
            self.runner.shutdown()
            self.pbar.close()
