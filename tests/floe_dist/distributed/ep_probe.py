"""Run under torchrun: a LoRA-MoE layer replicated vs split over expert-parallel ranks.

    torchrun --nproc_per_node N tests/floe_dist/distributed/ep_probe.py EP_SIZE OUT.json

Same weights and inputs in both layouts; writes the largest relative differences of the output, the input
gradient, the router gradient and the (rank-averaged) expert gradients, per scenario, plus how many
picks each rank's experts received.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

RANKS = [2, 3, 2, 1, 2, 2, 1, 3]  # heterogeneous expert ranks (GuiLoMo/HILO allocations have them)
SCENARIOS = {
    "routed": {"silenced": [], "capacity": 0.0},
    "idle_expert": {"silenced": [1], "capacity": 0.0},  # expert 1 gets no token on any rank
    "idle_rank": {"silenced": [4, 5, 6, 7], "capacity": 0.0},  # the last EP rank owns only silenced experts
    "capacity": {"silenced": [], "capacity": 0.75},  # some picks dropped
    "top_p": {"silenced": [], "capacity": 0.75, "top_p": 0.3},  # HILO: 1 or 2 experts a token, then capacity
}


def build(silenced: list[int], capacity: float, top_p: float = 0.0):
    from floe_dist.distributed.runtime import all_reduce_sum
    from floe_dist.modeling.lora_moe import LoRAMoELinear

    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(16, 12), RANKS, top_k=2, top_p=top_p)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B)  # B = 0 at init would hide gradient errors in A
        if top_p:
            layer.lora_router.weight.mul_(8.0)  # confident routing: some tokens use one expert only
        layer.lora_router.weight[silenced] = -5.0  # inputs are positive: these experts never win
    layer.capacity_factor = capacity
    layer.routing_stats_reducer = all_reduce_sum
    return nn.ModuleDict({"layer": layer})


def run(model: nn.ModuleDict, rank: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(100 + rank)
    x = (torch.rand(3 + rank, 5, 16) + 0.05).requires_grad_()  # ranks hold different token counts
    out = model["layer"](x)
    loss = out.pow(2).mean() + 0.1 * model["layer"].balance_loss
    loss.backward()
    return out.detach(), x.grad, model["layer"].lora_router.weight.grad


def relative_diff(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """max |a - b| / max |a| (0 when both are empty, e.g. the gradient of an idle rank's experts)."""
    scale = reference.abs().max() if reference.numel() else torch.tensor(0.0)
    return (reference - other).abs().max() / scale.clamp_min(1e-12) if reference.numel() else torch.tensor(0.0)


def main(ep_size: int, out_path: str) -> None:
    import torch.distributed as dist

    from floe_dist.distributed.expert_parallel import ExpertParallel, create_groups
    from floe_dist.distributed.runtime import init_distributed

    info = init_distributed()
    groups = create_groups(ep_size)
    report = {"world_size": info.world_size, "ep_size": ep_size}
    for name, scenario in SCENARIOS.items():
        replicated = build(**scenario)
        out_r, dx_r, drouter_r = run(replicated, info.rank)
        full_grads = {}
        for key in ("lora_A", "lora_B"):
            grad = getattr(replicated["layer"], key).grad.clone()
            dist.all_reduce(grad)
            full_grads[key] = grad / info.world_size

        split = build(**scenario)
        experts = ExpertParallel(split, groups)
        out_s, dx_s, drouter_s = run(split, info.rank)
        norm = experts.reduce_gradients()
        shard = experts.shards["layer"]
        pairs = [(out_r, out_s), (dx_r, dx_s), (drouter_r, drouter_s),
                 (full_grads["lora_A"][shard.cols], shard.lora_A.grad),
                 (full_grads["lora_B"][:, shard.cols], shard.lora_B.grad),
                 (torch.cat([g.flatten() for g in full_grads.values()]).norm(), norm)]
        diffs = torch.stack([relative_diff(a, b) for a, b in pairs])
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        received = [None] * info.world_size
        dist.all_gather_object(received, shard.received)
        dropped = torch.tensor(float(split["layer"].dropped or 0))
        dist.all_reduce(dropped)
        kept = split["layer"].kept
        single = torch.tensor(float((kept.sum(-1) == 1).sum()) if kept is not None else 0.0)
        dist.all_reduce(single)
        report[name] = {"max_relative_diff": dict(zip(["out", "dx", "router_grad", "A_grad", "B_grad", "grad_norm"],
                                             diffs.tolist())),
                        "received": received, "dropped": int(dropped), "one_expert_tokens": int(single)}
    if info.is_main:
        Path(out_path).write_text(json.dumps(report, indent=1))
    dist.barrier()  # nobody tears its gloo pairs down while another rank still reads the report
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
