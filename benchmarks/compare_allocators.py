"""Every allocator on one task at one trainable-parameter budget, several seeds, same trainer.

For each seed and method: the method writes an allocation (``floe-dist allocate``; FLoE first runs
``floe-dist score``), every rank in it is scaled by one factor to the budget (``--budget``, kept only if
within 5%), the same ``floe-dist train`` recipe trains it (40 steps x 8 examples, lr 1e-3, one process)
and ``floe-dist evaluate`` scores the test split. Results append to ``<out>/results.jsonl`` (rerun to
resume); the table (accuracy mean +- std, trainable and active parameters, allocation and training time)
and a plot go to ``<out>/``; the figures to benchmarks/results/compare_allocators_<task>.json, which
``python benchmarks/report.py`` turns into BENCHMARKS.md's table.

    python benchmarks/compare_allocators.py --task sst2 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

TOLERANCE = 0.05

# method name -> (allocator, its flags). Layer-selecting methods keep 8 of 30 layers (FLoE's 25%).
METHODS = {
    "floe": ("floe", ["--k", "8", "--experts", "4", "--router", "dense"]),
    "random": ("random", ["--k", "8", "--experts", "4", "--router", "dense"]),
    "flexora": ("flexora", ["--flexora-steps", "50"]),
    "hilo": ("hilo", ["--expert-schedule", "2468", "--rank-schedule", "2468", "--top-k", "2", "--top-p", "0.6"]),
    "guilomo": ("guilomo", ["--guilomo-steps", "40", "--guilomo-order", "first"]),
    "uniform-lora": ("uniform", []),
    "uniform-moe": ("uniform", ["--experts", "4", "--top-k", "2"]),
}


def floe_cli(*args: str) -> float:
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"floe-dist {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--budget", type=int, default=576_000, help="trainable adapter parameters (default: plain "
                    "LoRA r=10 on q,v of all 30 SmolLM2 layers, the smallest round budget every method meets "
                    "within 5%%: routers of many-expert methods cost 576 per expert and module)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--output", default="runs/compare_allocators")
    ap.add_argument("--no-results", action="store_true", help="do not write benchmarks/results/ (then run "
                    "python benchmarks/report.py to update BENCHMARKS.md)")
    args = ap.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["seed"], r["method"]) for r in _rows(results)}

    for seed in args.seeds:
        for method in args.methods:
            if (seed, method) in done:
                continue
            record = run_one(args, out, seed, method)
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    table = summarise(out, _rows(results), args)
    print(table)
    if not args.no_results:
        write_results(_rows(results), out, args)


def run_one(args, out: Path, seed: int, method: str) -> dict:
    allocator, flags = METHODS[method]
    alloc = out / f"alloc_{method}_s{seed}.json"
    alloc_seconds = 0.0
    if allocator == "floe":
        score_dir = out / f"score_s{seed}"
        if not (score_dir / "fisher.json").is_file():
            alloc_seconds += floe_cli("score", "--model", args.model, "--task", args.task, "--output",
                                      str(score_dir), "--seed", str(seed), "--zero", "0")
        else:
            alloc_seconds += json.loads((score_dir / "fisher.json").read_text())["seconds"]["total"]
        flags = [*flags, "--scores", str(score_dir / "fisher.json")]
    alloc_seconds += floe_cli("allocate", "--method", allocator, "--model", args.model, "--task", args.task,
                              "--seed", str(seed), "--budget", str(args.budget), "--output", str(alloc), *flags)
    allocation = json.loads(alloc.read_text())
    trainable = allocation["trainable_parameters"]
    if abs(trainable / args.budget - 1) > TOLERANCE:
        raise RuntimeError(f"{method}: {trainable:,} parameters is not within {TOLERANCE:.0%} of {args.budget:,}")
    run = out / f"{method}_s{seed}"
    train_seconds = floe_cli("train", "--model", args.model, "--task", args.task, "--allocation", str(alloc),
                             "--output", str(run), "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
                             "--seed", str(seed), "--zero", "0", "--checkpoint-every", "0")
    from floe_dist.evaluation import evaluate
    from floe_dist.recipe import load_recipe

    result = evaluate(load_recipe(None, ["--model.name", args.model, "--data.task", args.task,
                                         "--model.adapter", str(run / "adapter")]))
    return {"seed": seed, "method": method, "accuracy": result["accuracy"], "trainable_parameters": trainable,
            "active_parameters_per_token": result["active_parameters_per_token"], "layers": len(allocation["layers"]),
            "allocation_seconds": alloc_seconds, "train_seconds": train_seconds}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def summarise(out: Path, rows: list[dict], args) -> str:
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"| method | accuracy % (mean ± std, {len(seeds)} seeds) | per seed | layers | trainable params | "
             f"active params / token | allocation s | training s |", "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = [100 * r["accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        mean = lambda key: statistics.mean(r[key] for r in rs)
        lines.append(f"| {method} | {statistics.mean(accs):.1f} ± {std:.1f} | {', '.join(f'{a:.1f}' for a in accs)} | "
                     f"{mean('layers'):.1f} | {mean('trainable_parameters'):,.0f} | "
                     f"{mean('active_parameters_per_token'):,.0f} | {mean('allocation_seconds'):.0f} | "
                     f"{mean('train_seconds'):.0f} |")
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    plot(out, rows, args)
    return table


def plot(out: Path, rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 3))
    for i, method in enumerate(methods):
        accs = [100 * r["accuracy"] for r in rows if r["method"] == method]
        ax.scatter([i] * len(accs), accs, color="tab:blue", s=14)
        ax.hlines(statistics.mean(accs), i - 0.3, i + 0.3, color="tab:red")
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{args.task}, {args.budget:,} trainable parameters (±{TOLERANCE:.0%})")
    fig.tight_layout()
    fig.savefig(out / "compare_allocators.png", dpi=100)
    plt.close(fig)


def write_results(rows: list[dict], out: Path, args) -> None:
    """benchmarks/results/compare_allocators_<task>.json (report.py renders it) and the plot beside it."""
    image = REPO / "benchmarks" / f"compare_allocators_{args.task}.png"
    image.write_bytes((out / "compare_allocators.png").read_bytes())
    result = []
    for method in METHODS:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        if rs:
            accs = [100 * r["accuracy"] for r in rs]
            mean = lambda key: statistics.mean(r[key] for r in rs)  # noqa: E731
            result.append({"method": method, "mean": statistics.mean(accs),
                           "std": statistics.stdev(accs) if len(accs) > 1 else None, "per_seed": accs,
                           "layers": mean("layers"), "trainable": round(mean("trainable_parameters")),
                           "active": round(mean("active_parameters_per_token")),
                           "allocation_s": round(mean("allocation_seconds")),
                           "training_s": round(mean("train_seconds"))})
    write_result(f"compare_allocators_{args.task}", result, budget=args.budget, steps=args.steps,
                 micro_batch=args.micro_batch)


if __name__ == "__main__":
    main()
