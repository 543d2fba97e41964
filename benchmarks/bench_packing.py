"""Packing on the chat recipe: trained tokens per second and answer loss, packed against unpacked, at equal steps.

The data is bench_chat_turns.py's (allenai/basic_arithmetic, three questions to a conversation, 1,000
conversations in a JSONL file this script writes). Per arm, `floe-dist train` of recipes/smollm2-chat.yaml
(SmolLM2-135M-Instruct, uniform LoRA-MoE on q,v, one process, micro-batch 4 of max_length 256) with `data.pack`
false or true, the same steps and seed; then `floe-dist evaluate` on the first `--limit` test conversations
(answer loss of the last turn, exact and numeric match). Packed rows keep examples apart (position ids restart,
block-diagonal attention): a packed step trains several conversations per row, so the arms see different numbers
of examples in the same steps. Trained tokens are the non-padding tokens of the batches the trainer draws
(``floe_dist.data.train_batch``, recomputed here), over the train stage's wall time (model loading included).

    python benchmarks/bench_packing.py [--steps 40] [--limit 100] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_chat_turns import RECIPE, evaluate, floe, write_conversations  # noqa: E402
from benchmarks.result_file import write_result  # noqa: E402


def trained_tokens(data: Path, pack: bool, steps: int, seed: int) -> tuple[int, int]:
    """(non-padding tokens, examples) in the batches of `steps` optimizer steps, as the trainer draws them."""
    from floe_dist.data import load_data, tokenize, train_batch
    from floe_dist.data import pack as pack_rows
    from floe_dist.modeling.backbone import load_tokenizer, resolve_model
    from floe_dist.recipe import load_recipe

    recipe = load_recipe(RECIPE, ["--data.task", str(data), "--data.pack", str(pack).lower()])
    t, m = recipe.train, recipe.model
    tokenizer = load_tokenizer(resolve_model(m.name))
    rows = tokenize(load_data(recipe.data, t.split, tokenizer), tokenizer, m.max_length)
    rows = pack_rows(rows, m.max_length) if pack else rows
    tokens = examples = 0
    for step in range(steps):
        for micro in range(t.accumulation):
            batch = train_batch(rows, step=step, micro=micro, rank=0, world=1, micro_batch=t.micro_batch,
                                accumulation=t.accumulation, seed=seed, pad_id=tokenizer.pad_token_id)
            tokens += int(batch["attention_mask"].sum())
            if pack:  # an example starts where its position id is 0 (the padding's own block is not one)
                examples += int(((batch["position_ids"] == 0) & batch["attention_mask"].bool()).sum())
            else:
                examples += len(batch["input_ids"])
    return tokens, examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "arithmetic_chat.jsonl"
        conversations = write_conversations(data)
        for pack in (False, True):
            arm = "packed" if pack else "unpacked"
            run = tmp / arm
            start = time.time()
            floe("train", "--config", RECIPE, "--task", str(data), "--data.pack", str(pack).lower(),
                 "--train.steps", str(a.steps), "--train.seed", str(a.seed), "--output", str(run))
            seconds = time.time() - start
            tokens, examples = trained_tokens(data, pack, a.steps, a.seed)
            rows.append({"arm": arm, "seed": a.seed, "steps": a.steps, "train_s": round(seconds, 1),
                         "trained_tokens": tokens, "trained_examples": examples,
                         "tokens_per_s": round(tokens / seconds, 1),
                         **evaluate(data, run / "adapter", a.limit, tmp / f"{arm}.json")})
            print(json.dumps(rows[-1]), flush=True)
    write_result("packing", rows, conversations=conversations)


if __name__ == "__main__":
    main()
