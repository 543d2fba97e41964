"""``floe-dist plan`` against published per-GPU memory of LoRA/QLoRA runs (7B-70B), calibration kept apart.

    python benchmarks/bench_plan_published.py     # writes benchmarks/results/plan_published.json

Calibration rows are the figures a constant of floe_dist/stages/plan.py was fitted on (the row names the
constant); they cannot validate the planner. Validation rows fitted nothing. Every published figure is
the authors' own peak per GPU, in their unit:
  * PEFT docs, "DeepSpeed: ZeRO-3 + QLoRA" (Llama-2-70B on 2 GPUs): "36.6 GB per GPU";
  * Answer.AI, fsdp_qlora ``benchmarks_03_2024.md``: ``torch.cuda.max_memory_reserved`` of FSDP + QLoRA
    (bitsandbytes NF4, quant_storage bf16) or LoRA on 2 GPUs, train.py defaults: LoRA r=64 on q, k, v,
    gate, up, down (not o_proj), gradient checkpointing, full-sequence loss, context 2048 unless stated.
    Their peak excludes the CUDA context, which the plan's runtime term (1.5 GB) includes.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402
from floe_dist.stages.plan import GIB, PlanInputs, plan  # noqa: E402

ANSWER_AI = "Answer.AI fsdp_qlora benchmarks_03_2024.md"
ANSWER_AI_LORA = dict(rank=64, targets="q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj", gpus_per_node=2,
                      full_sequence_loss=True, quant="nf4-dq", seq_len=2048)
YI_34B = dict(model_type="llama", hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
              num_attention_heads=56, num_key_value_heads=8, vocab_size=64000, tie_word_embeddings=False)


@dataclass
class Published:
    run: str
    source: str
    published: float
    unit: str  # "GB" (1e9 bytes) or "GiB"
    role: str  # "calibration" or "validation"
    plan: dict = field(default_factory=dict)  # PlanInputs fields
    fitted: str = ""  # calibration: the constant fitted on this figure


PUBLISHED = [
    Published("Llama-2-70B, ZeRO-3 + QLoRA (double quant), 2 GPUs, b=2, s=2048, r=8 all linear",
              "PEFT docs (DeepSpeed ZeRO-3 + QLoRA)", 36.6, "GB", "calibration",
              dict(model="llama2-70b", gpus_per_node=2, rank=8, micro_batch=2, seq_len=2048, quant="nf4-dq",
                   full_sequence_loss=True), fitted="GPU_FACTOR = 1.2 (total = 1.2 × the sum of the terms)"),
    Published("Llama-2-70B QLoRA, FSDP + CPU offload, 2 × 24 GB, b=2", ANSWER_AI, 14.92, "GiB", "validation",
              dict(model="llama2-70b", micro_batch=2, offload=True, gpu_memory=24, **ANSWER_AI_LORA)),
    Published("Llama-2-7B QLoRA, FSDP, 2 GPUs, b=1, s=512", ANSWER_AI, 4.98, "GiB", "validation",
              dict(model="llama2-7b", micro_batch=1, **{**ANSWER_AI_LORA, "seq_len": 512})),
    Published("Llama-2-7B QLoRA, FSDP, 2 GPUs, b=1", ANSWER_AI, 5.21, "GiB", "validation",
              dict(model="llama2-7b", micro_batch=1, **ANSWER_AI_LORA)),
    Published("Llama-2-7B QLoRA, FSDP, 2 GPUs, b=4", ANSWER_AI, 11.22, "GiB", "validation",
              dict(model="llama2-7b", micro_batch=4, **ANSWER_AI_LORA)),
    Published("Llama-2-7B QLoRA, FSDP, 2 GPUs, b=10", ANSWER_AI, 20.97, "GiB", "validation",
              dict(model="llama2-7b", micro_batch=10, **ANSWER_AI_LORA)),
    Published("Llama-2-7B LoRA (bf16 base), FSDP, 2 GPUs, b=4", ANSWER_AI, 16.14, "GiB", "validation",
              dict(model="llama2-7b", micro_batch=4, **{**ANSWER_AI_LORA, "quant": "bf16"})),
    Published("Llama-2-7B LoRA (bf16 base), FSDP, 2 GPUs, b=6", ANSWER_AI, 21.35, "GiB", "validation",
              dict(model="llama2-7b", micro_batch=6, **{**ANSWER_AI_LORA, "quant": "bf16"})),
    Published("Yi-34B QLoRA, FSDP, 2 GPUs, b=2", ANSWER_AI, 23.05, "GiB", "validation",
              dict(model="yi-34b", micro_batch=2, gpu_memory=24, **ANSWER_AI_LORA)),
]


def predict(row: Published, key: str = "total_bytes") -> float:
    """The plan's training peak (or, with ``key="load_bytes"``, its load peak) for a published run, in the
    published unit."""
    with tempfile.TemporaryDirectory() as tmp:
        args = dict(row.plan)
        if args["model"] == "yi-34b":  # not a built-in shape: its public config, written as a config.json
            config = Path(tmp) / "config.json"
            config.write_text(json.dumps(YI_34B))
            args["model"] = str(config)
        total = plan(PlanInputs(**args))[key]
    return total / (GIB if row.unit == "GiB" else 1e9)


def main() -> None:
    rows = []
    for row in PUBLISHED:
        predicted = predict(row)
        error = predicted / row.published - 1
        rows.append({"run": row.run, "source": row.source, "role": row.role, "published": row.published,
                     "unit": row.unit, "plan": predicted, "plan_load": predict(row, "load_bytes"), "error": error, "fitted": row.fitted, "plan_args": row.plan})
        print(f"{row.role:<11} {row.run:<75} published {row.published:6.2f} {row.unit}  plan {predicted:6.2f}  "
              f"{error:+.1%}", flush=True)
    write_result("plan_published", rows)


if __name__ == "__main__":
    main()
