"""Layout-free checkpoints: resume a run on another number of ranks, ZeRO stage or expert-parallel size.

A DeepSpeed checkpoint is tied to the layout that wrote it (ZeRO partitions per rank, one expert shard
file per EP rank). Beside it, every checkpoint gets ``portable.pt`` (written by rank 0): each adapter
tensor in full, its AdamW moments in full, the optimizer's step, the lr scheduler's state and the
layout that wrote it. A run resumed on the *same* layout loads DeepSpeed's own checkpoint; on another
one, the full adapters go into the module before DeepSpeed partitions it (and before the experts are
split), then each rank puts its partition or expert shard of the moments into its optimizer. What
DeepSpeed's universal checkpoint does for model-parallel states, for the small adapter state only.

The data stream continues without repeating or skipping a sample only if the global batch (micro-batch
x accumulation x ranks) stays the same: step s reads stream positions [s*G, (s+1)*G) (floe_dist/data.py).
A resume that would change it is refused, with the micro-batch that keeps it on the new world size.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

MOMENTS = ("exp_avg", "exp_avg_sq")
FILE = "portable.pt"


@dataclass(frozen=True)
class SavedLayout:
    world_size: int
    ep_size: int
    zero_stage: int
    global_batch: int


def _inner(engine):
    """The torch optimizer that holds the states (ZeRO/bf16 wrappers keep it in ``.optimizer``)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _optimizer_step(optimizer) -> float:
    steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
    return max(steps) if steps else 0.0


def _full_moment(engine, param, key: str) -> torch.Tensor:
    """The whole moment of one parameter (collective under ZeRO-1/2/3: every rank calls it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    full = safe_get_full_optimizer_state(param, key)
    if full is None:  # ZeRO-0 in fp32: the torch optimizer steps the module parameters themselves
        state = _inner(engine).state.get(param, {})
        full = state[key] if key in state else torch.zeros_like(param)
    return full.detach().float().cpu().reshape(getattr(param, "ds_shape", param.shape))


def _expert_moments(experts) -> dict[str, torch.Tensor]:
    """Expert moments in the replicated layout (rows of A, columns of B), on global rank 0."""
    out = {}
    for name, shard in experts.shards.items():
        for kind, dim in (("lora_A", 0), ("lora_B", 1)):
            param = getattr(shard, kind)
            state = experts.optimizer.state.get(param, {})
            local = {k: (state[k] if k in state else torch.zeros_like(param)).detach().cpu() for k in MOMENTS}
            parts: list = [None] * experts.groups.ep_size
            dist.all_gather_object(parts, local, group=experts.groups.ep_group)
            for k in MOMENTS:
                out[f"{k}/{name}.{kind}"] = torch.cat([p[k] for p in parts], dim)
    return out


def save(tag_dir: Path, step: int, engine, experts, layout, global_batch: int,
         weights: dict[str, torch.Tensor]) -> None:
    """Write ``tag_dir/portable.pt`` (rank 0). Collective: every rank calls it, with ``weights`` the full
    adapter tensors on rank 0 (``gather_full`` plus the experts' ``gather_full``)."""
    named = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    moments = {f"{k}/{n}": _full_moment(engine, p, k) for k in MOMENTS for n, p in named.items()}
    if experts:
        moments.update(_expert_moments(experts))
    if layout.rank != 0:
        return
    saved = SavedLayout(layout.world_size, layout.ep_size, layout.zero_stage, global_batch)
    state = {"step": step, "layout": asdict(saved), "weights": {n.removeprefix("lm."): w for n, w in weights.items()},
             "moments": {k.replace("/lm.", "/"): v for k, v in moments.items()},
             "optimizer_step": _optimizer_step(_inner(engine)),
             "expert_optimizer_step": _optimizer_step(experts.optimizer) if experts else None,
             "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None}
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, tag_dir / f".{FILE}.tmp")
    (tag_dir / f".{FILE}.tmp").replace(tag_dir / FILE)


def read(tag_dir: Path) -> dict | None:
    path = tag_dir / FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def check_global_batch(state: dict, global_batch: int, world_size: int, accumulation: int) -> None:
    saved = state["layout"]["global_batch"]
    if saved != global_batch:
        fits = saved % (world_size * accumulation) == 0
        hint = (f"--micro-batch {saved // (world_size * accumulation)} keeps it on {world_size} rank(s)" if fits
                else f"no micro-batch keeps it with --accumulation {accumulation} on {world_size} rank(s)")
        raise ValueError(f"the checkpoint was trained with a global batch of {saved} examples a step and this run "
                         f"would take {global_batch}: the data stream would repeat or skip samples; {hint}")


def load_weights(model: torch.nn.Module, state: dict) -> None:
    """The full adapter tensors into the (not yet partitioned, not yet split) model."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state["weights"]))
    if missing:
        raise ValueError(f"the portable checkpoint lacks {missing[:3]}: it was written for another allocation")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["weights"][name].to(p.device, p.dtype))


def _step_tensor(step: float, group: dict, param: torch.Tensor) -> torch.Tensor:
    on_device = group.get("fused") or group.get("capturable")  # torch keeps the step beside the parameter then
    return torch.tensor(float(step), dtype=torch.float32, device=param.device if on_device else "cpu")


def load_optimizer(engine, experts, state: dict) -> None:
    """Each rank's partition (or expert shard) of the moments, the step count and the lr schedule."""
    from deepspeed.utils import safe_set_full_optimizer_state

    inner, step = _inner(engine), state["optimizer_step"]
    held = [(q, group) for group in inner.param_groups for q in group["params"]]
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 hands these to torch per step
    if flat:
        held += [(q, inner.param_groups[engine.optimizer.sub_group_to_group_id[i]]) for i, q in enumerate(flat)]
    for q, group in held:  # torch's AdamW makes its state at the first step: make it now
        s = inner.state[q]
        for k in MOMENTS:
            s.setdefault(k, torch.zeros_like(q, memory_format=torch.preserve_format))
        s["step"] = _step_tensor(step, group, q)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        for k in MOMENTS:
            value = state["moments"][f"{k}/{name.removeprefix('lm.')}"].to(p.device)
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO-1/2/3, bf16: this rank's partition
                safe_set_full_optimizer_state(p, value.flatten() if hasattr(p, "ds_id") else value, k)
            else:  # ZeRO-0 in fp32: the torch optimizer steps the module parameters themselves
                inner.state[p][k].copy_(value.reshape(p.shape))
    if experts:
        _load_expert_optimizer(experts, state)
    if engine.lr_scheduler and state["lr_scheduler"]:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for group, lr in zip(inner.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr  # the schedule's state alone leaves the optimizer at the rate it was built with


def _load_expert_optimizer(experts, state: dict) -> None:
    step = state["expert_optimizer_step"] or state["optimizer_step"]
    for name, shard in experts.shards.items():
        for kind in ("lora_A", "lora_B"):
            param = getattr(shard, kind)
            full = {k: state["moments"][f"{k}/{name.removeprefix('lm.')}.{kind}"] for k in MOMENTS}
            local = {k: (v[shard.cols] if kind == "lora_A" else v[:, shard.cols]).to(param.device).clone()
                     for k, v in full.items()}
            group = experts.optimizer.param_groups[0]
            experts.optimizer.state[param] = {"step": _step_tensor(step, group, param), **local}
