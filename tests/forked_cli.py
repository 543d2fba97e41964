"""Single-process ``floe-dist`` runs for the tests, forked from a process that has already imported the stack.

A fresh ``python -m launcher.cli`` spends 10-15 s of a 2-core machine importing torch, transformers, DeepSpeed,
PEFT and SMAC before a tiny run's one second of work; that was most of the suite's time. One server per test
process imports them once (``python -m tests.forked_cli``) and forks a child per run. The child is the CLI
process a test would have started: ``launcher.cli`` run as ``__main__`` (runpy, as ``-m`` does) with the run's
argv, working directory, environment and thread count, stdout and stderr in files, stdin empty, and a normal
interpreter exit (atexit handlers, exit status): floe_dist/distributed/forked_ranks.py, which also forks a
campaign's stages. The server never runs a tensor op or starts a thread, so there is nothing a fork could copy
half-way (no OpenMP pool, no process group).

Variables that libraries read when they are imported (``HF_HUB_OFFLINE``, ``PYTHONHASHSEED``, ...) cannot change
in a child of an imported process, so a run whose environment differs from the server's anywhere but in
``RUNTIME_VARS`` gets a fresh interpreter instead, as does a run issued while another is in flight.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from floe_dist.distributed import forked_ranks

PRELOAD = (*forked_ranks.PRELOAD, "deepspeed.runtime.zero.muon.muon_optimizer", "smac", "ConfigSpace", "matplotlib",
           "floe_dist.stages.search", "floe_dist.stages.generate", "floe_dist.stages.allocate")
# read when a run needs them, never at import: by floe-dist and the tests' emulations (FLOE_, TOY_), pytest, the
# Slurm commands of the test cluster (SLURM_CONF, set once that cluster is up), torch (its compiler exports
# its cache folder in the test process once something compiled there) and W&B (read by ``wandb.init``; the server
# never imports wandb): these may differ
RUNTIME_VARS = ("TOY_", "FLOE_", "PYTEST_", "SLURM_", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
                "TORCHINDUCTOR_CACHE_DIR", "PYTORCH_NVML_BASED_CUDA_CHECK", "WANDB_")


def serve() -> None:
    """Import the stack, then fork each request's ranks (floe_dist/distributed/forked_ranks.py); answer with the
    run's exit status."""
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what imports print goes to stderr and cannot corrupt the answers
    for module in PRELOAD:
        importlib.import_module(module)
    if "wandb" in sys.modules:  # its variables would then be fixed at import, not runtime (RUNTIME_VARS)
        raise RuntimeError("the forked-CLI server imported wandb: take WANDB_ out of RUNTIME_VARS")
    print(json.dumps({"ready": os.getpid()}), file=channel, flush=True)
    forked_ranks.serve(sys.stdin, channel)


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
