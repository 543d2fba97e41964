"""Instruction, chat and text data through ``datasets``: formats, column mapping, loss masks, bad rows,
generation scoring, and the train -> evaluate -> generate path on a user's files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from floe_dist.data import Example, collate, encode, load_task, pack, read_file, tokenize, train_batch
from floe_dist.generation import numeric_answer, score_generations
from floe_dist.modeling.backbone import load_tokenizer, resolve_model
from tests.conftest import recipe_for, run_floe

ALPACA_COLUMNS = "instruction=question,input=context,output=answer"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("tiny"))


def alpaca_rows(n: int = 24) -> list[dict]:
    """Someone else's instruction data: their own field names, an optional context."""
    return [{"question": f"Add {i} and {i + 1}.", "context": "" if i % 3 else f"Both are below {i + 9}.",
             "answer": f"The answer is {2 * i + 1}."} for i in range(n)]


def chat_rows(n: int = 12) -> list[dict]:
    return [{"dialog": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."},
                        {"role": "user", "content": f"And {i + 1}?"}, {"role": "assistant", "content": f"{i + 1}."}]}
            for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_rows_train_on_the_response_only_and_end_with_eos(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
    examples = load_task(str(data), "all", data_format="alpaca", columns=ALPACA_COLUMNS, tokenizer=tokenizer)
    assert load_task(str(data), "all", columns=ALPACA_COLUMNS, tokenizer=tokenizer) == examples  # auto detects it
    first, second = examples[0], examples[1]
    assert "### Input:\nBoth are below 9." in first.prompt and "### Input" not in second.prompt
    assert first.prompt.endswith("### Response:\n") and first.choices == ("The answer is 1." + tokenizer.eos_token,)
    assert first.generative and first.reference == "The answer is 1."
    ids, n_answer = encode(tokenizer, first.prompt, first.choices[0], 256)
    batch = collate([(ids, n_answer)], tokenizer.pad_token_id)
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled == tokenizer(first.choices[0], add_special_tokens=False).input_ids
    assert labelled[-1] == tokenizer.eos_token_id


def test_chat_rows_learn_the_last_assistant_turn_under_the_chat_template(tmp_path, tokenizer):
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(chat_rows()))
    ex = load_task(str(data), "all", data_format="chat", columns="messages=dialog", tokenizer=tokenizer)[0]
    rendered = tokenizer.apply_chat_template(chat_rows()[0]["dialog"], tokenize=False)
    assert ex.prompt + ex.choices[0] == rendered  # the whole conversation, split before the last answer
    assert ex.prompt.endswith("<|im_start|>assistant\n") and "Say 0." in ex.prompt and ex.reference == "1."


def sharegpt_rows(n: int = 12) -> list[dict]:
    """chat_rows as ShareGPT writes them: conversations of from/value, roles human/gpt, a system turn."""
    return [{"conversations": [{"from": "system", "value": "Count."}]
             + [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in r["dialog"]]}
            for r in chat_rows(n)]


def test_sharegpt_files_read_as_the_same_chat_whether_detected_named_or_mapped_by_hand(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    detected = load_task(str(data), "all", tokenizer=tokenizer)
    assert load_task(str(data), "all", data_format="sharegpt", tokenizer=tokenizer) == detected
    by_hand = load_task(str(data), "all", data_format="chat", columns="messages=conversations,role=from,content=value",
                        roles="human=user,gpt=assistant", tokenizer=tokenizer)
    assert by_hand == detected
    messages = [{"role": "system", "content": "Count."}, *chat_rows(1)[0]["dialog"]]
    first = detected[0]
    assert first.prompt + first.choices[0] == tokenizer.apply_chat_template(messages, tokenize=False)
    assert "Count." in first.prompt and first.reference == "1."


def test_chat_keys_and_role_names_of_any_spelling_map_and_an_unmapped_role_is_named(tmp_path, tokenizer):
    rows = [{"turns": [{"speaker": "person", "text": f"Say {i}."}, {"speaker": "bot", "text": f"{i}."}]}
            for i in range(4)]
    data = write_jsonl(tmp_path / "own.jsonl", rows)
    examples = load_task(str(data), "all", data_format="chat", columns="messages=turns,role=speaker,content=text",
                         roles="person=user,bot=assistant", tokenizer=tokenizer)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Say 0."},
                                              {"role": "assistant", "content": "0."}], tokenize=False)
    assert examples[0].prompt + examples[0].choices[0] == expected
    with pytest.raises(ValueError, match=r"own.jsonl: row 1: role 'bot' is not one of .*roles: bot=user"):
        load_task(str(data), "all", data_format="chat", columns="messages=turns,role=speaker,content=text",
                  roles="person=user", tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"row 1: messages must be a list of \{role, content\}; map other keys"):
        load_task(str(data), "all", data_format="chat", columns="messages=turns", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="roles: expected YOURS=ROLE"):
        load_task(str(data), "all", data_format="chat", roles="bot", tokenizer=tokenizer)


def test_a_nested_column_maps_like_a_top_level_one(tmp_path, tokenizer):
    flat = write_jsonl(tmp_path / "flat.jsonl", alpaca_rows(6))
    nested = write_jsonl(tmp_path / "nested.jsonl", [{"meta": {"question": r["question"], "ctx": r["context"]},
                                                     "reply": {"text": r["answer"]}} for r in alpaca_rows(6)])
    expected = load_task(str(flat), "all", data_format="alpaca", columns=ALPACA_COLUMNS, tokenizer=tokenizer)
    columns = "instruction=meta.question,input=meta.ctx,output=reply.text"
    assert load_task(str(nested), "all", columns=columns, tokenizer=tokenizer) == expected  # auto detects it too
    with pytest.raises(ValueError, match=r"nested.jsonl: row 1: no column 'reply.body'"):
        load_task(str(nested), "all", data_format="alpaca", columns="instruction=meta.question,output=reply.body",
                  tokenizer=tokenizer)


def supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive trained tokens of a row."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + [current] if current else runs


def test_every_assistant_turn_is_trained_by_default_and_only_the_last_on_request(tmp_path, monkeypatch, tokenizer):
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(chat_rows(3)))
    common = dict(data_format="chat", columns="messages=dialog", tokenizer=tokenizer)
    every, last = (load_task(str(data), "all", train_on=t, **common) for t in ("all_assistant", "last_assistant"))
    assert [(e.prompt, e.choices) for e in every] == [(e.prompt, e.choices) for e in last]  # evaluation: last turn
    monkeypatch.setenv("FLOE_DIST_CACHE", str(tmp_path / "cache"))
    rows_every, rows_last = (tokenize(x, tokenizer, 256) for x in (every, last))
    turn = lambda text: tokenizer(text + "<|im_end|>\n", add_special_tokens=False).input_ids  # noqa: E731
    for i in range(3):
        assert rows_every[i]["input_ids"] == rows_last[i]["input_ids"]  # the same text, other labels
        # per turn: each assistant turn's tokens, as the template ends it, and nothing else is supervised
        assert supervised_runs(rows_every[i]["input_ids"], rows_every[i]["labels"]) == [turn(f"{i}."),
                                                                                        turn(f"{i + 1}.")]
        assert supervised_runs(rows_last[i]["input_ids"], rows_last[i]["labels"]) == [turn(f"{i + 1}.")]
    with pytest.raises(ValueError, match="train_on must be one of"):
        load_task(str(data), "all", train_on="every", **common)


GENERATION_TAGGED_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_the_prefix_rule_marks_the_tokens_transformers_assistant_mask_marks(tokenizer):
    """On a template with generation tags, its own spans (transformers' assistant-token mask, which floe-dist uses
    there) and the prefix rule (what a turn adds to the rendering before it; used elsewhere) pick the same
    tokens, and those are the mask's tokens."""
    from floe_dist.data import assistant_spans, prefix_spans, template_spans

    messages = [{"role": "system", "content": "Count."}, *chat_rows(1)[0]["dialog"]]
    by_tags = template_spans(tokenizer, messages, GENERATION_TAGGED_CHATML)
    assert by_tags == prefix_spans(tokenizer, messages, GENERATION_TAGGED_CHATML)
    assert assistant_spans(tokenizer, messages, GENERATION_TAGGED_CHATML) == by_tags
    full, spans = by_tags
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ours = [int(any(a <= start < b for a, b in spans)) for start, _ in encoded["offset_mapping"]]
    theirs = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                           chat_template=GENERATION_TAGGED_CHATML)
    assert theirs["input_ids"] == encoded["input_ids"]
    assert theirs["assistant_masks"] == ours and sum(ours) > 0 and len(spans) == 2
    # a template whose tags leave out the end-of-turn token: its own spans win over the prefix rule's
    narrow = GENERATION_TAGGED_CHATML.replace("{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}",
                                              "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '<|im_end|>\\n' }}")
    assert narrow != GENERATION_TAGGED_CHATML
    full, spans = assistant_spans(tokenizer, messages, narrow)
    assert [full[a:b] for a, b in spans] == ["0.", "1."]


def test_text_rows_are_all_answer_and_long_ones_are_chunked_not_cut(tmp_path, tokenizer):
    rows = [{"text": "word " * (5 + 300 * (i == 2))} for i in range(4)]
    examples = load_task(str(write_jsonl(tmp_path / "t.jsonl", rows)), "all", tokenizer=tokenizer)
    assert all(e.prompt == "" for e in examples)
    rows = tokenize(examples, tokenizer, 64)
    whole = tokenizer(examples[2].choices[0], add_special_tokens=False).input_ids
    chunks = -(-len(whole) // 64)
    assert len(rows) == 3 + chunks and sum(rows["cut"]) == 0 and chunks > 4
    assert [t for r in rows.select(range(2, 2 + chunks)) for t in r["input_ids"]] == whole  # every token, in order
    assert all(r["labels"] == r["input_ids"] and len(r["input_ids"]) <= 64 for r in rows)
    ids, n_answer = encode(tokenizer, examples[2].prompt, examples[2].choices[0], 64)  # evaluation: its first 64
    assert len(ids) == n_answer == 64


def test_csv_parquet_and_save_to_disk_read_the_same_examples(tmp_path, tokenizer):
    import datasets

    rows = alpaca_rows(8)
    frame = datasets.Dataset.from_list(rows)
    frame.to_csv(str(tmp_path / "a.csv"))
    frame.to_parquet(str(tmp_path / "a.parquet"))
    frame.save_to_disk(str(tmp_path / "saved"))
    want = read_file(write_jsonl(tmp_path / "a.jsonl", rows), "alpaca", ALPACA_COLUMNS, tokenizer)
    for source in ("a.parquet", "saved", "a.csv"):
        got = read_file(tmp_path / source, "alpaca", ALPACA_COLUMNS, tokenizer)
        assert got == want, source


def test_batches_stay_a_pure_function_so_ranks_split_one_rank_batch(tmp_path, tokenizer):
    examples = load_task(str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows())), "train", columns=ALPACA_COLUMNS,
                         tokenizer=tokenizer)
    kw = dict(step=3, micro=0, accumulation=1, seed=7, pad_id=tokenizer.pad_token_id)
    for rows in (tokenize(examples, tokenizer, 128), pack(tokenize(examples, tokenizer, 128), 128)):
        one = train_batch(rows, rank=0, world=1, micro_batch=4, **kw)
        parts = [train_batch(rows, rank=r, world=2, micro_batch=2, **kw) for r in (0, 1)]
        for key in ("input_ids", "labels"):
            got = [row[m.bool()].tolist() for p in parts for row, m in zip(p[key], p["attention_mask"])]
            assert got == [row[m.bool()].tolist() for row, m in zip(one[key], one["attention_mask"])]


class NoTokenizing:
    """A tokenizer that may be identified but not run: what a run that reuses the cache may touch."""

    def __init__(self, tokenizer):
        self.backend_tokenizer = tokenizer.backend_tokenizer

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenised again instead of reading the cache")


def test_examples_are_tokenised_once_into_a_cache_that_ranks_and_reruns_read(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("FLOE_DIST_CACHE", str(tmp_path / "cache"))
    examples = load_task(str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows())), "all", columns=ALPACA_COLUMNS,
                         tokenizer=tokenizer)
    rows = tokenize(examples, tokenizer, 40)
    for ex, row in zip(examples, rows):  # what encode + collate make of each example, cut alike
        ids, n_answer = encode(tokenizer, ex.prompt, ex.choices[0], 40)
        assert row["input_ids"] == ids and row["labels"] == collate([(ids, n_answer)], 0)["labels"][0].tolist()
    assert sum(rows["cut"]) == sum(len(tokenizer(e.prompt + e.choices[0]).input_ids) > 40 for e in examples) > 0
    cached = sorted((tmp_path / "cache" / "tokenized").glob("*.arrow"))
    assert [Path(f["filename"]) for f in rows.cache_files] == cached
    again = tokenize(examples, NoTokenizing(tokenizer), 40)  # another rank or a rerun: read, not recomputed
    assert again["input_ids"] == rows["input_ids"] and again.cache_files == rows.cache_files
    assert tokenize(examples[1:], tokenizer, 40).cache_files != rows.cache_files  # other data, another file
    assert tokenize(examples, tokenizer, 48).cache_files != rows.cache_files


def test_packing_lays_examples_end_to_end_in_order_within_max_length(tokenizer):
    examples = [Example("", (f"word {i} " * (1 + i % 7),), 0) for i in range(40)]
    rows = tokenize(examples, tokenizer, 32)
    packed = pack(rows, 32)
    assert len(packed) < len(rows) and all(len(ids) <= 32 for ids in packed["input_ids"])
    for key in ("input_ids", "labels"):  # nothing lost, nothing reordered
        assert sum(packed[key], []) == sum(rows[key], [])
    lengths = [len(ids) for ids in rows["input_ids"]]
    starts = {sum(lengths[:i]): i for i in range(len(rows))}  # stream offset where example i starts
    for row in range(len(packed) - 1):  # each row ends on an example's end, and only when the next would overflow
        end = len(sum(packed["input_ids"][:row + 1], []))
        assert end in starts and len(packed["input_ids"][row]) + lengths[starts[end]] > 32


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_packed_example_computes_what_it_computes_alone(tokenizer, attn):
    """Packed rows carry their examples' lengths; the batch restarts position ids at every example and the decoder
    masks attention block-diagonally, so each answer token's log-probability is the unpacked one (and the plain
    end-to-end packing this replaced, one causal mask over the row, was not)."""
    import torch

    from floe_dist.data import collate_labelled
    from floe_dist.modeling.answer_lm import AnswerLM
    from floe_dist.modeling.backbone import load_backbone

    examples = [Example(f"Question {i}:" + " word" * (2 + 5 * i), (f" answer {i}",), 0) for i in range(6)]
    rows = tokenize(examples, tokenizer, 48)
    packed = pack(rows, 48)
    assert len(packed) < len(rows) and max(len(lengths) for lengths in packed["lengths"]) >= 2
    assert [sum(lengths) for lengths in packed["lengths"]] == [len(ids) for ids in packed["input_ids"]]
    lm = load_backbone(resolve_model("tiny"))
    lm.set_attn_implementation(attn)

    def answer_logprobs(batch):  # every answer token's log-probability, in stream order
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if "position_ids" in inputs:
            inputs.pop("attention_mask")  # as AnswerLM does: the block-diagonal mask comes from the ids
        with torch.no_grad():
            logits = lm(**inputs).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        picked = target != -100
        return logits.log_softmax(-1)[picked].gather(-1, target[picked].unsqueeze(-1)).squeeze(-1)

    alone = collate_labelled(list(zip(rows["input_ids"], rows["labels"])), tokenizer.pad_token_id)
    together = collate_labelled(list(zip(packed["input_ids"], packed["labels"], packed["lengths"])),
                                tokenizer.pad_token_id)
    assert together["position_ids"][0].tolist()[:packed["lengths"][0][0] + 1] == [
        *range(packed["lengths"][0][0]), 0]  # the second example starts again at 0
    torch.testing.assert_close(answer_logprobs(together), answer_logprobs(alone), rtol=0, atol=1e-5)
    leaky = {k: v for k, v in together.items() if k != "position_ids"}  # one causal mask over each row
    assert (answer_logprobs(leaky) - answer_logprobs(alone)).abs().max() > 1e-3
    model = AnswerLM(lm)  # the training forward takes the packed batch as it comes
    torch.testing.assert_close(model(**together)["ce"], model(**alone)["ce"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,content,kwargs,message", [
    ("empty.jsonl", "", {}, "the file is empty"),
    ("broken.jsonl", '{"question": "a", "answer": "b"}\n{"question": \n', {"columns": ALPACA_COLUMNS},
     "row 2 is not JSON"),
    ("blank.jsonl", '{"question": "a", "answer": "b"}\n{"question": "c", "answer": ""}\n',
     {"data_format": "alpaca", "columns": "instruction=question,output=answer"}, "row 2: output must be a non-empty"),
    ("nocol.jsonl", '{"question": "a", "reply": "b"}\n', {"data_format": "alpaca", "columns": "instruction=question"},
     r"needs column\(s\) \['output'\]"),
    ("noturn.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', {"data_format": "chat"},
     "row 1: the chat has no assistant turn"),
    ("fmt.jsonl", '{"text": "a"}\n', {"data_format": "poem"}, "unknown data format 'poem'"),
    ("map.jsonl", '{"text": "a"}\n', {"data_format": "text", "columns": "body=text"}, "not fields of format 'text'"),
    ("what.jsonl", '{"a": 1}\n', {}, "cannot tell the format"),
    ("x.tsv", "a\tb\n", {}, "unknown data file type"),
    ("binary.jsonl", b"\x00\xff\xfe\x01 not text", {}, "not a UTF-8 text file"),
])
def test_bad_data_fails_naming_the_file_and_row(tmp_path, tokenizer, name, content, kwargs, message):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        read_file(path, tokenizer=tokenizer, **kwargs)
    assert name in str(err.value)


def test_a_hub_dataset_id_that_cannot_be_reached_says_how_to_bring_the_data_here(monkeypatch):
    import datasets
    import huggingface_hub

    for module in (datasets.config, huggingface_hub.constants):  # no hub: fail now, not after retries
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"hub dataset 'tatsu-lab/alpaca' could not be loaded.*save_to_disk\(DIR\)"):
        load_task("tatsu-lab/alpaca", "train", data_format="alpaca")


def test_chat_needs_a_tokenizer_with_a_template(tmp_path, tokenizer):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(chat_rows(2)))
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match="needs a chat template; this model.s tokenizer has none"):
            read_file(path, "chat", "messages=dialog", tokenizer)
    finally:
        tokenizer.chat_template = template


def test_generations_are_scored_by_normalised_exact_match_and_numeric_answer():
    assert numeric_answer("so #### 1,234") == "1234" and numeric_answer("The answer is 42.") == "42"
    assert numeric_answer("3 apples and 5 pears") == "5" and numeric_answer("none") is None
    scores = score_generations(["The Paris!", "#### 7", "8"], ["paris", "7", "9"])
    assert scores == {"exact_match": 2 / 3, "numeric_match": 1 / 3, "generated": 3}  # "#### 7" normalises to "7"


def test_arithmetic_is_a_generative_built_in_task_with_numeric_references(tokenizer):
    test = load_task("arithmetic", "test", tokenizer=tokenizer)
    assert len(test) == 937 and all(e.generative and numeric_answer(e.reference) == e.reference for e in test)
    assert test[0].prompt.startswith("Calculate ") and test[0].choices[0].endswith(tokenizer.eos_token)


def test_a_generative_task_scored_without_generations_keeps_its_loss_and_each_examples_share(tokenizer,
                                                                                              monkeypatch):
    """What a search trial with the loss objective asks for: the loss generation-free scoring gives is the full
    evaluation's, its per-example shares average to it (paired comparisons), and nothing is generated."""
    import torch

    from floe_dist import evaluation
    from floe_dist.modeling.backbone import load_backbone

    recipe = recipe_for("evaluate", model="tiny", task="arithmetic", limit=6, max_new_tokens=2, batch_size=4)
    lm = load_backbone(resolve_model("tiny")).eval()
    full = evaluation.evaluate_lm(recipe, lm, tokenizer, torch.device("cpu"), per_example=True)
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: pytest.fail("generated without being asked"))
    lean = evaluation.evaluate_lm(recipe, lm, tokenizer, torch.device("cpu"), per_example=True, generations=False)
    assert lean["loss"] == pytest.approx(full["loss"], rel=1e-6) and "exact_match" in full
    assert lean["accuracy"] is None and "exact_match" not in lean
    shares = lean["example_losses"]
    assert len(shares) == 6 and sum(shares) / 6 == pytest.approx(lean["loss"]) and len(set(shares)) > 1
    assert shares == pytest.approx(full["example_losses"], rel=1e-6)


def test_a_users_alpaca_and_chat_files_train_evaluate_and_generate(tmp_path):
    from floe_dist.stages import evaluate, generate, train

    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(chat_rows()))
    for data, columns, packed in ((alpaca, ALPACA_COLUMNS, True), (chat, "messages=dialog", False)):
        out = tmp_path / f"run-{data.stem}"
        common = dict(model="tiny", task=str(data), columns=columns)
        train.run(recipe_for("train", **common, pack=packed, steps=2, micro_batch=2, zero="0"), str(out))
        scored = evaluate.run(recipe_for("evaluate", **common, adapter=str(out / "adapter"), max_new_tokens=4))
        assert scored["examples"] > 0 and scored["loss"] > 0 and "exact_match" in scored and scored["samples"]
        gen = tmp_path / f"{data.stem}.out.jsonl"
        generate.run(recipe_for("generate", model="tiny", adapter=str(out / "adapter"), input=str(data),
                                columns=columns, limit=3, max_new_tokens=4), str(gen))
        rows = [json.loads(line) for line in gen.read_text().splitlines()]
        assert len(rows) == 3 and all(set(r) == {"prompt", "generation", "reference"} for r in rows)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*alpaca_rows(3), {"question": "q", "context": "", "answer": None}])
    proc = run_floe(["train", "--model", "tiny", "--task", str(bad), "--columns", ALPACA_COLUMNS, "--steps", "1",
                     "--output", str(tmp_path / "bad-run")], check=False)
    assert proc.returncode != 0 and "bad.jsonl: row 4: output must be a non-empty string" in proc.stderr
    assert not (tmp_path / "bad-run").exists()


def test_sharegpt_and_nested_alpaca_files_train_evaluate_and_generate_from_a_recipe(tmp_path):
    """The mapping lives in the recipe's data section; every stage reads the file through it."""
    import yaml

    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    nested = write_jsonl(tmp_path / "nested.jsonl", [{"meta": {"question": r["question"]}, "answer": r["answer"]}
                                                     for r in alpaca_rows()])
    for data, section in ((sharegpt, {"data_format": "sharegpt"}),
                          (nested, {"data_format": "alpaca", "columns": "instruction=meta.question,output=answer"})):
        recipe = tmp_path / f"{data.stem}.yaml"
        recipe.write_text(yaml.safe_dump({"model": {"name": "tiny"}, "data": {"task": str(data), **section},
                                          "train": {"steps": 2, "micro_batch": 2}}))
        out = tmp_path / f"run-{data.stem}"
        run_floe(["train", "--config", str(recipe), "--output", str(out)])
        scored = run_floe(["evaluate", "--config", str(recipe), "--adapter", str(out / "adapter"),
                           "--evaluate.max_new_tokens", "4", "--output", str(tmp_path / f"{data.stem}.eval.json")])
        result = json.loads((tmp_path / f"{data.stem}.eval.json").read_text())
        assert result["examples"] > 0 and result["loss"] > 0 and "exact_match" in result, scored.stdout
        gen = tmp_path / f"{data.stem}.out"  # a folder, as every command's --output: generations.jsonl inside
        proc = run_floe(["generate", "--config", str(recipe), "--adapter", str(out / "adapter"), "--input", str(data),
                         "--limit", "2", "--max-new-tokens", "4", "--output", str(gen)])
        assert len((gen / "generations.jsonl").read_text().splitlines()) == 2
        assert f"-> {gen / 'generations.jsonl'}" in proc.stdout


def test_a_named_or_file_chat_template_serves_a_tokenizer_without_one_and_a_system_prompt_opens_each_chat(
        tmp_path, tokenizer):
    from floe_dist.data import CHAT_TEMPLATES

    data = tmp_path / "chat.json"
    data.write_text(json.dumps(chat_rows(2)))
    own = load_task(str(data), "all", data_format="chat", columns="messages=dialog", tokenizer=tokenizer)
    (tmp_path / "chatml.jinja").write_text(CHAT_TEMPLATES["chatml"])
    template, tokenizer.chat_template = tokenizer.chat_template, None  # a base checkpoint's tokenizer
    try:
        named, from_file = (load_task(str(data), "all", data_format="chat", columns="messages=dialog",
                                      chat_template=t, tokenizer=tokenizer)
                            for t in ("chatml", str(tmp_path / "chatml.jinja")))
        with pytest.raises(ValueError, match="set data.chat_template to chatml or a Jinja file"):
            load_task(str(data), "all", data_format="chat", columns="messages=dialog", tokenizer=tokenizer)
        with pytest.raises(ValueError, match="neither a template name"):
            load_task(str(data), "all", data_format="chat", columns="messages=dialog", chat_template="llama9",
                      tokenizer=tokenizer)
        prompted = load_task(str(data), "all", data_format="chat", columns="messages=dialog", chat_template="chatml",
                             system_prompt="Count.", tokenizer=tokenizer)
    finally:
        tokenizer.chat_template = template
    assert named == from_file and named != own  # SmolLM2's own template adds its default system turn
    assert named[0].prompt.startswith("<|im_start|>user\nSay 0.<|im_end|>\n") and named[0].segments
    assert prompted[0].prompt.startswith("<|im_start|>system\nCount.<|im_end|>\n<|im_start|>user\nSay 0.")
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(2))
    instructed = load_task(str(alpaca), "all", columns=ALPACA_COLUMNS, system_prompt="Answer briefly.",
                           tokenizer=tokenizer)
    assert instructed[0].prompt.startswith("Answer briefly.\n\n### Instruction:\nAdd 0 and 1.")


def test_the_shipped_chat_recipe_runs_a_campaign_on_a_multi_turn_chat_file(tmp_path):
    """recipes/smollm2-chat.yaml end to end (on the tiny model), on the conversations its benchmark writes."""
    from benchmarks.bench_chat_turns import TURNS, write_conversations

    data = tmp_path / "arithmetic_chat.jsonl"
    assert write_conversations(data) == 1000
    assert len(json.loads(data.read_text().splitlines()[0])["messages"]) == 2 * TURNS
    out = tmp_path / "chat"
    run_floe(["campaign", "--config", "smollm2-chat", "--model.name", "tiny", "--data.task", str(data),
              "--train.steps", "2", "--evaluate.limit", "4", "--evaluate.max_new_tokens", "2", "--output", str(out)])
    summary = json.loads((out / "campaign.json").read_text())
    final = json.loads((out / "final_eval.json").read_text())
    assert summary["task"] == str(data) and final["examples"] == 4 and "exact_match" in final and final["loss"] > 0
