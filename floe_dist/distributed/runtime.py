"""Process-group setup for every way floe-dist is started.

* ``deepspeed --num_gpus N ...`` and ``torchrun --nproc_per_node N ...`` set RANK / WORLD_SIZE /
  LOCAL_RANK / MASTER_ADDR / MASTER_PORT; Slurm's ``srun`` sets SLURM_PROCID / SLURM_NTASKS, and the
  sbatch scripts (slurm/) set MASTER_ADDR/PORT.
* ``mpirun``/``mpiexec``: Open MPI (OMPI_COMM_WORLD_*) and MPICH/Intel MPI (PMI_*) variables give the
  layout; other MPIs (PMIx, MVAPICH, Cray PALS) get it from mpi4py. When the environment names no
  MASTER_ADDR/PORT, rank 0 broadcasts its host and a free port over MPI (mpi4py). mpi4py is imported
  (and MPI initialised) only in those two cases, so srun and deepspeed launches never touch MPI.
* A plain ``python -m launcher.cli train`` sets nothing: it becomes a world of one, on a free port
  (without this DeepSpeed falls back to MPI discovery and fails on a missing mpi4py).

The backend follows the hardware: NCCL when CUDA is present, gloo on CPU.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(bind: str = "127.0.0.1") -> int:
    """A port free now on ``bind`` ("" = every interface, for a port other hosts connect to)."""
    with socket.socket() as s:
        s.bind((bind, 0))
        return s.getsockname()[1]


def discover() -> DistInfo:
    """Rank layout from the launcher's environment: torchrun/deepspeed, Open MPI, MPICH, Slurm, other MPIs
    (through mpi4py), else a world of one."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
    elif "OMPI_COMM_WORLD_RANK" in env:  # mpirun (Open MPI), e.g. deepspeed --launcher openmpi
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1))
    elif "PMI_RANK" in env and "PMI_SIZE" in env:  # mpirun (MPICH / Intel MPI), deepspeed --launcher mpich
        rank, world = int(env["PMI_RANK"]), int(env["PMI_SIZE"])
        local = int(env.get("MPI_LOCALRANKID", env.get("PALS_LOCAL_RANKID", 0)))
        local_world = int(env.get("MPI_LOCALNRANKS", env.get("PALS_LOCAL_SIZE", 1)))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0].split(",")[0])
    elif mpi_launched() and (layout := mpi_layout()):  # an MPI whose variables are not read above
        rank, world, local, local_world = layout
    else:
        rank, world, local, local_world = 0, 1, 0, 1
    return DistInfo(rank, world, local, local_world)


MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "PALS_RANKID")


def mpi_launched() -> bool:
    """Started by mpirun/mpiexec (Open MPI, MPICH/Intel MPI, PMIx, MVAPICH, Cray PALS)."""
    return any(marker in os.environ for marker in MPI_MARKERS)


def mpi4py_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


def mpi_layout() -> tuple[int, int, int, int] | None:
    """(rank, world, local rank, ranks on this node) from MPI_COMM_WORLD and its shared-memory split;
    None without mpi4py."""
    if not mpi4py_available():
        return None
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def mpi_rendezvous(world_size: int) -> tuple[str, int] | None:
    """Rank 0's host name and a free port on it, broadcast over MPI: mpirun starts the ranks but gives
    them no address for torch.distributed's TCP store. None without mpi4py."""
    if not mpi4py_available():
        return None
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() != world_size:
        raise RuntimeError(
            f"mpi4py ({MPI.Get_library_version().splitlines()[0]}) sees {world.Get_size()} rank(s) but the "
            f"launcher started {world_size}: it runs on another MPI than this mpirun (with several installed, "
            f"set MPI4PY_MPIABI=openmpi or mpich), or export MASTER_ADDR/MASTER_PORT")
    mine = (socket.gethostname(), free_port(bind="")) if world.Get_rank() == 0 else None
    return world.bcast(mine, root=0)


def die_with_parent() -> None:
    """This process gets SIGTERM when the process that started it dies (Linux PR_SET_PDEATHSIG; elsewhere a no-op).

    torchrun and the deepspeed launcher start their ranks in sessions of their own, so ``kill -9`` of a job's
    process group (what a user or a local scheduler does) killed the launcher and left the ranks training on,
    unseen: a rerun to resume then raced them on the same checkpoints and metrics (measured: a resumed run's
    metrics.jsonl held 53 lines for 40 steps). Ranks of those launchers, a campaign's stages and search trials
    call it; under Slurm or MPI the job's processes die together anyway.
    """
    try:  # also runs between fork and exec (preexec_fn): nothing to import here
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent); returns this process's place."""
    import deepspeed
    import torch.distributed as dist

    # torch 2.13 warns on every ZeRO-3 step that all_gather_into_tensor/reduce_scatter_tensor are
    # deprecated (DeepSpeed still calls them): one line per step drowns the progress bar.
    warnings.filterwarnings("ignore", message=r".*_tensor` is deprecated", category=FutureWarning)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun's or deepspeed's rank
        die_with_parent()
    info = discover()
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
    if "MASTER_PORT" not in os.environ and info.world_size > 1 and mpi_launched():
        if found := mpi_rendezvous(info.world_size):
            os.environ.setdefault("MASTER_ADDR", found[0])
            os.environ["MASTER_PORT"] = str(found[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if info.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process run: start with deepspeed, "
                               "torchrun, srun (see slurm/) or mpirun with mpi4py installed, or export "
                               "MASTER_ADDR/MASTER_PORT")
        os.environ["MASTER_PORT"] = str(free_port())
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if info.local_rank >= gpus:  # set_device would fail, and NCCL does not share a GPU between ranks
            raise RuntimeError(f"local rank {info.local_rank} needs GPU {info.local_rank}, but this node has {gpus} "
                               f"GPU(s): start at most {gpus} process(es) per node (--nproc_per_node, --num_gpus, "
                               f"--gpus-per-node) or set CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(info.local_rank)
    else:
        # The shared-memory comm op is a 70-90 s JIT build on every fresh machine; plain gloo is enough.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # The deepspeed launcher does not set OMP_NUM_THREADS: split the cores between local ranks.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False)
    return info


def device_for(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


@contextmanager
def main_rank_first():
    """Rank 0 runs the block before the others do (they then reuse what it cached), as Hugging Face's
    ``main_process_first``; a world of one just runs it."""
    import torch.distributed as dist

    together = dist.is_initialized() and dist.get_world_size() > 1
    if together and dist.get_rank() != 0:
        dist.barrier()
    yield
    if together and dist.get_rank() == 0:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (no-op in a world of one)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def shutdown() -> None:
    """Destroy the process group and DeepSpeed's groups cached from it, so that a later run in the same
    process (tests, notebooks) starts clean instead of using groups of a dead process group."""
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if "deepspeed.utils.groups" not in sys.modules:
        return  # DeepSpeed was never used here: nothing cached (and no import of it just to clear)
    from deepspeed.utils import groups

    groups._WORLD_GROUP = groups._DATA_PARALLEL_GROUP = groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    for cache in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
                  groups._ALL_TO_ALL_GROUP):
        cache.clear()
