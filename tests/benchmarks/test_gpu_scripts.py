"""The GPU session's scripts, run here on CPU on the tiny shape: a GPU is lent for 15 minutes at a time, too
few to find a script broken there. On CPU they must also leave the GPU result files alone."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

GPU_FILES = ("gpu_throughput", "lora_moe_layer", "gpu_generate")


@pytest.fixture
def gpu_files_kept():
    """Fails the test if a CPU run changed a GPU result file."""
    paths = [REPO / "benchmarks" / "results" / f"{name}.json" for name in GPU_FILES]
    before = {p: p.read_bytes() if p.is_file() else None for p in paths}
    yield
    assert {p: p.read_bytes() if p.is_file() else None for p in paths} == before


def run(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_throughput_script_trains_fused_and_eager_moe_alike(tmp_path, gpu_files_kept):
    raw = tmp_path / "raw.json"
    # FLOE_DIST_FUSED_ROUTER=1: the moe variant compiles its router here too, as it does on a GPU by default
    run("gpu_throughput.py", "--shapes", "tiny", "--variants", "peft-quarter,moe,moe-eager", "--steps", "2",
        "--warmup", "1", "--micro-batch", "2", "--seq-len", "32", "--output", str(raw),
        env={"FLOE_DIST_FUSED_ROUTER": "1"})
    rows = {r["variant"]: r for r in json.loads(raw.read_text())}
    assert sorted(rows) == ["moe", "moe-eager", "peft-quarter"] and not any("error" in r for r in rows.values())
    fused, eager, peft = rows["moe"], rows["moe-eager"], rows["peft-quarter"]
    assert fused["router_compiled"] and not eager["router_compiled"]  # the fused router did run, and only there
    assert fused["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    assert fused["trainable"] == eager["trainable"] and abs(fused["trainable"] / peft["trainable"] - 1) < 0.05
    assert 0 < fused["mfu"] < fused["hfu"]  # the dense dispatch computes every expert, the model counts top-2


def test_generate_script_times_every_variant_at_every_batch(gpu_files_kept):
    out = run("gpu_generate.py", "--shape", "tiny", "--batches", "1,3", "--prompt-tokens", "8", "--new-tokens",
              "4", "--reps", "1")
    timed = set(re.findall(r"^ *(\S+) batch +(\d+): +[\d.]+ tokens/s", out, re.MULTILINE))
    assert timed == {(v, b) for v in ("base", "moe", "moe-eager", "peft-quarter") for b in ("1", "3")}


def test_layer_bench_fused_and_loop_dispatch_equal_the_product_layer(gpu_files_kept):
    out = run("bench_lora_moe_layer.py", "--tokens", "8", "--shapes", "32x48", "--reps", "1", "--warmup", "0")
    row = [line for line in out.splitlines() if line.startswith("| 32x48 |")]
    assert len(row) == 1
    loop_diff, fused_diff = map(float, row[0].split("|")[-2].split(","))
    assert loop_diff < 1e-5 and fused_diff < 1e-5
