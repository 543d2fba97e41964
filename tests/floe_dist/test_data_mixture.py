"""Several sources mixed by weight, split sizes of the user's choosing, and a separate evaluation file: the
examples each split holds, and a mixture that trains, resumes exactly and evaluates from a recipe."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from floe_dist.data import load_data
from floe_dist.modeling.backbone import load_tokenizer, resolve_model
from tests.conftest import assert_resumes_exactly, recipe_for, run_floe
from tests.floe_dist.test_data_formats import alpaca_rows, sharegpt_rows, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("tiny"))


@pytest.fixture
def files(tmp_path):
    """40 alpaca rows under other names and 10 ShareGPT conversations."""
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(40))
    return alpaca, write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows(10))


def mixture(alpaca, sharegpt, **data):
    return {"sources": [{"task": str(alpaca), "weight": 3, "columns": "instruction=question,input=context,"
                                                                      "output=answer"},
                        {"task": str(sharegpt), "weight": 1, "data_format": "sharegpt"}], **data}


def origin(example) -> str:
    return "alpaca" if "### Instruction" in example.prompt else "sharegpt"


def test_split_sizes_as_fractions_or_counts_and_a_separate_evaluation_file(files, tokenizer):
    alpaca, sharegpt = files
    columns = "instruction=question,input=context,output=answer"
    sizes = lambda **data: [len(load_data(recipe_for("train", task=str(alpaca), columns=columns,  # noqa: E731
                                                     **{f"data__{k}": v for k, v in data.items()}).data, split,
                                          tokenizer)) for split in ("test", "train", "val", "fit")]
    assert sizes() == [12, 28, 7, 21]  # the default rule: 5/16 test, a quarter of train for validation
    assert sizes(test_size=0.25, val_size=6) == [10, 30, 6, 24]
    assert sizes(test_size=3) == [3, 37, 9, 28]
    held_out = recipe_for("train", task=str(alpaca), columns=columns, data__eval_task=str(sharegpt),
                          data__data_format="auto").data
    assert [origin(e) for e in load_data(held_out, "test", tokenizer)] == ["sharegpt"] * 10
    assert len(load_data(held_out, "train", tokenizer)) == 40  # all of the task trains
    with pytest.raises(ValueError, match="test_size=41 asks for more examples than there are"):
        sizes(test_size=41)


def test_a_mixture_draws_each_source_by_its_weight_seeded(files, tokenizer):
    data = recipe_for("train", data__sources=mixture(*files)["sources"]).data
    train = load_data(data, "train", tokenizer)
    # train splits: alpaca 28, sharegpt 7 -> 35 examples, 3:1 by weight: 26 alpaca, 9 sharegpt (7, then 2 again)
    assert Counter(origin(e) for e in train) == {"alpaca": 26, "sharegpt": 9}
    assert len({e for e in train if origin(e) == "alpaca"}) == 26
    assert len({e for e in train if origin(e) == "sharegpt"}) == 7
    assert load_data(data, "train", tokenizer) == train  # seeded: the same mixture every time
    test = load_data(data, "test", tokenizer)
    assert Counter(origin(e) for e in test) == {"alpaca": 12, "sharegpt": 3}  # every source's test split
    assert not set(test) & set(train)


def test_bad_mixtures_are_refused_by_name(files):
    from floe_dist.recipe import Recipe, from_dict

    problems = lambda data: from_dict(Recipe, {"data": data}).problems("data")  # noqa: E731
    assert problems({"sources": [{"file": "x"}]}) == [
        "data.sources[0]: needs a task; its keys are task, weight, data_format, columns, roles, hub_config, "
        "hub_split, hub_revision (not ['file'])"]
    assert problems({"sources": [{"task": "x", "weight": 0}]}) == ["data.sources[0]: weight must be > 0, got 0"]
    assert problems({"task": "boolq", "sources": [{"task": "x"}]}) == ["give data.task or data.sources, not both"]
    assert problems({"test_size": 2.5}) == ["data.test_size must be a fraction in [0, 1) or a whole count, got 2.5"]
    assert problems({"test_size": None, "val_size": None}) == []  # recipes saved before the shares were defaults


def test_a_two_source_mixture_trains_resumes_exactly_and_evaluates_from_a_recipe(files, tmp_path):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "tiny"}, "data": mixture(*files),
                                      "train": {"micro_batch": 2, "checkpoint_every": 3}}))
    whole = assert_resumes_exactly(recipe, tmp_path)
    assert json.loads((whole / "adapter" / "export.json").read_text())["task"].count("+") == 1
    run_floe(["evaluate", "--config", str(recipe), "--adapter", str(whole / "adapter"), "--max-new-tokens", "2",
              "--output", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["examples"] == 15  # 12 alpaca + 3 sharegpt
