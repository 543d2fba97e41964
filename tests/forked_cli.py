"""Single-process ``floe-dist`` runs for the tests, forked from a process that has already imported the stack.

A fresh ``python -m launcher.cli`` spends 10-15 s of a 2-core machine importing torch, transformers, DeepSpeed,
PEFT and SMAC before a tiny run's one second of work; that was most of the suite's time. One server per test
process imports them once (``python -m tests.forked_cli``) and forks a child per run. The child is the CLI
process a test would have started: ``launcher.cli`` run as ``__main__`` (runpy, as ``-m`` does) with the run's
argv, working directory, environment and thread count, stdout and stderr in files, stdin empty, and a normal
interpreter exit (atexit handlers, exit status). The server never runs a tensor op or starts a thread, so there
is nothing a fork could copy half-way (no OpenMP pool, no process group).

Variables that libraries read when they are imported (``HF_HUB_OFFLINE``, ``PYTHONHASHSEED``, ...) cannot change
in a child of an imported process, so a run whose environment differs from the server's anywhere but in
``RUNTIME_VARS`` gets a fresh interpreter instead, as does a run issued while another is in flight.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

PRELOAD = ("torch", "numpy", "transformers", "transformers.models.llama.modeling_llama", "tokenizers", "deepspeed",
           "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.muon.muon_optimizer", "peft", "datasets",
           "safetensors.torch", "torch.utils.tensorboard", "smac", "ConfigSpace", "matplotlib", "launcher.cli",
           "floe_dist.stages.train", "floe_dist.stages.score", "floe_dist.stages.search",
           "floe_dist.stages.evaluate", "floe_dist.stages.generate", "floe_dist.stages.allocate")
# read when a run needs them, never at import: by floe-dist and the tests' emulations (FLOE_, TOY_), pytest, the
# Slurm commands of the test cluster (SLURM_CONF, set once that cluster is up), torch (its compiler exports
# its cache folder in the test process once something compiled there) and W&B (read by ``wandb.init``; the server
# never imports wandb): these may differ
RUNTIME_VARS = ("TOY_", "FLOE_", "PYTEST_", "SLURM_", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
                "TORCHINDUCTOR_CACHE_DIR", "PYTORCH_NVML_BASED_CUDA_CHECK", "WANDB_")


def _run_child(request: dict, rank_env: dict[str, str]) -> None:
    """In the forked child: become ``python ARGV`` (``-m MODULE ...`` or ``SCRIPT ...``) and exit as it would.
    Never returns."""
    import random
    import runpy

    import numpy as np
    import torch

    code: object = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_APPEND), 1)
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_APPEND), 2)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({**request["env"], **rank_env})
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        random.seed()  # a fresh process draws fresh seeds; a fork would repeat the server's
        np.random.seed()
        argv = request["argv"]
        if argv[0] == "-m":  # python -m MODULE ARGS
            sys.argv = [argv[1], *argv[2:]]
            # runpy warns that the module was imported before (by PRELOAD): as intended, nothing more
            warnings.filterwarnings("ignore", f"'{argv[1]}' found in sys.modules", RuntimeWarning)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
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
    raise SystemExit(code)


def _rank_envs(nproc: int) -> list[dict[str, str]]:
    """What torchrun gives each of nproc local ranks (its rendezvous store then lives on rank 0)."""
    if nproc == 1:
        return [{}]
    from floe_dist.distributed.runtime import free_port

    world = dict(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))
    return [dict(world, RANK=str(r), LOCAL_RANK=str(r), ROLE_RANK=str(r)) for r in range(nproc)]


def _wait(pids: list[int], timeout: float) -> int | None:
    """Every rank's end; when one fails the others are stopped and the status is 1, as under torchrun.
    None: the time ran out (every rank killed)."""
    deadline, codes = time.monotonic() + timeout, {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(raw)
        failed = any(c != 0 for c in codes.values())
        if failed or time.monotonic() > deadline:
            for pid in set(pids) - set(codes):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            if not failed:
                return None
            return next(iter(codes.values())) if len(pids) == 1 else 1
        time.sleep(0.02)
    return 0 if all(c == 0 for c in codes.values()) else 1


def serve() -> None:
    """Import the stack, then fork each request's ranks; answer with the run's exit status."""
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what imports print goes to stderr and cannot corrupt the answers
    for module in PRELOAD:
        importlib.import_module(module)
    if "wandb" in sys.modules:  # its variables would then be fixed at import, not runtime (RUNTIME_VARS)
        raise RuntimeError("the forked-CLI server imported wandb: take WANDB_ out of RUNTIME_VARS")
    print(json.dumps({"ready": os.getpid()}), file=channel, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pids = []
        for rank_env in _rank_envs(request["nproc"]):
            pid = os.fork()
            if pid == 0:
                channel.close()
                _run_child(request, rank_env)
            pids.append(pid)
        print(json.dumps({"returncode": _wait(pids, request["timeout"])}), file=channel, flush=True)


class ForkedCli:
    """The client: one server per test process, started on first use with that moment's environment."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.env = dict(env)
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.forked_cli"], cwd=cwd, env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the forked-CLI server did not start")

    def serves(self, env: dict[str, str]) -> bool:
        keys = set(env) | set(self.env)
        changed = {k for k in keys if env.get(k) != self.env.get(k)}
        return self.proc.poll() is None and all(k.startswith(RUNTIME_VARS) for k in changed)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def run(self, argv: list[str], env: dict[str, str], cwd: Path, timeout: float,
            nproc: int = 1) -> subprocess.CompletedProcess:
        """``python ARGV`` on nproc ranks, to completion, as ``subprocess.run(..., capture_output=True)`` gives."""
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch(), err.touch()
            request = dict(argv=argv, env=env, cwd=str(cwd), stdout=str(out), stderr=str(err), timeout=timeout,
                           nproc=nproc)
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the forked-CLI server died (status {self.proc.wait()})")
            answer = json.loads(line)
            stdout, stderr = (p.read_text(errors="replace") for p in (out, err))
        command = [sys.executable, *argv]  # what it stands for (nproc forked ranks)
        if answer["returncode"] is None:
            raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(command, answer["returncode"], stdout, stderr)


if __name__ == "__main__":
    serve()
