"""``floe-dist plan --device cpu`` against the measured peak RSS of real CPU training runs.

Each row trains 3 steps of q,v LoRA r=8 on SST-2 (batch 8 per rank, no gradient checkpointing) and
reads the largest rank's maximum RSS from ``/usr/bin/time -v``, once per allocator:
glibc as it comes, glibc with a pinned mmap threshold (freed buffers go back to the OS), and jemalloc
when ``libjemalloc.so.2`` is installed (apt ``libjemalloc2``). The plan gets the padded length of the
longest batch those steps use, computed from the same pure batch function the trainer calls.

    python benchmarks/bench_plan_cpu.py [--rows tiny-z3 smollm2-z0 smollm2-z3 smollm2-z3x2]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

ROWS = {"tiny-z3": ("tiny", 3, 1), "smollm2-z0": ("smollm2-135m", 0, 1), "smollm2-z3": ("smollm2-135m", 3, 1),
        "smollm2-z3x2": ("smollm2-135m", 3, 2)}
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
ALLOCATORS = {"glibc": {}, "pinned": {"MALLOC_MMAP_THRESHOLD_": "131072"}}  # pinned: glibc, fixed mmap threshold
if JEMALLOC.is_file():
    ALLOCATORS["jemalloc"] = {"LD_PRELOAD": str(JEMALLOC)}
LABEL = {"tiny": "tiny", "smollm2-135m": "SmolLM2-135M"}
STEPS, MICRO_BATCH = 3, 8


def longest_batch(model: str, world: int) -> int:
    from floe_dist.data import load_task, tokenize, train_batch
    from floe_dist.modeling.backbone import load_tokenizer, resolve_model
    from floe_dist.recipe import Recipe

    defaults = Recipe()
    tokenizer = load_tokenizer(resolve_model(model))
    rows = tokenize(load_task("sst2", "train"), tokenizer, defaults.model.max_length)
    return max(train_batch(rows, step=s, micro=0, rank=r, world=world, micro_batch=MICRO_BATCH, accumulation=1,
                           seed=defaults.train.seed, pad_id=tokenizer.pad_token_id)["input_ids"].shape[1]
               for s in range(STEPS) for r in range(world))


def measured_mib(model: str, zero: int, world: int, env: dict[str, str], out: Path) -> float:
    from floe_dist.distributed.runtime import free_port

    launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}"] if world > 1 else [sys.executable])
    cmd = ["/usr/bin/time", "-v", *launch, "-m", "launcher.cli", "train", "--model", model, "--zero", str(zero),
           "--steps", str(STEPS), "--micro-batch", str(MICRO_BATCH), "--no-gradient-checkpointing",
           "--checkpoint-every", "0", "--output", str(out)]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run(cmd, cwd=REPO, env={**base, **env}, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024


def planned_mib(model: str, zero: int, world: int, seq_len: int) -> float:
    from floe_dist.stages.plan import GIB, PlanInputs, plan

    args = PlanInputs(model=model, device="cpu", quant="fp32", targets="q_proj,v_proj", rank=8, zero=zero,
                    gpus_per_node=world, micro_batch=MICRO_BATCH, seq_len=seq_len, gradient_checkpointing=False,
                    flash_attention=False)
    return plan(args)["total_bytes"] / GIB * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    a = parser.parse_args()
    print("| run | plan (MiB) | " + " | ".join(f"{name} (error)" for name in ALLOCATORS) + " |")
    print("|---|---|" + "---|" * len(ALLOCATORS))
    with tempfile.TemporaryDirectory() as tmp:
        for row in a.rows:
            model, zero, world = ROWS[row]
            planned = planned_mib(model, zero, world, longest_batch(model, world))
            cells = []
            label = f"{LABEL[model]}, ZeRO-{zero}, {world} rank{'s' * (world > 1)}"
            result = {"run": label, "plan_mib": round(planned)}
            for i, (name, env) in enumerate(ALLOCATORS.items()):
                rss = measured_mib(model, zero, world, env, Path(tmp) / f"{row}-{i}")
                cells.append(f"{rss:,.0f} ({(planned - rss) / rss:+.1%})")
                result.update({f"{name}_mib": round(rss), f"{name}_err": round(100 * (planned - rss) / rss, 1)})
            print(f"| {model}, ZeRO-{zero}, {world} rank(s) | {planned:,.0f} | " + " | ".join(cells) + " |", flush=True)
            write_result("plan_cpu", [result], merge_key="run")


if __name__ == "__main__":
    main()
