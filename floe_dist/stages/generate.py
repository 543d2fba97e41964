"""``floe-dist generate``: what a base model or an adapter writes, for one prompt or a data file.

    floe-dist generate --model smollm2-135m --adapter runs/x/adapter --prompt "Calculate 5 + 91 =" --stop '\\n'
    floe-dist generate --model smollm2-135m --chat --prompt "Name three primes."
    floe-dist generate --adapter runs/x/adapter --input data.jsonl --data-format alpaca --output out.jsonl
    floe-dist generate --config my_recipe.yaml --generate.prompt "..."   # the recipe's model, adapter and data keys

A file is read like a task (any format, ``--columns`` mapping); each of its prompts is generated from and
written as one JSON line ``{"prompt", "generation", "reference"}``. LoRA-MoE adapters and NF4 backbones
load as ``evaluate`` loads them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from floe_dist.files import output_file, write_text_atomic
from floe_dist.recipe import Recipe

SECTIONS = ("generate", "model", "data", "parallel")  # parallel: on several ranks (distributed/sharded_eval.py)
OUTPUT = None  # printed; --output writes JSON lines instead
OUTPUT_FILE = "generations.jsonl"


def run(recipe: Recipe, output: str | None = None) -> list[dict]:
    from floe_dist.data import chat_template_text, load_task, reading_of
    from floe_dist.distributed.runtime import discover
    from floe_dist.distributed.sharded_eval import SINGLE, backbone_on_ranks
    from floe_dist.generation import generate, stop_strings
    from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model
    from floe_dist.modeling.export import export_meta, load_adapter

    recipe.validate(*SECTIONS)
    m, d, g = recipe.model, recipe.data, recipe.generate
    if g.prompt is None and g.input is None:
        raise ValueError("give generate.prompt (--prompt) or generate.input (--input)")
    if g.input and not Path(g.input).exists():
        raise FileNotFoundError(f"generate.input {g.input}: not found")
    if m.adapter:
        export_meta(m.adapter)  # a bad folder fails before a model loads
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = resolve_model(m.name)
    tokenizer = load_tokenizer(model_dir)
    if g.input:
        examples = load_task(g.input, "all", data_format=d.data_format, columns=d.columns, tokenizer=tokenizer,
                             **reading_of(d))[: g.limit]
        prompts, references = [e.prompt for e in examples], [e.reference for e in examples]
    else:
        template = chat_template_text(d.chat_template)
        if g.chat and not (template or tokenizer.chat_template):
            raise ValueError(f"generate.chat: the tokenizer of {m.name} has no chat template (set "
                             f"data.chat_template)")
        turns = ([{"role": "system", "content": d.system_prompt}] if d.system_prompt else []) + [
            {"role": "user", "content": g.prompt}]
        prompts = [tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True,
                                                 chat_template=template) if g.chat else g.prompt]
        references = [""]
    if discover().world_size > 1:
        lm, ranks, device = backbone_on_ranks(recipe, model_dir)
    else:
        ranks = SINGLE
        lm = load_backbone(model_dir, m.quant, device)
        lm.set_attn_implementation(m.attn_implementation)
        if m.adapter:
            load_adapter(lm, m.adapter)
    texts = ranks.gather(generate(lm, tokenizer, ranks.share(prompts), max_new_tokens=g.max_new_tokens,
                                  stop=stop_strings(g.stop), batch_size=g.batch_size, max_length=m.max_length,
                                  device=device, ranks=ranks))
    rows = [{"prompt": p, "generation": t, "reference": r} for p, t, r in zip(prompts, texts, references)]
    if ranks.rank:
        return rows  # rank 0 writes them
    if output:
        path = write_text_atomic(output_file(output, OUTPUT_FILE), "".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} generations -> {path}")
    else:
        for row in rows:
            print(row["generation"])
    return rows
