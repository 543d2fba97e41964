"""The one answer to layout questions: the world, this rank, expert parallelism, ZeRO stage, device, dtype.

``train`` and ``score`` build it from the launcher's environment and the DeepSpeed config
(``Layout.current``), ``plan`` from nodes x GPUs (``Layout.planned``); both check an allocation
against it with the same rules, so a layout the planner accepts is one training accepts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from floe_dist.allocation import Allocation, AllocationError
from floe_dist.distributed.runtime import device_for, discover, init_distributed


@dataclass(frozen=True)
class Layout:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    ep_size: int = 1  # ranks that split every MoE module's experts between them
    zero_stage: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def current(cls, ep_size: int = 1, ds_config: dict[str, Any] | None = None, *, init: bool = True) -> Layout:
        """This process's layout (initialising the process group first when ``init``)."""
        from floe_dist.modeling.backbone import compute_dtype

        info = init_distributed() if init else discover()
        return cls(info.world_size, info.rank, info.local_rank, info.local_world_size, ep_size,
                   zero_stage(ds_config or {}), str(device_for(info)), str(compute_dtype()).removeprefix("torch."))

    @classmethod
    def planned(cls, nodes: int, gpus_per_node: int, ep_size: int = 1, zero: int = 3) -> Layout:
        """A layout that does not exist yet (``floe-dist plan``): rank 0 of nodes x GPUs."""
        return cls(nodes * gpus_per_node, 0, 0, gpus_per_node, ep_size, zero, "cuda:0", "bfloat16")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def edp_size(self) -> int:
        """Expert-data-parallel size: ranks that hold the same experts."""
        return self.world_size // self.ep_size

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def problems(self, allocation: Allocation | None = None) -> list[str]:
        """Every reason this layout cannot train ``allocation`` (or any allocation, if None)."""
        if self.ep_size == 1:
            return []
        problems = []
        if self.ep_size < 1 or self.world_size % self.ep_size:
            problems.append(f"--ep-size {self.ep_size} must divide the world size {self.world_size}")
        if self.zero_stage != 3:
            problems.append(f"expert parallelism runs beside ZeRO-3; the DeepSpeed config has stage {self.zero_stage}")
        if allocation is not None:
            problems += expert_split_problems(allocation, self.ep_size)
        return problems

    def check(self, allocation: Allocation | None = None) -> None:
        problems = self.problems(allocation)
        if problems:
            raise AllocationError("impossible expert-parallel layout:\n  - " + "\n  - ".join(problems))


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def expert_split_problems(allocation: Allocation, ep_size: int) -> list[str]:
    problems, sharded = [], 0
    for layer, mods in sorted(allocation.layers.items()):
        for name, m in mods.items():
            if m.experts == 1:
                continue  # plain LoRA: replicated like any other adapter
            if m.router != "topk":
                problems.append(f"layer {layer} {name}: the dense (HydraLoRA) router shares one A across "
                                f"experts and cannot be split; use the topk router")
            elif ep_size >= 1 and m.experts % ep_size:
                problems.append(f"layer {layer} {name}: {m.experts} experts do not split over --ep-size {ep_size}")
            sharded += 1
    if not sharded:
        problems.append("the allocation has no module with more than one expert: nothing to split")
    return problems
