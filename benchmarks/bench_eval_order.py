"""Evaluation batches in file order vs longest first (``floe_dist.generation.longest_first``), side by side in one
process on the same examples: multiple-choice scoring (``choice_scores``) of a task's test split, one CPU thread
(a search worker's, which runs the campaign's zero-shot evaluation). The file-order arm scores one batch at a time
in the examples' order, which is how every evaluation batched before the change.

    python benchmarks/bench_eval_order.py --tasks sst2 --limit 272
    python benchmarks/bench_eval_order.py --tasks runs/siqa.jsonl --limit 300   # benchmarks/dev_tasks.py writes it
    python benchmarks/bench_eval_order.py --tasks boolq --limit 96 --repeats 1

Prints seconds per arm, the speed-up, the padding each arm's batches carry and the largest score difference;
writes benchmarks/results/eval_order.json (rows merge by task).
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
from floe_dist.generation import longest_first  # noqa: E402
from floe_dist.modeling.answer_lm import AnswerLM  # noqa: E402
from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model  # noqa: E402
from floe_dist.recipe import DataSection  # noqa: E402
from floe_dist.resources import Resources  # noqa: E402


def padded_share(lengths: list[int], batch_size: int) -> float:
    """Tokens a batched run computes (each batch padded to its longest row) over the rows' own tokens."""
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(max(b) * len(b) for b in batches) / sum(lengths)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="sst2")
    parser.add_argument("--limit", type=int, default=272)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the arms this often; keep each's fastest")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    model_dir = resolve_model(ns.model)
    tokenizer, lm = load_tokenizer(model_dir), load_backbone(model_dir)
    model, resources, rows, bs = AnswerLM(lm), Resources(), [], ns.batch_size
    for task in ns.tasks.split(","):
        examples = resources.examples(DataSection(task=task), "test", tokenizer)[: ns.limit]
        arms = {"file order": lambda: [s for i in range(0, len(examples), bs) for s in choice_scores(
                    model, tokenizer, examples[i:i + bs], bs, ns.max_length, torch.device("cpu"), progress=False)],
                "longest first": lambda: choice_scores(model, tokenizer, examples, bs, ns.max_length,
                                                       torch.device("cpu"), progress=False)}
        timed = {}
        for _ in range(ns.repeats):
            for arm, run in arms.items():
                start = time.perf_counter()
                scores = run()
                seconds = time.perf_counter() - start
                if arm not in timed or seconds < timed[arm][0]:
                    timed[arm] = (seconds, scores)
        (file_s, in_file), (sorted_s, in_sorted) = timed["file order"], timed["longest first"]
        diff = max(abs(a - b) for x, y in zip(in_file, in_sorted) for a, b in zip(x, y))
        lengths = [min(len(tokenizer(e.prompt, add_special_tokens=False).input_ids), ns.max_length) for e in examples]
        row = {"task": Path(task).stem, "model": ns.model, "examples": len(examples),
               "choices": len(examples[0].choices), "threads": ns.threads, "batch_size": bs,
               "mean_prompt_tokens": sum(lengths) / len(lengths), "repeats": ns.repeats,
               "padded_share_file_order": padded_share(lengths, bs),
               "padded_share_longest_first": padded_share([lengths[i] for i in longest_first(lengths)], bs),
               "file_order_s": file_s, "longest_first_s": sorted_s, "speedup": file_s / sorted_s,
               "max_abs_score_diff": diff, "accuracy_file_order": accuracy(in_file, examples),
               "accuracy_longest_first": accuracy(in_sorted, examples)}
        rows.append(row)
        print(f"{row['task']}: {len(examples)} examples, prompts {row['mean_prompt_tokens']:.0f} tokens on average; "
              f"file order {file_s:.1f}s (padded x{row['padded_share_file_order']:.2f}), longest first "
              f"{sorted_s:.1f}s (x{row['padded_share_longest_first']:.2f}): {row['speedup']:.2f}x; max |score diff| "
              f"{diff:.1e}; accuracy {row['accuracy_file_order']:.4f} / {row['accuracy_longest_first']:.4f}",
              flush=True)
    write_result("eval_order", rows, merge_key="task")


if __name__ == "__main__":
    main()
