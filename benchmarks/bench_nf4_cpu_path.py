"""What turning off bitsandbytes' AVX512-BF16 CPU path costs NF4 evaluation: its bf16 kernel (weights repacked in
place) against the dequantise-then-matmul path floe-dist keeps (``bnb_cpu_bf16_path``), side by side in one
process, the same NF4 backbone and examples.

    python benchmarks/bench_nf4_cpu_path.py --limit 272    # SmolLM2-135M NF4, the whole SST-2 test split

Each arm loads its own backbone (the bf16 path repacks the weights for good), then the arms alternate twice and each
keeps its faster run. On a CPU without AVX512-BF16 both arms take the same path (the row says which the CPU has).
Prints seconds per arm, the ratio, the accuracies and the largest choice-score difference; writes
benchmarks/results/nf4_cpu_path.json.
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
from floe_dist.modeling.backbone import bnb_cpu_bf16_path, load_backbone, load_tokenizer, resolve_model  # noqa: E402
from floe_dist.recipe import DataSection  # noqa: E402
from floe_dist.resources import Resources  # noqa: E402


def main() -> None:
    from bitsandbytes.functional import has_avx512bf16

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    ns = parser.parse_args()
    model_dir = resolve_model(ns.model)
    tokenizer = load_tokenizer(model_dir)
    examples = Resources().examples(DataSection(task=ns.task), "test", tokenizer)[: ns.limit]
    cpu_kernel = bool(has_avx512bf16())
    arms = {}
    for name in ("bnb_bf16_kernel", "dequantise_fp32"):
        lm = load_backbone(model_dir, "nf4")  # floe-dist's loader turns the kernel off; the first arm turns it on
        arms[name] = AnswerLM(bnb_cpu_bf16_path(lm, enabled=cpu_kernel and name == "bnb_bf16_kernel"))
    timed = {}
    for _ in range(2):
        for name, model in arms.items():
            start = time.perf_counter()
            scores = choice_scores(model, tokenizer, examples, ns.batch_size, ns.max_length, torch.device("cpu"),
                                   progress=False)
            seconds = time.perf_counter() - start
            if name not in timed or seconds < timed[name][0]:
                timed[name] = (seconds, scores)
    (kernel_s, kernel), (fp32_s, fp32) = timed["bnb_bf16_kernel"], timed["dequantise_fp32"]
    row = {"task": ns.task, "model": ns.model, "examples": len(examples), "threads": torch.get_num_threads(),
           "cpu_has_avx512bf16": cpu_kernel, "bnb_bf16_kernel_s": kernel_s, "dequantise_fp32_s": fp32_s,
           "time_ratio": fp32_s / kernel_s, "accuracy_bnb_bf16_kernel": accuracy(kernel, examples),
           "accuracy_dequantise_fp32": accuracy(fp32, examples),
           "max_abs_score_diff": max(abs(a - b) for x, y in zip(kernel, fp32) for a, b in zip(x, y))}
    print(f"{ns.task}: {len(examples)} examples, NF4 {ns.model}, AVX512-BF16 {cpu_kernel}: bnb bf16 kernel "
          f"{kernel_s:.1f}s, dequantise fp32 {fp32_s:.1f}s (time ratio {row['time_ratio']:.2f}); accuracy "
          f"{row['accuracy_bnb_bf16_kernel']:.3f} / {row['accuracy_dequantise_fp32']:.3f}; max |score diff| "
          f"{row['max_abs_score_diff']:.1e}", flush=True)
    write_result("nf4_cpu_path", [row], merge_key="task")


if __name__ == "__main__":
    main()
