"""Training data: tokenised when drawn (every epoch, every rank, every search trial) vs tokenised once into
``datasets``' Arrow cache (``data.tokenize``), and what packing does to the rows, side by side in one process.

    python benchmarks/bench_tokenize.py                       # SmolLM2 tokenizer; sst2, boolq, arithmetic train

Per task: seconds to tokenise every example when drawn (one epoch of ``encode``, what each rank paid per
epoch before), to tokenise once into an empty cache, and to read the cached file back (what every other
rank, trial and rerun pays); seconds per 100 micro-batches of 8 drawn from each; rows and padding share of
those batches unpacked and packed. Writes benchmarks/results/tokenize.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402
from floe_dist.data import collate, encode, load_task, pack, tokenize, train_batch  # noqa: E402
from floe_dist.modeling.backbone import load_tokenizer, resolve_model  # noqa: E402

BATCHES, MICRO_BATCH = 100, 8


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def padding_share(rows, pad_id: int) -> float:
    """Share of the positions of BATCHES micro-batches that are padding."""
    pads = total = 0
    for step in range(BATCHES):
        mask = train_batch(rows, step=step, micro=0, rank=0, world=1, micro_batch=MICRO_BATCH, accumulation=1,
                           seed=0, pad_id=pad_id)["attention_mask"]
        pads, total = pads + int((mask == 0).sum()), total + mask.numel()
    return pads / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="sst2,boolq,arithmetic")
    parser.add_argument("--max-length", type=int, default=256)
    ns = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model(ns.model))
    pad, rows_out = tokenizer.pad_token_id, []
    for task in ns.tasks.split(","):
        examples = load_task(task, "train", tokenizer=tokenizer)
        _, per_draw = timed(lambda: [encode(tokenizer, e.prompt, e.choices[e.label], ns.max_length) for e in examples])
        with tempfile.TemporaryDirectory() as cache:
            os.environ["FLOE_DIST_CACHE"] = cache
            rows, cold = timed(lambda: tokenize(examples, tokenizer, ns.max_length))
            rows, warm = timed(lambda: tokenize(examples, tokenizer, ns.max_length))
            packed = pack(rows, ns.max_length)
            _, draw_cached = timed(lambda: [train_batch(rows, step=s, micro=0, rank=0, world=1, micro_batch=MICRO_BATCH,
                                                        accumulation=1, seed=0, pad_id=pad) for s in range(BATCHES)])

            def old_draw():  # the former train_batch: encode each drawn example
                for s in range(BATCHES):
                    picked = examples[s * MICRO_BATCH % len(examples):][:MICRO_BATCH]
                    collate([encode(tokenizer, e.prompt, e.choices[e.label], ns.max_length) for e in picked], pad)

            _, draw_encode = timed(old_draw)
            row = {"task": task, "model": ns.model, "examples": len(examples), "max_length": ns.max_length,
                   "tokens": sum(len(i) for i in rows["input_ids"]), "cut": sum(rows["cut"]),
                   "encode_epoch_s": per_draw, "tokenize_cold_s": cold, "tokenize_cached_s": warm,
                   "draw_100_encode_s": draw_encode, "draw_100_cached_s": draw_cached,
                   "rows_packed": len(packed), "padding_unpacked": padding_share(rows, pad),
                   "padding_packed": padding_share(packed, pad)}
        rows_out.append(row)
        print(f"{task}: {len(examples)} examples; one epoch of encode {per_draw:.2f}s; tokenise once {cold:.2f}s, "
              f"cached {warm:.3f}s; 100 batches: encode {draw_encode:.2f}s, cached {draw_cached:.2f}s; "
              f"packed into {len(packed)} rows; padding {row['padding_unpacked']:.1%} -> {row['padding_packed']:.1%}",
              flush=True)
    write_result("tokenize", rows_out, merge_key="task")


if __name__ == "__main__":
    main()
