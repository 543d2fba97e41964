"""Planted-teacher checks of GuiLoMo and HILO (methods.md §8 C6, C7) on the residual-MLP toy of tests/toys.py.

C6 (GuiLoMo): the teacher adds, in block A, a different rank-2 change per input cluster (4 clusters) and,
in block B, one rank-2 change; nothing elsewhere. The GSV search (8 experts of rank 8 on every block's
fc1) should give A more experts than B, and B at least as many as the others. Its exported allocation,
scaled to a budget, is then retrained against a uniform LoRA-MoE with the same parameter count.

C7 (HILO): the teacher's change of fc1 has rank 2/4/6/8 in the four layer pairs (the needed rank grows
with depth). Rank schedules 2468, 5555 (same total rank) and 8642 are trained on 2 experts (top-1) and
compared on held-out MSE; then 2468 with 4 experts and top-p routing reports active parameters.

    python benchmarks/bench_planted_toys.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402
from floe_dist.allocation import Allocation  # noqa: E402
from floe_dist.methods.guilomo import GuidedLoRAMoE, guilomo_search  # noqa: E402
from floe_dist.modeling.lora_moe import LoRAMoELinear  # noqa: E402
from tests.toys import ResidualStack  # noqa: E402

SHAPES = {"fc1": (32, 64)}


def frozen_copy(seed: int) -> ResidualStack:
    model = ResidualStack(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train(model, modules, x, y, steps: int, seed: int, lr: float = 3e-3) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for m in modules for p in m.adapter_parameters()], lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = (model(x[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def mse(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x) - y).pow(2).mean())


# ----------------------------------------------------------------------------------------------- C6
def clustered_teacher(seed: int, a: int = 3, b: int = 5):
    """(base, x, cluster, y): block a gets one rank-2 change of fc1 per input cluster, block b one change."""
    g = torch.Generator().manual_seed(100 + seed)
    teacher = frozen_copy(seed)
    centers = torch.randn(4, 32, generator=g) * 2
    per_cluster = [torch.randn(64, 2, generator=g) @ torch.randn(2, 32, generator=g) / 32 ** 0.5 for _ in range(4)]
    single = torch.randn(64, 2, generator=g) @ torch.randn(2, 32, generator=g) / 32 ** 0.5

    def forward(x, cluster):
        h = x
        for i, block in enumerate(teacher.layers):
            z = block.norm(h)
            pre = block.fc1(z)
            if i == a:
                pre = pre + torch.einsum("nij,nj->ni", torch.stack(per_cluster)[cluster], z)
            if i == b:
                pre = pre + z @ single.T
            h = h + block.gain * block.fc2(torch.nn.functional.gelu(pre))
        return teacher.head(h)

    cluster = torch.randint(0, 4, (3072,), generator=g)
    x = centers[cluster] + torch.randn(3072, 32, generator=g)
    with torch.no_grad():
        y = forward(x, cluster)
    return x, y


def c6(seed: int, steps: int, order: str) -> dict:
    a, b = 3, 5
    x, y = clustered_teacher(seed, a, b)
    xt, yt, xv, yv = x[:1024], y[:1024], x[1024:], y[1024:]
    torch.manual_seed(seed)
    model = frozen_copy(seed)
    guided = []
    for block in model.layers:
        block.fc1 = GuidedLoRAMoE(block.fc1, n_max=8, r_max=8, top_k=2, dropout=0.0)
        guided.append(block.fc1)
    initial = [max(2, int(m.gsv_experts.argmax()) + 1) for m in guided]
    g = torch.Generator().manual_seed(seed)
    batches = ({"x": xt[i], "y": yt[i]} for i in (torch.randint(0, 1024, (64,), generator=g)
                                                   for _ in itertools.count()))
    guilomo_search(guided, batches, lambda bt: (model(bt["x"]) - bt["y"]).pow(2).mean(), steps=steps,
                   order=order, lr=3e-3)
    exported = [m.exported() for m in guided]
    experts = [m.experts for m in exported]

    searched = Allocation("guilomo", ["fc1"], {i: {"fc1": m} for i, m in enumerate(exported)})
    budget = searched.count_parameters(SHAPES)
    uniform = Allocation.uniform(8, ["fc1"], experts=4, rank=4, top_k=2).scaled_to_budget(budget, SHAPES)
    result = {"experts": experts, "initial": initial, "planted_ranks": (exported[a].ranks, exported[b].ranks),
              "ok": experts[a] > experts[b] >= max(e for i, e in enumerate(experts) if i not in (a, b))}
    for name, allocation in (("searched", searched), ("uniform", uniform)):
        torch.manual_seed(seed)
        student = frozen_copy(seed)
        modules = []
        for i, block in enumerate(student.layers):
            spec = allocation.layers[i]["fc1"]
            block.fc1 = LoRAMoELinear(block.fc1, spec.ranks, "topk", spec.top_k, alpha=16.0)
            modules.append(block.fc1)
        train(student, modules, xt, yt, steps=600, seed=seed)
        result[name] = (mse(student, xv, yv), allocation.count_parameters(SHAPES))
    return result


# ----------------------------------------------------------------------------------------------- C7
def depth_teacher(seed: int, needed=(2, 2, 4, 4, 6, 6, 8, 8)):
    """(x, y): fc1 of block l changed by a rank-needed[l] map; all blocks at full gain, the whole
    residual stream as the output (a 4-dim head would hide rank differences)."""
    g = torch.Generator().manual_seed(seed)
    teacher = frozen_copy(seed)
    teacher.head = torch.nn.Identity()
    for block in teacher.layers:
        block.gain = 1.0
    with torch.no_grad():
        for block, r in zip(teacher.layers, needed):
            block.fc1.weight += 0.8 * torch.randn(64, r, generator=g) @ torch.randn(r, 32, generator=g) / r ** 0.5
    x = torch.randn(1024 + 2048, 32, generator=g)
    with torch.no_grad():
        y = teacher(x)
    return x, y


def c7_arm(seed: int, schedule: str, experts: int, top_k: int, top_p: float, steps: int) -> tuple[float, int, float]:
    x, y = depth_teacher(seed)
    torch.manual_seed(seed)
    student = frozen_copy(seed)
    student.head = torch.nn.Identity()
    modules = []
    for layer, block in enumerate(student.layers):
        block.gain = 1.0
        r = int(schedule[layer * len(schedule) // 8])
        block.fc1 = LoRAMoELinear(block.fc1, [r] * experts, "topk", top_k, alpha=2.0 * r, top_p=top_p)
        modules.append(block.fc1)
    train(student, modules, x[:1024], y[:1024], steps=steps, seed=seed)
    student.eval()  # activity is counted in eval mode
    for m in modules:
        m.reset_activity()
    val = mse(student, x[1024:], y[1024:])
    trainable = sum(p.numel() for m in modules for p in m.adapter_parameters())
    return val, trainable, sum(m.active_parameters_per_token() for m in modules)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--search-steps", type=int, default=400)
    ap.add_argument("--order", default="second", choices=["first", "second"])
    ap.add_argument("--train-steps", type=int, default=1000)
    args = ap.parse_args()

    print(f"C6 GuiLoMo ({args.order} order, {args.search_steps} search steps; planted: block 3 four clusters, "
          f"block 5 one change)")
    print("| seed | experts per block (searched) | at init | E_3 > E_5 >= others | ranks 3 / 5 | "
          "MSE searched | MSE uniform (same params) |\n|---|---|---|---|---|---|---|")
    c6_rows, c7_rows = [], []
    for seed in args.seeds:
        r = c6(seed, args.search_steps, args.order)
        c6_rows.append({"seed": seed, "experts": r["experts"], "argmax_init": r["initial"], "claim_holds": r["ok"],
                        "mse_searched": r["searched"][0], "params_searched": r["searched"][1],
                        "mse_uniform": r["uniform"][0], "params_uniform": r["uniform"][1]})
        print(f"| {seed} | {r['experts']} | {r['initial']} | {'yes' if r['ok'] else 'no'} | "
              f"{r['planted_ranks'][0]} / {r['planted_ranks'][1]} | {r['searched'][0]:.4f} ({r['searched'][1]:,}) | "
              f"{r['uniform'][0]:.4f} ({r['uniform'][1]:,}) |")

    arms = {"2468": ("2468", 2, 1, 0.0), "5555": ("5555", 2, 1, 0.0), "8642": ("8642", 2, 1, 0.0),
            "2468, 4 experts top-2": ("2468", 4, 2, 0.0), "2468, 4 experts top-p 0.6": ("2468", 4, 2, 0.6)}
    print(f"\nC7 HILO rank schedules (needed rank 2/4/6/8 by depth; {args.train_steps} steps, 1,024 examples)")
    print("| schedule | val MSE per seed | mean | trainable | active / token |\n|---|---|---|---|---|")
    for name, (schedule, experts, top_k, top_p) in arms.items():
        runs = [c7_arm(seed, schedule, experts, top_k, top_p, args.train_steps) for seed in args.seeds]
        print(f"| {name} | {', '.join(f'{v:.4f}' for v, _, _ in runs)} | {statistics.mean(v for v, _, _ in runs):.4f} | "
              f"{runs[0][1]:,} | {statistics.mean(a for _, _, a in runs):,.0f} |")
        c7_rows.append({"schedule": name, "val_mse": [v for v, _, _ in runs],
                        "mean": statistics.mean(v for v, _, _ in runs), "trainable": runs[0][1],
                        "active": round(statistics.mean(a for _, _, a in runs))})
    write_result("planted_toys", [], c6=c6_rows, c7=c7_rows)


if __name__ == "__main__":
    main()
