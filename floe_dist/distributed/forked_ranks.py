"""Local ranks forked from a process that has the stack imported, instead of fresh interpreters.

A fresh ``python -m launcher.cli`` spends about 4 s of CPU importing torch, transformers and DeepSpeed (6.5
CPU-seconds on a 2-core machine) before a stage's first step, and torchrun adds an interpreter of its own. So the
campaign forks a *zygote* as it starts, before it has run a tensor op or started a thread (an OpenMP pool, a
process group or a CUDA context does not survive a fork); the zygote imports the stack once and forks each
launch's ranks. A rank is the process ``python -m launcher.cli ARGV`` would be: ``launcher.cli`` run as
``__main__`` with the launch's argv, environment (torchrun's variables for its rank when there are several),
thread count and fresh random seeds, and a normal interpreter exit. One failed rank stops the others and the
launch fails with status 1, as under torchrun. Ranks die with the zygote and the zygote with its parent
(PR_SET_PDEATHSIG), so a killed campaign leaves no stage running.

Linux CPU machines only (fork, PR_SET_PDEATHSIG; on a GPU machine, an import that initialised the CUDA runtime
before the fork would break it in the ranks, unverified there); elsewhere, under srun, and in a process that may
already have run tensor ops (a stage called as a function, in a test or a notebook), a launch is a command.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import time
from typing import IO

# What a stage run or a search worker imports: the zygote imports it once, and every process it forks has it
PRELOAD = ("torch", "numpy", "transformers", "transformers.models.llama.modeling_llama", "tokenizers", "deepspeed",
           "deepspeed.runtime.zero.stage3", "peft", "datasets", "safetensors.torch", "torch.utils.tensorboard",
           "launcher.cli", "floe_dist.stages.train", "floe_dist.stages.score", "floe_dist.stages.evaluate",
           "floe_dist.trainer", "floe_dist.evaluation", "floe_dist.search.worker", "floe_dist.search.trial")
GPU_DEVICES = ("/dev/nvidiactl", "/dev/kfd")  # NVIDIA, AMD: there ranks start as commands
_ZYGOTE: list[Zygote] = []  # this process's, once started


def rank_envs(nproc: int) -> list[dict[str, str]]:
    """What torchrun gives each of nproc local ranks (its rendezvous store then lives on rank 0)."""
    if nproc == 1:
        return [{}]
    from floe_dist.distributed.runtime import free_port

    world = dict(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))
    return [dict(world, RANK=str(r), LOCAL_RANK=str(r), ROLE_RANK=str(r)) for r in range(nproc)]


def become(request: dict, rank_env: dict[str, str]) -> None:
    """In the forked child: become ``python ARGV`` (``-m MODULE ...``, ``-c CODE ...`` or ``SCRIPT ...``) and exit
    as it would. Never returns, and never unwinds into the forking process's frames (their ``finally`` would run
    twice: a lock released for its holder, a process group destroyed)."""
    import random
    import runpy
    import warnings

    import numpy as np
    import torch

    from floe_dist.distributed.runtime import die_with_parent

    code: object = 1
    try:
        die_with_parent()
        if request.get("stdout"):  # else the forking process's own stdout and stderr
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), 1)
            os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), 2)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({**request["env"], **rank_env})
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        random.seed()  # a fresh process draws fresh seeds; a fork would repeat its parent's
        np.random.seed()
        argv = request["argv"]
        if argv[0] == "-m":  # python -m MODULE ARGS
            sys.argv = [argv[1], *argv[2:]]
            # runpy warns that the module was imported before (by PRELOAD): as intended, nothing more
            warnings.filterwarnings("ignore", f"'{argv[1]}' found in sys.modules", RuntimeWarning)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":  # python -c CODE ARGS
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:  # python SCRIPT ARGS
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # an uncaught error: the traceback and status 1, as the interpreter gives
        import traceback

        traceback.print_exc()
        code = 1
    exit_as_interpreter(code)


def exit_as_interpreter(code: object) -> None:
    """End this process as the interpreter ends on ``SystemExit(code)``: other threads joined, atexit handlers run,
    streams flushed, the status (a message: printed, status 1)."""
    import threading

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        getattr(threading, "_shutdown", lambda: None)()  # as Py_Finalize: wait for non-daemon threads
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit((code or 0) & 0xFF)


def wait_ranks(pids: list[int], timeout: float | None = None) -> int | None:
    """Every rank's end; when one fails the others are stopped and the status is 1, as under torchrun (one rank:
    its own status, negative for a signal). None: the time ran out (every rank killed)."""
    deadline, codes = None if timeout is None else time.monotonic() + timeout, {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(raw)
        failed = any(c != 0 for c in codes.values())
        if failed or (deadline is not None and time.monotonic() > deadline):
            for pid in set(pids) - set(codes):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            if not failed:
                return None
            return next(iter(codes.values())) if len(pids) == 1 else 1
        time.sleep(0.02)
    return 0 if all(c == 0 for c in codes.values()) else 1


def serve(requests: IO[str], answers: IO[str]) -> None:
    """Answer each request (a JSON line) until ``requests`` ends. ``run`` (the default): fork its ranks (argv,
    env, cwd, nproc, timeout, optionally stdout/stderr files) and answer with the launch's status; ``start``: fork
    one process in a session of its own and answer with its pid at once; ``poll``: a started process's status
    (None while it runs); ``ready``: at once (it is read only once the stack is imported)."""
    for line in requests:
        request = json.loads(line)
        if request.get("op") == "ready":
            answer = {"ready": True}
        elif request.get("op") == "poll":
            done, raw = os.waitpid(request["pid"], os.WNOHANG)
            answer = {"returncode": os.waitstatus_to_exitcode(raw) if done else None}
        else:
            pids = []
            for rank_env in rank_envs(request.get("nproc", 1)):
                pid = os.fork()
                if pid == 0:
                    requests.close()
                    answers.close()
                    if request.get("op") == "start":
                        os.setsid()  # its own process group: the caller stops it and whatever it starts at once
                    become(request, rank_env)
                pids.append(pid)
            answer = ({"pid": pids[0]} if request.get("op") == "start" else
                      {"returncode": wait_ranks(pids, request.get("timeout"))})
        print(json.dumps(answer), file=answers, flush=True)


class Zygote:
    """A fork of this process that imports the stack and forks ranks on request: a launch's ranks to completion
    (``launch``) or one process it returns at once (``popen``)."""

    def __init__(self, pid: int, requests: IO[str], answers: IO[str]):
        self.pid, self.requests, self.answers = pid, requests, answers

    @classmethod
    def start(cls) -> Zygote | None:
        """Fork it now; call only while this process has run no tensor op and started no thread. None where
        ranks are not forked: not Linux, a GPU machine (a CUDA or ROCm runtime that an import initialised
        before the fork fails in the child, and no GPU run has checked it), or ``FLOE_DIST_FORK=0``."""
        if (not sys.platform.startswith("linux") or any(os.path.exists(d) for d in GPU_DEVICES)
                or os.environ.get("FLOE_DIST_FORK") == "0"):
            return None
        to_zygote, from_zygote = os.pipe(), os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the zygote: it never returns into the caller's code
            status = 0
            try:
                from floe_dist.distributed.runtime import die_with_parent

                die_with_parent()
                os.close(to_zygote[1])
                os.close(from_zygote[0])
                import importlib

                for module in PRELOAD:
                    try:
                        importlib.import_module(module)
                    except ImportError:  # an optional package that is not installed: a rank that needs it says so
                        pass
                with os.fdopen(to_zygote[0]) as requests, os.fdopen(from_zygote[1], "w") as answers:
                    serve(requests, answers)
            except KeyboardInterrupt:  # Ctrl-C reaches the whole foreground group: the command reports it
                status = 130
            except BaseException:
                import traceback

                traceback.print_exc()
                status = 1
            os._exit(status)  # the zygote ends here: none of its parent's cleanup runs twice
        os.close(to_zygote[0])
        os.close(from_zygote[1])
        zygote = cls(pid, os.fdopen(to_zygote[1], "w"), os.fdopen(from_zygote[0]))
        _ZYGOTE[:] = [zygote]
        atexit.register(zygote.close)
        return zygote

    def close(self) -> None:
        """End the zygote (its requests end) and reap it."""
        for channel in (self.requests, self.answers):
            try:
                channel.close()
            except OSError:
                pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass

    def ask(self, request: dict) -> dict:
        try:
            self.requests.write(json.dumps(request) + "\n")
            self.requests.flush()
            line = self.answers.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise ChildProcessError(f"the process that forks this run's ranks (pid {self.pid}) died; rerun to "
                                    f"resume")
        return json.loads(line)

    def ready(self) -> bool:
        """Once it has imported the stack (PRELOAD): a launch's ranks then start at once."""
        return self.ask({"op": "ready"})["ready"]

    def launch(self, argv: list[str], env: dict[str, str], nproc: int, timeout: float | None = None) -> int | None:
        """``python ARGV`` on nproc local ranks, to completion: its status (None: past ``timeout``, killed)."""
        return self.ask(dict(argv=argv, env=dict(env), cwd=os.getcwd(), nproc=nproc, timeout=timeout))["returncode"]

    def popen(self, argv: list[str], env: dict[str, str], log: str) -> ForkedProcess:
        """``python ARGV`` as one process in a session of its own, output appended to ``log``, not waited for:
        what ``subprocess.Popen`` gives, for a search's workers."""
        pid = self.ask(dict(op="start", argv=argv, env=dict(env), cwd=os.getcwd(), stdout=log, stderr=log))["pid"]
        return ForkedProcess(self, pid)


class ForkedProcess:
    """A process the zygote started: the part of ``subprocess.Popen`` the search's runners use."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid, self.returncode = zygote, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.ask({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                import subprocess

                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode


def zygote() -> Zygote | None:
    """This process's zygote, if it started one."""
    return _ZYGOTE[0] if _ZYGOTE else None
