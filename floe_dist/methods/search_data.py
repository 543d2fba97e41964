"""The model and data of the allocators that search on the task itself (Flexora, GuiLoMo)."""
from __future__ import annotations

import itertools
from collections.abc import Iterator

from floe_dist.data import Example, tokenize, train_batch
from floe_dist.streaming import load_split


def load_for_search(recipe, hold_out: int, device="cpu"):
    """(tokenizer, backbone, training examples, held-out examples): the last ``hold_out`` training
    examples are held out (none when 0). The backbone is frozen by the caller's injection."""
    from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model

    d = recipe.data
    model_dir = resolve_model(recipe.model.name)
    tokenizer = load_tokenizer(model_dir)
    examples = load_split(d, "train", tokenizer)
    if d.streaming:  # these allocators hold their examples in memory
        if d.max_train_examples is None:
            raise ValueError("allocate.method flexora and guilomo hold their training examples in memory: with "
                             "data.streaming, set data.max_train_examples to how many of the stream they read")
        examples = examples[: d.max_train_examples]
    if len(examples) <= hold_out:
        raise ValueError(f"holding out {hold_out} examples leaves none to train on ({len(examples)} in all)")
    train, held = (examples[:-hold_out], examples[-hold_out:]) if hold_out else (examples, [])
    lm = load_backbone(model_dir, recipe.model.quant, device)
    lm.set_attn_implementation(recipe.model.attn_implementation)
    return tokenizer, lm, train, held


def batch_stream(examples: list[Example], tokenizer, batch: int, seed: int, max_length: int, rank: int = 0,
                 world: int = 1, device="cpu") -> Iterator[dict]:
    """Endless seeded batches of ``batch`` examples (the trainer's sample order); with ``world`` ranks
    each yields its ``batch / world`` share, so the ranks together see what one process would."""
    if batch % world:
        raise ValueError(f"a batch of {batch} examples does not split over {world} ranks")
    rows = tokenize(examples, tokenizer, max_length)
    return ({k: v.to(device) for k, v in train_batch(
        rows, step=s, micro=0, rank=rank, world=world, micro_batch=batch // world, accumulation=1, seed=seed,
        pad_id=tokenizer.pad_token_id).items()} for s in itertools.count())
