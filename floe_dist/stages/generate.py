"""``floe-dist generate``: what a base model or an adapter writes, for one prompt or a data file.

    floe-dist generate --model smollm2-135m --adapter runs/x/adapter --prompt "Calculate 5 + 91 =" --stop '\\n'
    floe-dist generate --model smollm2-135m --chat --prompt "Name three primes."
    floe-dist generate --adapter runs/x/adapter --input data.jsonl --data-format alpaca --output out.jsonl

A file is read like a task (any format, ``--columns`` mapping); each of its prompts is generated from and
written as one JSON line ``{"prompt", "generation", "reference"}``. LoRA-MoE adapters and NF4 backbones
load as ``evaluate`` loads them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from floe_dist.config import arg


@dataclass
class GenerateArgs:
    model: str = arg("smollm2-135m", "base model: smollm2-135m, tiny, a HF folder or a .gguf file")
    adapter: str | None = arg(None, "an export folder written by train; none = the base model")
    quant: str = arg("none", "backbone precision: none (fp32 on CPU / bf16 on GPU) or nf4")
    prompt: str | None = arg(None, "one prompt to complete (printed)")
    chat: bool = arg(False, "wrap --prompt as a user turn in the tokenizer's chat template")
    input: str | None = arg(None, "a data file or folder whose prompts are completed (read like a task)")
    data_format: str = arg("auto", "--input's format: auto, multiple_choice, alpaca, chat or text")
    columns: str = arg("", "--input's field names: FIELD=COLUMN,...")
    limit: int | None = arg(None, "only the first N prompts of --input")
    output: str | None = arg(None, "write JSON lines here instead of printing")
    max_new_tokens: int = arg(64, "tokens generated per prompt at most")
    stop: str = arg("", "stop at any of these strings, separated by '||' (\\n = newline); EOS always stops")
    batch_size: int = arg(8, "prompts per generate call")
    max_length: int = arg(512, "prompt + generation tokens (prompts cut from the left)")

    def validate(self) -> None:
        if (self.prompt is None) == (self.input is None):
            raise ValueError("give exactly one of --prompt and --input")
        if self.input and not Path(self.input).exists():
            raise FileNotFoundError(f"--input {self.input}: not found")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def run(args: GenerateArgs) -> list[dict]:
    from floe_dist.data import load_task
    from floe_dist.generation import generate, stop_strings
    from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model
    from floe_dist.modeling.export import export_meta, load_adapter

    args.validate()
    if args.adapter:
        export_meta(args.adapter)  # a bad folder fails before a model loads
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    if args.input:
        examples = load_task(args.input, "all", data_format=args.data_format, columns=args.columns,
                             tokenizer=tokenizer)[: args.limit]
        prompts, references = [e.prompt for e in examples], [e.reference for e in examples]
    else:
        if args.chat and not tokenizer.chat_template:
            raise ValueError(f"--chat: the tokenizer of {args.model} has no chat template")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                                 add_generation_prompt=True) if args.chat else args.prompt]
        references = [""]
    lm = load_backbone(model_dir, args.quant, device)
    if args.adapter:
        load_adapter(lm, args.adapter)
    texts = generate(lm, tokenizer, prompts, max_new_tokens=args.max_new_tokens, stop=stop_strings(args.stop),
                     batch_size=args.batch_size, max_length=args.max_length, device=device)
    rows = [{"prompt": p, "generation": t, "reference": r} for p, t, r in zip(prompts, texts, references)]
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} generations -> {args.output}")
    else:
        for row in rows:
            print(row["generation"])
    return rows
