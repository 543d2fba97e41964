"""Multiple-choice evaluation: each prompt + choice as its own sequence vs the prompt once with its KV cache
serving every choice (``choice_scores(share_prompts=...)``), side by side in one process, same examples.

    python benchmarks/bench_eval.py --tasks sst2 --limit 100   # SmolLM2-135M, 1 CPU thread
    python benchmarks/bench_eval.py --tasks boolq --limit 32   # long passages: rows merge by task

Prints seconds per arm, the speed-up and the largest score difference; writes
benchmarks/results/eval_choice_scoring.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402
from floe_dist.evaluation import accuracy, choice_scores  # noqa: E402
from floe_dist.modeling.answer_lm import AnswerLM  # noqa: E402
from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model  # noqa: E402
from floe_dist.recipe import DataSection  # noqa: E402
from floe_dist.resources import Resources  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="sst2,boolq")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    model_dir = resolve_model(ns.model)
    tokenizer, lm = load_tokenizer(model_dir), load_backbone(model_dir)
    model, resources, rows = AnswerLM(lm), Resources(), []
    for task in ns.tasks.split(","):
        examples = resources.examples(DataSection(task=task), "test", tokenizer)[: ns.limit]
        timed = {}
        for _ in range(2):  # alternate the arms twice; keep each arm's faster run
            for share in (False, True):
                start = time.perf_counter()
                scores = choice_scores(model, tokenizer, examples, ns.batch_size, ns.max_length, torch.device("cpu"),
                                       progress=False, share_prompts=share)
                seconds = time.perf_counter() - start
                if share not in timed or seconds < timed[share][0]:
                    timed[share] = (seconds, scores)
        (pair_s, pair), (shared_s, shared) = timed[False], timed[True]
        diff = max(abs(a - b) for x, y in zip(pair, shared) for a, b in zip(x, y))
        row = {"task": task, "model": ns.model, "examples": len(examples), "choices": len(examples[0].choices),
               "threads": ns.threads, "pairwise_s": pair_s, "shared_prompt_s": shared_s, "speedup": pair_s / shared_s,
               "max_abs_score_diff": diff, "accuracy_pairwise": accuracy(pair, examples),
               "accuracy_shared_prompt": accuracy(shared, examples)}
        rows.append(row)
        print(f"{task}: {len(examples)} examples x {row['choices']} choices: pair by pair {pair_s:.1f}s, prompt once "
              f"{shared_s:.1f}s ({row['speedup']:.2f}x); max |score diff| {diff:.1e}; accuracy "
              f"{row['accuracy_pairwise']:.3f} / {row['accuracy_shared_prompt']:.3f}", flush=True)
    write_result("eval_choice_scoring", rows, merge_key="task")


if __name__ == "__main__":
    main()
