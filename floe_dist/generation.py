"""Greedy generation in batches, and how a generation is scored against its reference.

Exact match uses SQuAD's normalisation (lower case, no punctuation, no articles, single spaces); the
numeric answer is GSM8K's ``#### 42``, else "the answer is 42", else the last number in the text.
"""
from __future__ import annotations

import re
import string
from collections.abc import Callable

import torch

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def longest_first(lengths: list[int]) -> list[int]:
    """Positions of ``lengths`` from the longest to the shortest (ties in order): evaluation batches of alike lengths
    carry little padding (in file order a batch of 32 carried 1.39-1.83 times its prompts' tokens on SST-2, Social
    IQa and BoolQ test prompts), and the longest runs first, so a batch too large for memory fails at once
    (lm-eval-harness orders its requests so)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


@torch.no_grad()
def generate(lm, tokenizer, prompts: list[str], *, max_new_tokens: int, stop: list[str], batch_size: int,
             max_length: int, device, ranks=None, until: Callable[[], bool] | None = None) -> list[str] | None:
    """What ``lm`` writes after each prompt, in the prompts' order, cut at the first stop string (greedy, in
    left-padded batches taken longest first: ``longest_first``). With partitioned ``ranks``
    (floe_dist/distributed/sharded_eval.py) these prompts are this rank's share, and every rank runs as many
    batches and token steps as the busiest (transformers' ``synced_gpus``). ``until`` (one process) is asked before
    each batch: None once it is true (an evaluation that may stop: floe_dist/evaluation.py)."""
    from tqdm import tqdm

    partitioned = ranks is not None and ranks.partitioned
    lm.eval()
    keep = max(1, max_length - max_new_tokens)  # prompts cut from the left, as in training

    def write(ids: list[list[int]]) -> torch.Tensor:
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        out = lm.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, use_cache=True, temperature=None, top_p=None,
                          top_k=None, **({"synced_gpus": True} if partitioned else {}))
        return out[:, width:]

    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids[-keep:] for p in prompts]
    order, texts = longest_first([len(ids) for ids in prompt_ids]), [""] * len(prompts)
    batches = (ranks.chunks(order, batch_size, lambda: write([[tokenizer.pad_token_id]])) if ranks else
               (order[start:start + batch_size] for start in range(0, len(order), batch_size)))
    for chunk in tqdm(batches, total=-(-len(prompts) // batch_size), desc="generate", leave=False,
                      disable=bool(ranks and ranks.rank)):
        if until is not None and until():
            return None
        for i, text in zip(chunk, tokenizer.batch_decode(write([prompt_ids[i] for i in chunk]),
                                                         skip_special_tokens=True)):
            text = text.lstrip()  # a leading newline is not the end of an answer
            for s in stop:
                text = text.split(s)[0]
            texts[i] = text.strip()
    return texts


def stop_strings(text: str) -> list[str]:
    """``--stop`` as a list: strings separated by ``||``, with ``\\n`` written for a newline."""
    return [s.replace("\\n", "\n") for s in text.split("||") if s]


def normalise(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def numeric_answer(text: str) -> str | None:
    """The answer's number as a canonical string, or None."""
    found = (re.search(rf"####\s*({_NUMBER})", text) or re.search(rf"answer is\s*\$?({_NUMBER})", text, re.I))
    number = found.group(1) if found else (re.findall(_NUMBER, text) or [None])[-1]
    if number is None:
        return None
    number = number.replace(",", "")
    return str(float(number)).removesuffix(".0") if "." in number else str(int(number))


def score_generations(generations: list[str], references: list[str]) -> dict[str, float]:
    n = max(len(references), 1)
    exact = sum(normalise(g) == normalise(r) for g, r in zip(generations, references))
    numeric = sum(numeric_answer(r) is not None and numeric_answer(g) == numeric_answer(r)
                  for g, r in zip(generations, references))
    return {"exact_match": exact / n, "numeric_match": numeric / n, "generated": len(generations)}
