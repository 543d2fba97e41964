"""Where search trials run: on warm workers, or each trial as its own process (or process group, or Slurm job).

A trial is a command that reads ``<trial_dir>/trial.json`` and writes ``<trial_dir>/result.json``
(see floe_dist/search/trial.py). A runner starts trials, bounds each by a time limit, and reports every one
that ended as an :class:`Outcome`: ``success`` only when the command exited 0 *and* wrote its
result; ``timeout`` when it outlived its limit (its whole process group is killed); ``crashed``
otherwise, with the tail of its log as the reason. Nothing is retried here: the search decides.

* :class:`WarmPool` — the local default: long-lived workers (floe_dist/search/worker.py) that load once and
  run trial after trial; a worker that crashed, hung or diverged is replaced by a fresh one.
* :class:`LocalPool` — one local process (group) per trial, ``workers`` at a time, each pinned to its own CPU
  threads or GPUs. Trials (and warm workers) die with the search (``PR_SET_PDEATHSIG``, also the ranks of
  torchrun/deepspeed groups), so a killed search leaves no orphans. A one-process trial or worker is forked from
  the command's zygote when it has one (``start_local``).
* :class:`SlurmWorkers` — warm workers as Slurm jobs, each taking trial after trial until the search ends.
* :class:`SlurmRunner` — one ``sbatch`` job per trial, or with ``array=True`` the trials that start
  together as one job array (slurm/search_array.sbatch, one task per trial); polled with ``squeue``
  (final state from ``scontrol``, else ``sacct``); a resumed search re-attaches to jobs or array
  tasks that are still queued or running instead of submitting them again.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from floe_dist.distributed.runtime import die_with_parent

# Launcher variables of the *search* process that must not leak into a trial's own launch.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")


@dataclass
class Launch:
    trial_id: int
    argv: list[str]
    trial_dir: Path
    timeout: float  # seconds
    module: str = ""  # warm workers: the module that runs it, when not the trial module (spare work)


@dataclass
class Outcome:
    trial_id: int
    status: str  # success | crashed | timeout
    seconds: float
    worker: str
    reason: str = ""


def trial_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    return {**env, **(extra or {})}


def log_tail(path: Path, lines: int = 6) -> str:
    if not path.is_file():
        return "no log"
    tail = [line for line in path.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    return " | ".join(tail)[-800:]


def _outcome(launch: Launch, code: int | None, timed_out: bool, seconds: float, worker: str) -> Outcome:
    log = launch.trial_dir / "trial.log"
    if timed_out:
        return Outcome(launch.trial_id, "timeout", seconds, worker, f"exceeded {launch.timeout:.0f}s time limit")
    if code == 0 and (launch.trial_dir / "result.json").is_file():
        return Outcome(launch.trial_id, "success", seconds, worker)
    why = f"exit code {code}" if code else "exited 0 without writing result.json"
    return Outcome(launch.trial_id, "crashed", seconds, worker, f"{why}: {log_tail(log)}")


def _die_with_parent() -> None:
    """Runs in the child before exec: own process group, and SIGTERM when the search dies."""
    os.setsid()
    # SIGTERM, not SIGKILL: torchrun and the deepspeed launcher start their ranks in sessions of their own and
    # only take them down when they get the chance to (their ranks also die with them: runtime.init_distributed)
    die_with_parent()


def start_local(argv: list[str], log: Path, env: dict[str, str]):
    """A trial or worker process in a session of its own, output appended to ``log``: forked from this process's
    zygote when it has one and the command is one ``python -m`` process (no interpreter start, no imports:
    floe_dist/distributed/forked_ranks.py), else a fresh ``subprocess.Popen``."""
    from floe_dist.distributed.forked_ranks import zygote

    if zygote() is not None and argv[:2] == [sys.executable, "-m"]:
        return zygote().popen(argv[1:], env, str(log))
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env,
                                preexec_fn=_die_with_parent)


def default_workers(nproc_per_trial: int, threads_per_rank: int) -> int:
    """As many concurrent trials as the machine holds: GPUs when present, else CPU cores."""
    import torch

    if torch.cuda.is_available():
        return max(1, torch.cuda.device_count() // nproc_per_trial)
    return max(1, (os.cpu_count() or 1) // (nproc_per_trial * threads_per_rank))


class LocalPool:
    """Runs trials as local process groups, at most ``workers`` at once."""

    def __init__(self, workers: int, nproc_per_trial: int = 1, threads_per_rank: int = 1):
        import torch

        self.workers, self.nproc, self.threads = workers, nproc_per_trial, threads_per_rank
        self.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.running: dict[int, tuple[Launch, subprocess.Popen, float]] = {}  # slot -> (launch, process, start)

    @property
    def free_slots(self) -> int:
        return self.workers - len(self.running)

    def _slot_env(self, slot: int) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.threads)}
        if self.gpus:
            ids = range(slot * self.nproc, (slot + 1) * self.nproc)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i % self.gpus) for i in ids)
        return env

    def submit(self, launch: Launch) -> str:
        slot = next(s for s in range(self.workers) if s not in self.running)
        launch.trial_dir.mkdir(parents=True, exist_ok=True)
        proc = start_local(launch.argv, launch.trial_dir / "trial.log", trial_env(self._slot_env(slot)))
        self.running[slot] = (launch, proc, time.monotonic())
        return f"local:{slot}:pid{proc.pid}"

    def submit_all(self, launches: list[Launch]) -> list[str]:
        return [self.submit(launch) for launch in launches]

    def wait(self, poll_seconds: float = 0.1, until: float | None = None) -> list[Outcome]:
        """Block until at least one trial ends, or ``until`` (``time.monotonic()``) passes; return every trial that
        ended."""
        while True:
            done = []
            for slot, (launch, proc, start) in list(self.running.items()):
                code, timed_out = proc.poll(), False
                if code is None and time.monotonic() - start > launch.timeout:
                    _kill_group(proc)
                    code, timed_out = proc.returncode, True
                if code is not None:
                    del self.running[slot]
                    done.append(_outcome(launch, code, timed_out, time.monotonic() - start,
                                         f"local:{slot}:pid{proc.pid}"))
            if done or not self.running or (until is not None and time.monotonic() >= until):
                return done
            time.sleep(poll_seconds)

    def shutdown(self) -> None:
        for _, proc, _ in self.running.values():
            _kill_group(proc)
        self.running.clear()


class WarmPool(LocalPool):
    """Local warm workers (floe_dist/search/worker.py): ``workers`` long-lived processes or process groups, each
    running trial after trial with its backbone and data loaded once. A worker whose trial crashed, hung or
    diverged is gone (it exits, or is killed here) and the next trial on its slot starts a fresh one."""

    def __init__(self, workers: int, worker_argv, root: Path, nproc_per_trial: int = 1, threads_per_rank: int = 1):
        super().__init__(workers, nproc_per_trial, threads_per_rank)
        self.worker_argv, self.root = worker_argv, root  # worker_argv(worker_dir) -> the command
        self.procs: dict[int, subprocess.Popen] = {}
        self.seq: dict[int, int] = {}

    def submit(self, launch: Launch) -> str:
        from floe_dist.search.worker import hand_over

        slot = next(s for s in range(self.workers) if s not in self.running)
        worker_dir = self.root / f"worker-{slot}"
        launch.trial_dir.mkdir(parents=True, exist_ok=True)
        self.seq[slot] = self.seq.get(slot, 0) + 1
        # before a fresh worker starts: it takes this one
        hand_over(worker_dir, self.seq[slot], launch.trial_dir, module=launch.module)
        proc = self.procs.get(slot)
        if proc is None or proc.poll() is not None:
            proc = start_local(self.worker_argv(worker_dir), worker_dir / "worker.log",
                               trial_env(self._slot_env(slot)))
            self.procs[slot] = proc
        self.running[slot] = (launch, proc, time.monotonic())
        return f"warm:{slot}:pid{proc.pid}"

    def wait(self, poll_seconds: float = 0.05, until: float | None = None) -> list[Outcome]:
        while True:
            done = []
            for slot, (launch, proc, start) in list(self.running.items()):
                code = proc.poll()
                outcome = _warm_outcome(launch, start, f"warm:{slot}:pid{proc.pid}",
                                        None if code is None else code or 1, lambda proc=proc: _kill_group(proc))
                if outcome:
                    done.append(outcome)
                    del self.running[slot]
            if done or not self.running or (until is not None and time.monotonic() >= until):
                return done
            time.sleep(poll_seconds)

    def shutdown(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                _kill_group(proc)
        self.procs.clear()
        self.running.clear()


class SlurmWorkers:
    """Warm workers as Slurm jobs (``--runner slurm --trial-workers warm``): each job runs
    floe_dist/search/worker.py and takes trial after trial, through its task file on the shared filesystem,
    until the search cancels it at the end. A job that ended under a trial (crash, node failure, its time
    limit) records that trial as crashed, and the slot's next trial gets a new job; a trial past its limit
    has its job cancelled. A resumed search first cancels the workers a killed one left behind (they share
    a job name derived from the search folder) and issues their trials again."""

    def __init__(self, workers: int, worker_argv, root: Path, sbatch_args: str = ""):
        import hashlib

        self.workers, self.worker_argv, self.root = workers, worker_argv, root
        self.sbatch_args = shlex.split(sbatch_args)
        self.name = "floe-workers-" + hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
        subprocess.run(["scancel", "--name", self.name], capture_output=True)  # a killed search's idle workers
        self.jobs: dict[int, str] = {}  # slot -> Slurm job id of its worker
        self.seq: dict[int, int] = {}
        self.running: dict[int, tuple[Launch, float]] = {}

    @property
    def free_slots(self) -> int:
        return self.workers - len(self.running)

    def submit_all(self, launches: list[Launch]) -> list[str]:
        return [self.submit(launch) for launch in launches]

    def submit(self, launch: Launch) -> str:
        from floe_dist.search.worker import hand_over

        slot = next(s for s in range(self.workers) if s not in self.running)
        worker_dir = self.root / f"worker-{slot}"
        launch.trial_dir.mkdir(parents=True, exist_ok=True)
        self.seq[slot] = self.seq.get(slot, 0) + 1
        job = self.jobs.get(slot)
        if job is None or job not in (SlurmRunner._queued() or {job}):
            worker_dir.mkdir(parents=True, exist_ok=True)
            cmd = ["sbatch", "--parsable", f"--job-name={self.name}", f"--output={worker_dir / 'worker.log'}",
                   *self.sbatch_args, f"--wrap={shlex.join(self.worker_argv(worker_dir))}"]
            out = subprocess.run(cmd, capture_output=True, text=True, env=trial_env())
            if out.returncode != 0:
                raise ChildProcessError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
            job = self.jobs[slot] = out.stdout.strip().split(";")[0]
        hand_over(worker_dir, self.seq[slot], launch.trial_dir, job)  # addressed: a dying predecessor ignores it
        self.running[slot] = (launch, time.monotonic())
        return f"slurm-worker:{job}"

    def wait(self, poll_seconds: float = 1.0) -> list[Outcome]:
        while self.running:
            queued, done = SlurmRunner._queued(), []
            for slot, (launch, start) in list(self.running.items()):
                job = self.jobs[slot]
                gone = queued is not None and job not in queued  # the job ended under its trial
                outcome = _warm_outcome(launch, start, f"slurm-worker:{job}", 1 if gone else None,
                                        lambda slot=slot: self._cancel(slot))
                if outcome:
                    if gone and outcome.status != "success":
                        del self.jobs[slot]  # the slot's next trial gets a new job
                    done.append(outcome)
                    del self.running[slot]
            if done:
                return done
            time.sleep(poll_seconds)
        return []

    def _cancel(self, slot: int) -> None:
        subprocess.run(["scancel", self.jobs.pop(slot)], capture_output=True)

    def shutdown(self) -> None:
        subprocess.run(["scancel", "--name", self.name], capture_output=True)
        self.jobs.clear()
        self.running.clear()


def _warm_outcome(launch: Launch, start: float, worker: str, exit_code: int | None, stop) -> Outcome | None:
    """What became of a trial on a warm worker (process or job), None while it runs: its result (a non-finite
    cost also ends the worker: worker.py exits after it, and ``stop`` makes sure no next trial goes to it), the
    worker gone under it (``exit_code`` set: crashed), or past its time limit (``stop``, then a timeout)."""
    seconds = time.monotonic() - start
    if (launch.trial_dir / "result.json").is_file():
        if not launch.module and not _finite_cost(launch.trial_dir / "result.json"):  # spare work has no cost
            stop()
        return Outcome(launch.trial_id, "success", seconds, worker)
    if exit_code is not None:
        return _outcome(launch, exit_code, False, seconds, worker)
    if seconds > launch.timeout:
        stop()
        return _outcome(launch, None, True, seconds, worker)
    return None


def _finite_cost(result: Path) -> bool:
    return math.isfinite(float(json.loads(result.read_text()).get("cost", math.nan)))


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the trial's process group (torchrun and its ranks too), SIGKILL after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _final_state(job: str) -> str:
    """JobState of a finished job: ``scontrol`` knows it for MinJobAge seconds and needs no
    accounting database; ``sacct`` is the fallback. Empty when neither knows."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], capture_output=True, text=True)
    return out.stdout.strip().split("\n")[0].split(" ")[0] if out.returncode == 0 else ""


class SlurmRunner:
    """One ``sbatch`` job per trial (``--wrap`` of the trial command), or one job array per batch of
    trials (``array``); at most ``workers`` queued."""

    def __init__(self, workers: int, sbatch_args: str = "", array: bool = False):
        self.workers, self.sbatch_args, self.array = workers, shlex.split(sbatch_args), array
        self.running: dict[str, tuple[Launch, float]] = {}  # job id (JOB or JOB_TASK) -> ...

    def submit_all(self, launches: list[Launch]) -> list[str]:
        """Worker ids (``slurm:JOB`` or ``slurm:JOB_TASK``) of trials submitted together."""
        if not self.array or len(launches) < 2:
            return [self.submit(launch) for launch in launches]
        from floe_dist.assets import SbatchTemplate

        for launch in launches:
            launch.trial_dir.mkdir(parents=True, exist_ok=True)
        first = launches[0]
        tasks = first.trial_dir.parent / f"array-{first.trial_id:04d}.tasks"
        tasks.write_text("".join(f"{shlex.join(l.argv)} > {shlex.quote(str(l.trial_dir / 'trial.log'))} 2>&1\n"
                                 for l in launches))
        script = tasks.with_suffix(".sbatch")
        script.write_text(SbatchTemplate.named("search_array").substitute(workdir=shlex.quote(os.getcwd())))
        minutes = max(1, int(max(l.timeout for l in launches) // 60) + 1)
        cmd = ["sbatch", "--parsable", f"--array=0-{len(launches) - 1}", f"--time={minutes}",
               f"--output={tasks.parent}/array-%A_%a.log", *self.sbatch_args, str(script), str(tasks)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=trial_env())
        if out.returncode != 0:
            raise ChildProcessError(f"sbatch --array failed ({out.returncode}): {out.stderr.strip()}")
        job = out.stdout.strip().split(";")[0]
        workers = []
        for task, launch in enumerate(launches):
            self.running[f"{job}_{task}"] = (launch, time.monotonic())
            workers.append(f"slurm:{job}_{task}")
        return workers

    @property
    def free_slots(self) -> int:
        return self.workers - len(self.running)

    def submit(self, launch: Launch) -> str:
        launch.trial_dir.mkdir(parents=True, exist_ok=True)
        minutes = max(1, int(launch.timeout // 60) + 1)
        cmd = ["sbatch", "--parsable", f"--job-name=floe-trial-{launch.trial_id}",
               f"--output={launch.trial_dir / 'trial.log'}", f"--time={minutes}", *self.sbatch_args,
               f"--wrap={shlex.join(launch.argv)}"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=trial_env())
        if out.returncode != 0:
            raise ChildProcessError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        job = out.stdout.strip().split(";")[0]
        self.running[job] = (launch, time.monotonic())
        return f"slurm:{job}"

    def adopt(self, launch: Launch, worker: str) -> bool:
        """Re-attach a resumed search to its trial's job if that job is still queued or running."""
        if not worker.startswith("slurm:"):
            return False
        job = worker.split(":", 1)[1]
        if job not in (self._queued() or set()):
            return False
        self.running[job] = (launch, time.monotonic())
        return True

    @staticmethod
    def _queued() -> set[str] | None:
        """Ids of this user's queued or running jobs; None when the controller did not answer."""
        out = subprocess.run(["squeue", "-h", "--me", "--array", "-o", "%i"], capture_output=True, text=True)
        return set(out.stdout.split()) if out.returncode == 0 else None

    def wait(self, poll_seconds: float = 2.0) -> list[Outcome]:
        while self.running:
            queued = self._queued()
            if queued is None:  # controller busy or restarting: ask again later
                time.sleep(poll_seconds)
                continue
            done = []
            for job in [j for j in self.running if j not in queued]:
                launch, start = self.running.pop(job)
                state, seconds, worker = _final_state(job), time.monotonic() - start, f"slurm:{job}"
                if state == "TIMEOUT":
                    done.append(_outcome(launch, None, True, seconds, worker))
                else:
                    done.append(_outcome(launch, 0 if state in ("COMPLETED", "") else 1, False, seconds, worker))
            if done:
                return done
            time.sleep(poll_seconds)
        return []

    def shutdown(self) -> None:
        """Jobs are left to finish (Slurm enforces their time limit): a resumed search adopts them."""
        self.running.clear()
