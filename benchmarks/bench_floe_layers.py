"""Does Fisher layer selection (FLoE) beat random layers? Side by side on the real model and data.

For each seed: ``floe-dist score`` (warm-up + mask Fisher) once, then the same adapter (HydraLoRA
style, 4 heads of rank 4 on q_proj/v_proj) is trained from scratch on
  * ``top``    the k layers with the highest Fisher score,
  * ``random`` k layers drawn with the seed,
  * ``bottom`` the k lowest-scored layers (anti-control),
  * ``all``    every layer (same rank, so about L/k times the parameters),
and evaluated on the test split. Results append to ``<out>/results.jsonl`` (rerun to resume); the
summary table (mean +- std over seeds) and a plot go to ``<out>/``.

    python benchmarks/bench_floe_layers.py --task sst2 --seeds 0 1 2 --k 8
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

ARMS = ("top", "random", "bottom", "all")


def floe(*args: str) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - start


def layer_allocation(score_dir: Path, layers: list[int], out: Path) -> None:
    """The score stage's allocation, moved onto the given layers."""
    data = json.loads((score_dir / "allocation.json").read_text())
    spec = next(iter(data["layers"].values()))
    data["layers"] = {str(l): spec for l in sorted(layers)}
    data["trainable_parameters"] = None
    data["method"] = "bench"
    out.write_text(json.dumps(data, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test examples only")
    ap.add_argument("--output", default="runs/bench_floe")
    args = ap.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    done = {(r["seed"], r["arm"]) for r in map(json.loads, results_file.read_text().splitlines())} \
        if results_file.is_file() else set()

    for seed in args.seeds:
        score_dir = out / f"score_s{seed}"
        if not (score_dir / "fisher.json").is_file():
            floe("score", "--model", args.model, "--task", args.task, "--output", str(score_dir),
                 "--seed", str(seed), "--k", str(args.k), "--zero", "0")
        fisher = json.loads((score_dir / "fisher.json").read_text())
        scores = {int(l): s for l, s in fisher["scores"].items()}
        ranked = sorted(scores, key=lambda l: -scores[l])
        arms = {"top": ranked[: args.k], "bottom": ranked[-args.k:],
                "random": sorted(random.Random(seed).sample(sorted(scores), args.k)), "all": sorted(scores)}
        for arm in ARMS:
            if (seed, arm) in done:
                continue
            run = out / f"{arm}_s{seed}"
            alloc = out / f"alloc_{arm}_s{seed}.json"
            layer_allocation(score_dir, arms[arm], alloc)
            train_seconds = floe("train", "--model", args.model, "--task", args.task, "--allocation", str(alloc),
                                 "--output", str(run), "--steps", str(args.steps), "--micro-batch",
                                 str(args.micro_batch), "--seed", str(seed), "--zero", "0", "--checkpoint-every", "0")
            acc = _accuracy(run, args.model, args.task, args.eval_limit)
            record = {"seed": seed, "arm": arm, "layers": arms[arm], "accuracy": acc,
                      "trainable_parameters": json.loads((run / "train.json").read_text())["trainable_parameters"],
                      "train_seconds": train_seconds, "score_seconds": fisher["seconds"]["total"]}
            with results_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    summarise(out, results_file, args)


def _accuracy(run: Path, model: str, task: str, limit: int | None) -> float:
    """Test accuracy of a run's export (cached in <run>/eval.json)."""
    from floe_dist.evaluation import evaluate
    from floe_dist.recipe import load_recipe

    cached = run / "eval.json"
    if cached.is_file():
        return json.loads(cached.read_text())["accuracy"]
    result = evaluate(load_recipe(None, ["--model.name", model, "--data.task", task, "--model.adapter", str(run / "adapter"),
                                         *(["--evaluate.limit", str(limit)] if limit else [])]))
    cached.write_text(json.dumps(result))
    return result["accuracy"]


def summarise(out: Path, results_file: Path, args) -> None:
    rows = [json.loads(line) for line in results_file.read_text().splitlines()]
    lines = [f"| arm | accuracy (mean ± std, {len(set(r['seed'] for r in rows))} seeds) | per seed | "
             f"trainable params | train s (mean) |", "|---|---|---|---|---|"]
    for arm in ARMS:
        rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = [r["accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {arm} | {100 * statistics.mean(accs):.1f} ± {100 * std:.1f} | "
                     f"{', '.join(f'{100 * a:.1f}' for a in accs)} | {rs[0]['trainable_parameters']:,} | "
                     f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    score_s = statistics.mean(r["score_seconds"] for r in rows)
    top_train = statistics.mean(r["train_seconds"] for r in rows if r["arm"] == "top")
    lines.append(f"\nscore stage {score_s:.0f} s (warm-up + Fisher) / final training of the top arm "
                 f"{top_train:.0f} s = {score_s / top_train:.2f}")
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    names = {"top": f"Fisher top-{args.k}", "random": f"random {args.k}", "bottom": f"Fisher bottom-{args.k}",
             "all": "all layers"}
    result_rows = []
    for arm in ARMS:
        accs = [100 * r["accuracy"] for r in sorted(rows, key=lambda r: r["seed"]) if r["arm"] == arm]
        if accs:
            result_rows.append({"arm": names[arm], "mean": statistics.mean(accs),
                                "std": statistics.stdev(accs) if len(accs) > 1 else None, "per_seed": accs,
                                "trainable": next(r["trainable_parameters"] for r in rows if r["arm"] == arm)})
    write_result(f"floe_layers_{args.task}", result_rows, score_seconds=score_s, top_train_seconds=top_train)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for i, arm in enumerate(ARMS):
        accs = [100 * r["accuracy"] for r in rows if r["arm"] == arm]
        ax.scatter([i] * len(accs), accs, color="tab:blue")
        if accs:
            ax.hlines(statistics.mean(accs), i - 0.25, i + 0.25, color="tab:red")
    ax.set_xticks(range(len(ARMS)), ARMS)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{args.task}: layers by Fisher vs random (k={args.k})")
    fig.tight_layout()
    fig.savefig(out / "floe_layers.png", dpi=100)


if __name__ == "__main__":
    main()
