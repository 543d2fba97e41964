"""Hub datasets with their config, split and revision (offline, on a hub-style folder the test writes), and
training data read as a stream: its splits, the rows each rank reads, and a streamed run that resumes exactly."""
from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
import yaml

from floe_dist.data import load_task, pieces_of, token_rows, train_batch
from floe_dist.modeling.backbone import load_tokenizer, resolve_model
from floe_dist.recipe import Recipe, from_dict
from floe_dist.streaming import ExampleStream, RowStream, load_split
from tests.conftest import assert_resumes_exactly, recipe_for
from tests.floe_dist.test_data_formats import ALPACA_COLUMNS, alpaca_rows, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("tiny"))


def hub_folder(root, configs: dict[str, dict[str, list[dict]]]):
    """A hub-style dataset repository: data files per config and split, listed in its README.md card."""
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        (root / config).mkdir(parents=True)
        for split, rows in splits.items():
            write_jsonl(root / config / f"{split}.jsonl", rows)
            card += [f"  - split: {split}", f"    path: {config}/{split}.jsonl"]
    (root / "README.md").write_text("\n".join([*card, "---", ""]))
    return root


@pytest.fixture
def repo(tmp_path):
    rows = alpaca_rows(40)
    return hub_folder(tmp_path / "owner-gsm", {"main": {"train": rows[:30], "test": rows[30:]},
                                               "socratic": {"train": rows[:5]}})


def test_a_hub_style_dataset_is_read_in_its_config_and_split_and_what_it_lacks_is_named(repo, tokenizer):
    read = lambda **hub: load_task(str(repo), "all", columns=ALPACA_COLUMNS, tokenizer=tokenizer,  # noqa: E731
                                   hub=hub)
    assert len(read(hub_config="main")) == 30  # the train split by default
    test = read(hub_config="main", hub_split="test")
    assert [e.reference for e in test] == [r["answer"] for r in alpaca_rows(40)[30:]]
    assert len(read(hub_config="socratic")) == 5
    with pytest.raises(ValueError, match=r"BuilderConfig 'nope' not found\. Available: \['main', 'socratic'\]"):
        read(hub_config="nope")
    with pytest.raises(ValueError, match=r"Unknown split \"validation\"\. Should be one of \['train', 'test'\]"):
        read(hub_config="main", hub_split="validation")
    with pytest.raises(ValueError, match=r"Config name is missing.*\['main', 'socratic'\]"):
        read()
    file = write_jsonl(repo.parent / "plain.jsonl", alpaca_rows(4))
    with pytest.raises(ValueError, match="data.hub_config apply to hub datasets and hub-style folders, not to a"):
        load_task(str(file), "all", hub={"hub_config": "main"})
    import datasets

    saved = repo.parent / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(alpaca_rows(6)),
                          "test": datasets.Dataset.from_list(alpaca_rows(2))}).save_to_disk(str(saved))
    read_saved = lambda **hub: load_task(str(saved), "all", columns=ALPACA_COLUMNS, tokenizer=tokenizer,  # noqa: E731
                                         hub=hub)
    assert (len(read_saved()), len(read_saved(hub_split="test"))) == (6, 2)
    with pytest.raises(ValueError, match=r"saved: no split 'validation'; it has train, test \(set data.hub_split\)"):
        read_saved(hub_split="validation")
    with pytest.raises(ValueError, match="data.hub_revision apply to hub datasets and hub-style folders, not to a "
                                         "save_to_disk folder"):
        read_saved(hub_revision="v1")


def test_a_recipe_takes_the_hub_settings_for_its_task_and_for_each_source(repo, tokenizer):
    data = recipe_for("train", task=str(repo), columns=ALPACA_COLUMNS, data__hub_config="main",
                      data__hub_split="test").data
    assert len(load_split(data, "all", tokenizer)) == 10
    mixed = recipe_for("train", columns=ALPACA_COLUMNS, data__sources=[
        {"task": str(repo), "hub_config": "main", "hub_split": "test"},
        {"task": str(repo), "hub_config": "socratic"}]).data
    assert len(load_split(mixed, "all", tokenizer)) == 15


def streamed(path, **data):
    return recipe_for("train", task=str(path), columns=ALPACA_COLUMNS, data__streaming=True, **data).data


def test_streamed_splits_are_positions_in_the_stream(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40))
    whole = load_task(str(path), "all", columns=ALPACA_COLUMNS, tokenizer=tokenizer)  # in the file's order
    data = streamed(path, data__test_size=8, data__val_size=6)
    assert load_split(data, "test", tokenizer) == whole[:8]
    assert load_split(data, "val", tokenizer) == whole[8:14]
    fit, train = load_split(data, "fit", tokenizer), load_split(data, "train", tokenizer)
    assert isinstance(fit, ExampleStream) and list(fit) == whole[14:]
    assert list(train) == whole[8:] and train[:3] == whole[8:11]
    with pytest.raises(ValueError, match="data.val_size must be a count of examples"):
        load_split(streamed(path, data__test_size=8), "val", tokenizer)
    with pytest.raises(ValueError, match="the built-in task 'sst2' fits in memory"):
        load_split(recipe_for("train", data__streaming=True, data__test_size=8).data, "train", tokenizer)


def test_a_row_stream_reads_the_rows_train_batch_would_address_and_ranks_split_them(tmp_path, tokenizer):
    rows = alpaca_rows(9) + [{"question": "Say it.", "context": "", "answer": " ".join(["word"] * 30)}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = streamed(path, data__test_size=0, data__data_format="alpaca")
    examples = load_split(data, "train", tokenizer)
    want = [row[:2] for e in examples
            for row in token_rows(tokenizer([t for t, _ in pieces_of(e)], add_special_tokens=False).input_ids,
                                  [f for _, f in pieces_of(e)], 16)]
    stream = RowStream(examples, tokenizer, max_length=16)
    n = len(want)
    assert n == 10 and len(want[-1][0]) == 16  # every alpaca example is one row of <= 16 tokens
    assert stream.rows_at(3, 4) == want[3:7]
    assert stream.rows_at(n - 2, 5) == want[n - 2:] + want[:3]  # on into the next epoch
    assert stream.epoch_rows == n
    assert stream.rows_at(1, 2) == want[1:3]  # an earlier row: read again from the start
    assert stream.rows_at(2 * n + 5, 1) == want[5:6]

    one = lambda step, rank, world, micro: train_batch(  # noqa: E731
        RowStream(examples, tokenizer, 16), step=step, micro=0, rank=rank, world=world, micro_batch=micro,
        accumulation=1, seed=0, pad_id=tokenizer.pad_token_id)["input_ids"]
    unpadded = lambda batch: [row[row != tokenizer.pad_token_id].tolist() for row in batch]  # noqa: E731
    for step in range(3):  # 2 ranks of micro-batch 2 read what one rank of micro-batch 4 reads
        assert unpadded(one(step, 0, 2, 2)) + unpadded(one(step, 1, 2, 2)) == unpadded(one(step, 0, 1, 4))
        rows = [want[(4 * step + i) % n][0] for i in range(4)]
        assert unpadded(one(step, 0, 1, 4)) == [[t for t in ids if t != tokenizer.pad_token_id] for ids in rows]


def test_plain_text_longer_than_a_row_is_chunked_as_in_memory(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(["word"] * n)} for n in (3, 40, 5)])
    data = recipe_for("train", task=str(path), data__streaming=True, data__test_size=0).data
    stream = RowStream(load_split(data, "train", tokenizer), tokenizer, max_length=16)
    ids = [tokenizer(" ".join(["word"] * n) + tokenizer.eos_token, add_special_tokens=False).input_ids
           for n in (3, 40, 5)]
    want = [ids[0], ids[1][:16], ids[1][16:32], ids[1][32:], ids[2]]
    assert [r[0] for r in stream.rows_at(0, 5)] == want and [r[1] for r in stream.rows_at(0, 5)] == want


def test_streaming_settings_that_cannot_work_are_refused_by_the_recipe():
    problems = lambda data: from_dict(Recipe, {"data": data}).problems("data")  # noqa: E731
    need = ("data.streaming needs data.test_size as a count of examples (the first N of the stream are the test "
            "split; its length is not known before it is read) or data.eval_task (a separate test file)")
    assert problems({"task": "c.jsonl", "streaming": True}) == [need]
    assert problems({"task": "c.jsonl", "streaming": True, "test_size": 0.1}) == [need]
    assert problems({"task": "c.jsonl", "streaming": True, "test_size": 10}) == []
    assert problems({"task": "c.jsonl", "streaming": True, "eval_task": "e.jsonl"}) == []
    assert problems({"streaming": True, "test_size": 10, "sources": [{"task": "a.jsonl"}]}) == [
        "data.streaming reads one task, unpacked: it takes neither data.sources nor data.pack"]


def test_a_streamed_run_trains_and_resumes_at_the_exact_example(repo, tmp_path):
    recipe = tmp_path / "stream.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "tiny"}, "train": {"micro_batch": 2, "checkpoint_every": 3},
        "data": {"task": str(repo), "hub_config": "main", "columns": ALPACA_COLUMNS, "streaming": True,
                 "test_size": 4}}))
    whole = assert_resumes_exactly(recipe, tmp_path)
    assert json.loads((whole / "train.json").read_text())["steps"] == 6


def git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_a_git_clone_of_a_dataset_is_read_at_the_revision_asked_for(repo, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOE_DIST_CACHE", str(tmp_path / "cache"))
    read = lambda **hub: [e.reference for e in load_task(  # noqa: E731
        str(repo), "all", columns=ALPACA_COLUMNS, tokenizer=tokenizer, hub={"hub_config": "main", **hub})]
    first = read()
    git("init", "--quiet", "-b", "main", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "--quiet", "-m", "v1", cwd=repo)
    git("tag", "v1", cwd=repo)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    write_jsonl(repo / "main" / "train.jsonl", alpaca_rows(40)[:12])
    git("commit", "--quiet", "-am", "fewer rows", cwd=repo)
    assert read() == first[:12]  # the clone as it is checked out
    assert read(hub_revision="v1") == first == read(hub_revision=commit[:10])
    assert read(hub_revision="main") == first[:12]
    with pytest.raises(ValueError, match=r"no revision 'v9'; its branches and tags: main, v1 \(or a commit\)"):
        read(hub_revision="v9")
    # hub repositories keep data files in git LFS: the clone's fetched object stands in for the pointer
    test_file = (repo / "main" / "test.jsonl").read_bytes()
    oid = hashlib.sha256(test_file).hexdigest()
    (repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4]).mkdir(parents=True)
    (repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).write_bytes(test_file)
    for tag, stored in (("lfs", oid), ("unfetched", "0" * 64)):
        (repo / "main" / "test.jsonl").write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{stored}\n"
                                                  f"size {len(test_file)}\n")
        git("commit", "--quiet", "-am", tag, cwd=repo)
        git("tag", tag, cwd=repo)
    assert read(hub_revision="lfs", hub_split="test") == [r["answer"] for r in alpaca_rows(40)[30:]]
    with pytest.raises(ValueError, match=r"main/test.jsonl is stored with git LFS and the clone has not fetched it at "
                                         r"'unfetched': git -C .* lfs fetch origin unfetched"):
        read(hub_revision="unfetched", hub_split="test")
    checkouts = [d.name for d in (tmp_path / "cache" / "datasets" / "revisions").iterdir()]
    assert len(checkouts) == 3 and not any("." in name for name in checkouts)  # v1, main, lfs: none half-made
    plain = hub_folder(tmp_path / "plain", {"main": {"train": alpaca_rows(3)}})
    with pytest.raises(ValueError, match="data.hub_revision 'v1' needs a git clone of the dataset repository"):
        load_task(str(plain), "all", hub={"hub_config": "main", "hub_revision": "v1"})


def test_a_hub_dataset_that_cannot_be_loaded_names_those_cached_here(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("FLOE_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once, as a machine without a hub does
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "cache" / "datasets" / "allenai___ai2_arc" / "ARC-Easy").mkdir(parents=True)
    (tmp_path / "hub" / "datasets--openai--gsm8k" / "snapshots").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"hub dataset 'someone/missing' could not be loaded \(ConnectionError: .*\)\. "
                                         r"Hub datasets cached here: allenai/ai2_arc, openai/gsm8k\. Without"):
        load_task("someone/missing", "all")
