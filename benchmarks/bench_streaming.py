"""Memory per rank as the corpus grows: training data read whole (the default) vs streamed (``data.streaming``).

    python benchmarks/bench_streaming.py                      # 10k, 100k and 1M rows (~5 min, 2 cores)

Per corpus size and form, alpaca-style rows (instruction, input, output; ~150 bytes of text a row) are written
once, as a hub dataset stores them (a hub-style folder of Parquet shards of at most 100k rows) and as one JSONL
file; then, each in a fresh process so its peak resident memory is its own (``VmHWM``):
- ``whole``: ``load_data`` of the train split as a training run reads it (every row read into Examples; the
  tokenising that follows, not measured, adds its own Arrow cache on disk);
- ``streamed``: the same recipe with ``data.streaming: true``: a rank's 50 micro-batches of 8 from step 0 through
  ``train_batch`` (tokenised, the SmolLM2 tokenizer), then a resumed run's first micro-batch at the last full
  step, which reads the whole stream up to it again.
Rank 0 of 2 ranks in both, so a rank reads its own share. "Above baseline" is the peak less the resident memory
just before the data is read (imports and the tokenizer). Writes benchmarks/results/streaming.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

MICRO, STEPS, WORLD, SHARD = 8, 50, 2, 100_000


def write_corpus(folder: Path, rows: int) -> tuple[Path, Path]:
    """The corpus as a hub-style folder of Parquet shards and as one JSONL file."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = folder / f"hub_{rows}" / "data"
    shards.mkdir(parents=True)
    jsonl = folder / f"corpus_{rows}.jsonl"
    with jsonl.open("w") as lines:
        for start in range(0, rows, SHARD):
            n = range(start, min(rows, start + SHARD))
            table = pa.table({
                "instruction": [f"Add {i} and {i % 977} and say what the sum is, in words and in figures." for i in n],
                "input": [f"Both numbers are below {i + 1000}." if i % 3 else "" for i in n],
                "output": [f"The sum of {i} and {i % 977} is {i + i % 977}." for i in n]})
            pq.write_table(table, shards / f"train-{start // SHARD:05d}.parquet", row_group_size=10_000)
            lines.writelines(json.dumps(row) + "\n" for row in table.to_pylist())
    return shards.parent, jsonl


def memory_mib() -> dict[str, float]:
    """This process's resident memory now and at its peak (reset at exec, unlike ru_maxrss)."""
    status = {line.split(":")[0]: line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith(("VmRSS", "VmHWM"))}
    return {"now": int(status["VmRSS"]) / 1024, "peak": int(status["VmHWM"]) / 1024}


def measure(path: str, rows: int, mode: str) -> dict:
    """In this (fresh) process: peak RSS above the baseline while reading ``mode``'s way."""
    from floe_dist.data import train_batch
    from floe_dist.modeling.backbone import load_tokenizer, resolve_model
    from floe_dist.recipe import load_recipe
    from floe_dist.resources import Resources

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    recipe = load_recipe(None, ["--data.task", path, "--data.test_size", "100",
                                *(["--data.streaming", "true"] if mode == "streamed" else [])])
    base = memory_mib()["now"]
    start = time.perf_counter()
    examples = Resources().examples(recipe.data, "train", tokenizer)
    if mode == "streamed":
        stream, _ = Resources().tokenized((), examples, tokenizer, 256, False)
        batch = lambda step: train_batch(stream, step=step, micro=0, rank=0, world=WORLD,  # noqa: E731
                                         micro_batch=MICRO, accumulation=1, seed=0, pad_id=tokenizer.pad_token_id)
        tokens = sum(int(batch(step)["attention_mask"].sum()) for step in range(STEPS))
        first_s = time.perf_counter() - start
        last = (rows - 100) // (MICRO * WORLD) - 1
        resume = time.perf_counter()
        tokens += int(resumed_batch(examples, tokenizer, last)["attention_mask"].sum())
        resume_s = time.perf_counter() - resume
        read = {"steps_read": STEPS, "tokens": tokens, "first_steps_s": first_s, "resume_at_step": last,
                "resume_s": resume_s}
    else:
        read = {"examples": len(examples), "read_s": time.perf_counter() - start}
    peak = memory_mib()["peak"]
    return {"rows": rows, "mode": mode, "baseline_mib": base, "peak_mib": peak, "above_baseline_mib": peak - base,
            **read}


def resumed_batch(examples, tokenizer, step: int):
    """A resumed run's first micro-batch: a new stream (as a restarted process has) asked for ``step``."""
    from floe_dist.data import train_batch
    from floe_dist.streaming import RowStream

    return train_batch(RowStream(examples, tokenizer, 256), step=step, micro=0, rank=0, world=WORLD,
                       micro_batch=MICRO, accumulation=1, seed=0, pad_id=tokenizer.pad_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--measure", nargs=3, metavar=("PATH", "ROWS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), args.measure[2])))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            for form, path in zip(("parquet shards", "jsonl"), write_corpus(Path(tmp), rows)):
                for mode in ("whole", "streamed"):
                    out = subprocess.run([sys.executable, __file__, "--measure", str(path), str(rows), mode],
                                         capture_output=True, text=True, check=True, cwd=REPO)
                    row = {"form": form, **json.loads(out.stdout.strip().splitlines()[-1])}
                    print(json.dumps(row), flush=True)
                    results.append(row)
    write_result("streaming", results)


if __name__ == "__main__":
    main()
