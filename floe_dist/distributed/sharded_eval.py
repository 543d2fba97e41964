"""Evaluation and generation on the job's ranks (``floe-dist evaluate``/``generate`` with several ranks).

Each rank takes every world-th example (``Ranks.share``) and the results are gathered back in example order, so the
answers are one process's. How the backbone is held follows the training layout:

* ``parallel.zero`` 3: partitioned over the ranks as training partitions it, so no rank holds it whole and a
  backbone that fits no single device is still evaluated. Every forward gathers a layer's weights from all
  ranks, so all ranks must run the same number of forwards: ``Ranks.chunks`` has a rank whose share is done run a
  one-token dummy forward until every rank is done, and generation passes transformers' ``synced_gpus`` so that
  the token steps match too. A prompt shared across choices runs twice per batch (prompt, then choices), so the
  choices are scored pair by pair here.
* otherwise every rank holds the whole backbone and scores its share: data-parallel evaluation.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Ranks:
    world: int = 1
    rank: int = 0
    partitioned: bool = False  # ZeRO-3: forwards are collective, kept in step by ``chunks``

    def share(self, items: list) -> list:
        return items[self.rank::self.world]

    def gather(self, mine: list) -> list:
        """Every rank's ``share`` results, back in the order of the items they came from."""
        if self.world == 1:
            return mine
        import torch.distributed as dist

        shares: list = [None] * self.world
        dist.all_gather_object(shares, mine)
        return [x for group in itertools.zip_longest(*shares, fillvalue=_NONE) for x in group if x is not _NONE]

    def total(self, *values: float) -> list[float]:
        """Sums over these ranks (a world of one: the values, whatever process group this process is in)."""
        from floe_dist.distributed.runtime import all_reduce_sum

        if self.world == 1:
            return list(values)
        return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def chunks(self, items: list, size: int, dummy: Callable[[], object]) -> Iterator[list]:
        """``items`` in chunks of ``size``; partitioned, every rank takes as many steps as the busiest one,
        calling ``dummy`` (one small forward) for each step it has no chunk for."""
        for start in range(0, len(items), size):
            self.step()
            yield items[start:start + size]
        self.drain(dummy)

    def step(self) -> None:
        """Partitioned: before each forward, tell the other ranks this one has work (``drain`` counts on it)."""
        if self.partitioned:
            self._busiest(1)

    def drain(self, dummy: Callable[[], object]) -> None:
        """Partitioned: once this rank's forwards are done, run ``dummy`` in step with each forward another rank
        still announces (``step``), until no rank has work left."""
        while self.partitioned and self._busiest(0):
            dummy()

    def _busiest(self, busy: int) -> int:
        import torch.distributed as dist

        flag = torch.tensor([busy], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Ranks()
_NONE = object()  # what a shorter share lacks


def backbone_on_ranks(recipe, model_dir: Path):
    """The backbone (and ``model.adapter``) laid out for evaluation on this job's ranks, and the ``Ranks``:
    ZeRO-3-partitioned under ``parallel.zero`` 3, whole on every rank otherwise."""
    import deepspeed

    from floe_dist.distributed import engine as ds
    from floe_dist.distributed.layout import Layout
    from floe_dist.distributed.sharded_load import load_for_layout
    from floe_dist.modeling.export import load_adapter

    config = ds.build_config(recipe.parallel.zero, micro_batch=1, accumulation=1,
                             world_size=Layout.current().world_size, lr=0.0, weight_decay=0.0)
    layout = Layout.current(1, config)
    lm = load_for_layout(Path(model_dir), recipe.model.quant, layout, config)
    lm.set_attn_implementation(recipe.model.attn_implementation)
    if recipe.model.adapter:
        load_adapter(lm, recipe.model.adapter)
    lm.requires_grad_(False)
    partitioned = layout.zero_stage == 3
    if partitioned:  # no optimizer: DeepSpeed then sets up ZeRO-3's parameter gathering alone (inference)
        config = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
        deepspeed.initialize(model=lm, config=config)
    return lm, Ranks(layout.world_size, layout.rank, partitioned), layout.torch_device


def held_bytes(lm) -> int:
    """Bytes of model parameters this rank holds between forwards (its partition under ZeRO-3)."""
    return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in lm.parameters())


def full_bytes(lm) -> int:
    """Bytes of the whole model's parameters."""
    return sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size() for p in lm.parameters())
