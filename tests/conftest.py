"""Shared fixtures: the model cache, a CLI runner for 1..N local ranks, process-group teardown."""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLOE_DIST_CACHE", str(REPO / ".cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one torch.compile cache for every test process: the compiled router's kernels are built once a session (a cold
# build is about 16 s of CPU per process), not once per run; train.json's "router" says which router ran
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(os.environ["FLOE_DIST_CACHE"]) / "inductor"))
# Tests run tiny models and toys, whose small kernels are slower on 2 threads than on 1 (the Flexora toy
# search took 10 s on 1 thread and 27 s on 2, measured once beside another job); 2-rank runs take a core each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/gpu); deselected, not skipped, without one")


def pytest_sessionstart(session):
    """Build the tiny model's cache folder once, here, before xdist starts its workers: a fresh CI clone's
    first tests otherwise build it from several processes at once (the CI run of 2026-11-30 saw a rank read it
    without its config.json then; not reproduced here, so the build is taken out of the tests' way)."""
    if not hasattr(session.config, "workerinput"):
        from floe_dist.modeling.backbone import resolve_model

        resolve_model("tiny")
        _SESSION_ENV.update(os.environ)  # building it imports libraries that set variables (mlflow's telemetry id)


def pytest_collection_finish(session):
    """Importing the test modules must leave the environment as it was: the forked-CLI server has this process's
    environment at start-up, and a run whose environment differs goes to a fresh interpreter (tests/forked_cli.py),
    so one import that sets a variable would make every later CLI run of the process slow."""
    from tests.forked_cli import RUNTIME_VARS  # these may differ

    changed = sorted(k for k in {*os.environ, *_SESSION_ENV}
                     if os.environ.get(k) != _SESSION_ENV.get(k) and not k.startswith(RUNTIME_VARS))
    if changed:
        raise pytest.UsageError(f"importing the test modules changed the environment ({', '.join(changed)}): "
                                f"import what sets them inside the tests")


# Tests that share one local Slurm, one sshd and Debian packages installed on first use: one xdist worker.
CLUSTER_FILES = ("test_cluster_ops.py", "test_runners_slurm.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the group marks into scheduling scopes
def pytest_collection_modifyitems(config, items):
    """Each test file runs on one xdist worker (its module fixtures are built once), the cluster files on
    the same one; GPU tests run wherever CUDA is present (`pytest -m gpu` on a GPU node) and are left
    out elsewhere."""
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("cluster" if name in CLUSTER_FILES else item.nodeid.split("::")[0]))
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def recipe_for(stage: str, **settings):
    """The Recipe that ``floe-dist STAGE --name value ...`` parses: short names are the stage's aliases
    (launcher/cli.py), dotted ones (``allocate__flexora__steps``) spell the key with ``__``; the rest is the default
    recipe."""
    import importlib

    from floe_dist.recipe import Recipe, from_dict
    from launcher.cli import RECIPE_COMMANDS, aliases

    table = aliases(importlib.import_module(RECIPE_COMMANDS[stage][0]).SECTIONS)
    data: dict = {}
    for name, value in settings.items():
        key = table.get(name, name.replace("__", "."))
        node = data
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.rsplit(".", 1)[-1]] = value
    return from_dict(Recipe, data)


def python_command(argv: list[str], nproc: int = 1) -> list[str]:
    """`python ARGV` as one process, or under torchrun with nproc local ranks on a free port."""
    if nproc == 1:
        return [sys.executable, *argv]
    from floe_dist.distributed.runtime import free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", *argv]


def floe_command(args: list[str], nproc: int = 1) -> list[str]:
    """`floe-dist ARGS` as one process, or under torchrun with nproc local ranks on a free port."""
    return python_command(["-m", "launcher.cli", *args], nproc)


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(nproc: int) -> dict[str, str]:
    """This process's environment without launcher variables (a child starts its own world)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1" if nproc > 1 else os.environ["OMP_NUM_THREADS"]
    return env


_FORKED: list = []  # this test process's forked-CLI server (tests/forked_cli.py), started on first use
_SESSION_ENV = dict(os.environ)  # the server's environment: not that of whichever test starts it


def _forked_cli(env: dict[str, str]):
    """The server that forks runs, when it can run this one (FLOE_TEST_FRESH=1: never; FLOE_TEST_FORK_LOG=FILE:
    a line per run, forked or fresh, with the variables that differ from the server's)."""
    if os.environ.get("FLOE_TEST_FRESH") == "1":
        return None
    if not _FORKED:
        from tests.forked_cli import ForkedCli

        server_env = {k: v for k, v in _SESSION_ENV.items() if k not in LAUNCHER_VARS}
        _FORKED.append(ForkedCli(server_env, REPO))
        atexit.register(_FORKED[0].close)
    server = _FORKED[0]
    usable = server.serves(env) and not server.lock.locked()
    if os.environ.get("FLOE_TEST_FORK_LOG"):
        changed = sorted(k for k in set(env) | set(server.env) if env.get(k) != server.env.get(k))
        with open(os.environ["FLOE_TEST_FORK_LOG"], "a") as log:
            log.write(f"{os.getpid()} {'forked' if usable else 'fresh'} {changed}\n")
    return server if usable else None


def run_python(argv: list[str], nproc: int = 1, timeout: int = 600, env: dict[str, str] | None = None,
               torchrun: bool = False) -> subprocess.CompletedProcess:
    """`python ARGV` to completion on nproc local ranks with torchrun's environment, forked from a server that has
    the stack imported when the environment allows (tests/forked_cli.py); else, or with ``torchrun=True``, one
    fresh process or torchrun itself."""
    env = {**clean_env(nproc), **(env or {})}
    server = None if torchrun else _forked_cli(env)
    if server is not None:
        return server.run(argv, env, REPO, timeout, nproc)
    return subprocess.run(python_command(argv, nproc), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_floe(args: list[str], nproc: int = 1, check: bool = True, timeout: int = 600,
             env: dict[str, str] | None = None, torchrun: bool = False) -> subprocess.CompletedProcess:
    """`floe-dist ARGS` (see ``run_python``); a failure raises with its stderr unless ``check=False``."""
    proc = run_python(["-m", "launcher.cli", *args], nproc, timeout, env, torchrun)
    if check and proc.returncode != 0:
        raise AssertionError(f"floe-dist {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_here(args: list[str]) -> subprocess.CompletedProcess:
    """`floe-dist ARGS` in this test process, for runs that only parse, print or refuse (help, --print_config, bad
    input): no process to start, so a dozen refusals take a second instead of a minute. Returns what
    ``run_floe(..., check=False)`` would."""
    import contextlib
    import io

    from launcher.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return subprocess.CompletedProcess(["floe-dist", *args], code, out.getvalue(), err.getvalue())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_resumes_exactly(recipe: Path, tmp_path: Path) -> Path:
    """Train ``recipe`` (checkpoint_every 3) for 6 steps, and again from a copy as a crash after step 5 would leave
    it (its step-3 checkpoint last): the resumed run must log the same losses. Returns the whole run's folder."""
    import shutil

    import pytest

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_floe(["train", "--config", str(recipe), "--steps", "6", "--output", str(whole)])
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_6")
    (resumed / "checkpoints" / "latest").write_text("step_3")
    shutil.rmtree(resumed / "adapter")
    proc = run_floe(["train", "--config", str(recipe), "--steps", "6", "--output", str(resumed)])
    assert "at step 3" in proc.stdout
    assert [m["loss"] for m in read_metrics(resumed)] == pytest.approx([m["loss"] for m in read_metrics(whole)],
                                                                       rel=1e-6)
    return whole


@pytest.fixture(autouse=True)
def _teardown_process_group():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)  # init_distributed exports RANK/MASTER_PORT/... for in-process runs
    from floe_dist.distributed.runtime import shutdown

    shutdown()  # the process group and DeepSpeed's groups cached from it
    torch.set_default_dtype(torch.float32)


# A 2-rank ZeRO-3 run that checkpoints every 5 steps with dropout on (its RNG must resume too): the
# kill -9 test (test_train.py) and the Slurm requeue test (test_cluster_ops.py) interrupt it once step 6 is
# logged (a checkpoint at 5 behind it, 18 steps before its end).
RESUMABLE_RUN = ["--model", "tiny", "--steps", "24", "--micro-batch", "2", "--zero", "3", "--checkpoint-every", "5",
                 "--experts", "2", "--router", "topk", "--top-k", "1", "--rank", "4", "--targets", "q_proj,v_proj,up_proj",
                 "--dropout", "0.1"]


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_floe(["train", *RESUMABLE_RUN, "--output", str(out)], nproc=2)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from floe_dist.modeling.backbone import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """One local 2-node Slurm for every test that needs it (started once, torn down at the end)."""
    from tests.slurm_cluster import LocalSlurm

    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
