"""``floe-dist evaluate``: multiple-choice accuracy by log-likelihood of each choice.

Each (prompt, choice) pair is scored by the summed log-probability of the choice tokens given the
prompt; the prediction is the highest-scoring choice (lm-eval-harness's ``acc``). Runs in one
process on the exported adapter, so evaluation also proves the export loads back.

    floe-dist evaluate --model smollm2-135m --task sst2 --adapter runs/x/adapter
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from floe_dist.config import arg
from floe_dist.data import Example, collate, encode, load_task
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model


@dataclass
class EvalArgs:
    model: str = arg("smollm2-135m", "base model: smollm2-135m, tiny, a HF folder or a .gguf file")
    task: str = arg("sst2", "sst2, boolq, or a JSONL file of {prompt, choices, label}")
    split: str = arg("test", "test, train, all, or the search's parts of train: fit, val")
    adapter: str | None = arg(None, "an export folder written by train; none = the zero-shot base model")
    quant: str = arg("none", "backbone precision: none (fp32 on CPU / bf16 on GPU) or nf4")
    batch_size: int = arg(32, "examples per forward pass (each choice of an example is scored)")
    max_length: int = arg(256, "truncate prompt + answer to this many tokens")
    limit: int | None = arg(None, "evaluate only the first N examples of the split")


@torch.no_grad()
def choice_scores(model: AnswerLM, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                  device: torch.device, progress: bool = True) -> list[list[float]]:
    """Summed log-probability of every choice of every example."""
    flat = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.choices))]
    scores = [[0.0] * len(ex.choices) for ex in examples]
    model.eval()
    for start in tqdm(range(0, len(flat), batch_size), desc="evaluate", disable=not progress, leave=False):
        chunk = flat[start:start + batch_size]
        batch = collate([encode(tokenizer, examples[i].prompt, examples[i].choices[c], max_length)
                         for i, c in chunk], tokenizer.pad_token_id)
        out = model(**{k: v.to(device) for k, v in batch.items()})
        for (i, c), s in zip(chunk, out["seq_logprob"].tolist()):
            scores[i][c] = s
    return scores


def accuracy(scores: list[list[float]], examples: list[Example]) -> float:
    hits = sum(max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, examples))
    return hits / len(examples)


def choice_loss(scores: list[list[float]], examples: list[Example]) -> float:
    """Mean cross-entropy of the right choice under a softmax over the choices' log-likelihoods:
    a smooth stand-in for 1 - accuracy, the objective of ``floe-dist search``."""
    total = 0.0
    for s, ex in zip(scores, examples):
        total -= torch.log_softmax(torch.tensor(s, dtype=torch.float64), 0)[ex.label].item()
    return total / len(examples)


def run(args: EvalArgs) -> dict:
    from floe_dist.modeling.export import export_meta, load_adapter

    start = time.time()
    if args.adapter:
        meta = export_meta(args.adapter)  # fail early on a bad folder, before loading a model
        if meta.get("quant", "none") != args.quant:
            print(f"note: adapter was trained with quant={meta.get('quant')}, evaluating with {args.quant}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    lm = load_backbone(model_dir, args.quant, device)
    if args.adapter:
        load_adapter(lm, args.adapter)
    examples = load_task(args.task, args.split)[: args.limit]
    model = AnswerLM(lm)
    model.reset_activity()
    scores = choice_scores(model, tokenizer, examples, args.batch_size, args.max_length, device)
    result = {"task": args.task, "split": args.split, "examples": len(examples),
              "accuracy": accuracy(scores, examples), "choice_loss": choice_loss(scores, examples),
              "active_parameters_per_token": model.active_parameters_per_token() if args.adapter else 0,
              "adapter": args.adapter, "seconds": time.time() - start}
    print(f"{args.task}/{args.split}: accuracy {result['accuracy']:.4f} on {len(examples)} examples "
          f"({'adapter ' + args.adapter if args.adapter else 'zero-shot'}, {result['seconds']:.0f}s)")
    return result
