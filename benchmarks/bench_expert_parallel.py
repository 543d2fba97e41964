"""Expert parallelism benchmark: split experts (--ep-size 2) against replicated experts (--ep-size 1),
same model, allocation, data and 2 ranks (torchrun, ZeRO-3), measured in one run.

1. Step time: median of ``step_seconds`` (metrics.jsonl) after the first 2 steps, ep2 / ep1.
   Rounds alternate between the arms. Goal on CPU: <= 1.3.
2. Per-rank adapter state (rank 0, ``train.json``): trainable parameters held + AdamW state,
   next to the whole adapter's (what an unpartitioned replica holds).

    python benchmarks/bench_expert_parallel.py [--model smollm2-135m] [--experts 8] [--steps 8] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402


def train(out: Path, ep_size: int, a: argparse.Namespace) -> dict:
    from floe_dist.distributed.runtime import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "launcher.cli", "train", "--model", a.model, "--steps", str(a.steps),
           "--experts", str(a.experts), "--top-k", "2", "--rank", str(a.rank), "--targets", a.targets,
           "--micro-batch", str(a.micro_batch), "--checkpoint-every", "0", "--ep-size", str(ep_size),
           "--output", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_seconds": [m["step_seconds"] for m in metrics[2:]], "losses": [m["loss"] for m in metrics],
            **json.loads((out / "train.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj,up_proj,down_proj")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    a = parser.parse_args()

    times: dict[int, list[float]] = {1: [], 2: []}
    runs: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for ep in (1, 2) if r % 2 == 0 else (2, 1):
                runs[ep] = train(Path(tmp) / f"r{r}_ep{ep}", ep, a)
                times[ep] += runs[ep]["step_seconds"]
    med = {ep: statistics.median(t) for ep, t in times.items()}
    total = runs[1]["trainable_parameters"]
    print(f"model {a.model}, {a.experts} experts of rank {a.rank}, top-2 on {a.targets}; "
          f"{total:,} adapter parameters; 2 ranks, ZeRO-3, micro-batch {a.micro_batch}, {a.steps} steps x {a.rounds} rounds")
    print(f"step time (median): ep1 {med[1]:.3f} s, ep2 {med[2]:.3f} s -> ratio ep2/ep1 = {med[2] / med[1]:.3f} (goal <= 1.3)")
    print(f"loss curves equal: max |ep1 - ep2| = "
          f"{max(abs(x - y) for x, y in zip(runs[1]['losses'], runs[2]['losses'])):.2e}")
    replica = total * 4 * 3  # fp32 parameter + two AdamW moments, unpartitioned
    for ep in (1, 2):
        held = runs[ep]["adapter_state_bytes_rank0"]
        print(f"adapter state on rank 0, ep{ep}: {held / 2**20:.2f} MiB = {held / replica:.3f} of a full replica "
              f"({replica / 2**20:.2f} MiB)")
    layouts = {1: "`--ep-size 1` (experts partitioned by ZeRO-3: weight shard + fp32 master + moments)",
               2: "`--ep-size 2` (half of the experts whole: weight + moments; routers with ZeRO-3)"}
    write_result("expert_parallel", [{
        "micro_batch": a.micro_batch, "ep1_step_s": med[1], "ep2_step_s": med[2], "ratio": med[2] / med[1],
        "max_loss_diff": max(abs(x - y) for x, y in zip(runs[1]["losses"], runs[2]["losses"]))}],
        merge_key="micro_batch", replica_mib=replica / 2**20,
        state=[{"layout": layouts[ep], "held_mib": runs[ep]["adapter_state_bytes_rank0"] / 2**20,
                "share": runs[ep]["adapter_state_bytes_rank0"] / replica} for ep in (1, 2)])


if __name__ == "__main__":
    main()
