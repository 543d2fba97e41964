"""Recipes: the shipped files load, dotted overrides apply, bad keys fail, each stage reads its settings."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest

from floe_dist.recipe import SOURCES, Recipe, load_recipe, read_recipe, shipped_recipes, stage_settings, write_recipe
from floe_dist.stages.score import ScoreArgs
from floe_dist.stages.search import SearchArgs
from floe_dist.stages.train import TrainArgs
from tests.conftest import run_floe


def names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def test_the_default_recipe_is_the_dataclass_defaults_and_every_shipped_recipe_loads():
    assert {"smollm2-sst2", "tiny", "llama3-70b-2node"} <= set(shipped_recipes())
    assert load_recipe("smollm2-sst2") == Recipe() == load_recipe(None)
    for name in shipped_recipes():
        assert isinstance(load_recipe(name), Recipe)
    assert load_recipe("tiny").model.name == "tiny"


def test_dotted_overrides_change_one_setting_and_bad_ones_name_the_key():
    recipe = load_recipe("tiny", ["--train.lr", "1e-4", "--search.enabled", "false"])
    assert recipe.train.lr == 1e-4 and recipe.search.enabled is False
    assert {k for k, v in recipe.flat().items() if v != load_recipe("tiny").flat()[k]} == {"train.lr", "search.enabled"}
    with pytest.raises(ValueError, match="train.lrr"):
        load_recipe("tiny", ["--train.lrr", "1"])
    with pytest.raises(ValueError, match="train.steps"):
        load_recipe("tiny", ["--train.steps", "many"])
    with pytest.raises(FileNotFoundError, match="not a shipped recipe"):
        load_recipe("no-such-recipe")


def test_the_resolved_recipe_reads_back_equal(tmp_path):
    recipe = load_recipe("llama3-70b-2node", ["--train.steps", "7"])
    assert read_recipe(write_recipe(tmp_path, recipe)) == recipe


def test_each_stage_takes_its_settings_from_the_right_section():
    r = load_recipe("tiny", ["--parallel.zero", "2", "--search.zero", "0", "--score.seed", "5",
                             "--allocate.seed", "9", "--adapter.rank", "6", "--model.max_length", "128"])
    score = stage_settings("score", r, names(ScoreArgs))
    assert (score["seed"], score["zero"], score["rank"], score["model"]) == (5, "2", 6, "tiny")
    search = stage_settings("search", r, names(SearchArgs))
    assert (search["zero"], search["max_length"], search["micro_batch"]) == ("0", 128, r.search.micro_batch)
    train = stage_settings("train", r, names(TrainArgs))
    assert (train["zero"], train["rank"], train["lr"], train["ep_size"]) == ("2", 6, r.train.lr, 1)
    assert set(train) <= set(names(TrainArgs)) and "output" not in train
    TrainArgs(**train).validate()


def test_a_stage_run_from_a_recipe_with_an_explicit_flag_on_top(tmp_path):
    out = tmp_path / "alloc.json"
    run_floe(["allocate", "--config", "tiny", "--allocate.method", "uniform", "--adapter.rank", "3",
              "--experts", "2", "--output", str(out)])
    layers = json.loads(out.read_text())["layers"]
    module = layers["0"]["q_proj"]
    assert len(layers) == 4 and module["ranks"] == [3, 3]  # rank from the recipe, experts from the flag
    proc = run_floe(["allocate", "--adapter.rank", "3", "--output", str(out)], check=False)
    assert proc.returncode == 2 and "need --config" in proc.stderr


def test_the_70b_recipe_plans_and_renders_its_sbatch(tmp_path):
    plan = run_floe(["plan", "--config", "llama3-70b-2node", "--output", str(tmp_path / "plan.json")])
    result = json.loads((tmp_path / "plan.json").read_text())
    assert result["world_size"] == 16 and result["args"]["zero"] == 3 and "llama3-70b" in plan.stdout
    run_floe(["slurm", "--action", "render", "--config", "llama3-70b-2node", "--output", str(tmp_path / "c")])
    script = (tmp_path / "c" / "campaign.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert f"--config {tmp_path / 'c' / 'recipe.yaml'}" in script and "--parallel.nproc 8" in script
    assert read_recipe(tmp_path / "c" / "recipe.yaml") == load_recipe("llama3-70b-2node")


def test_every_recipe_setting_reaches_a_stage_argument_of_the_same_type():
    """The recipe restates the stages' settings (their flat flags stay for single-stage use): this keeps
    the two from drifting: no recipe key is dead, and each lands on a stage argument of its own type."""
    from floe_dist.stages.allocate import AllocateArgs
    from floe_dist.stages.evaluate import EvalArgs

    campaign_only = {"model.name", "model.shape", "allocate.method", "allocate.file", "search.enabled",
                     "search.allocations",
                     "parallel.nproc", "parallel.nodes", "parallel.launcher", "parallel.gpus_per_node"}
    stages = {"score": ScoreArgs, "allocate": AllocateArgs, "search": SearchArgs, "train": TrainArgs,
              "evaluate": EvalArgs}
    recipe, reached = Recipe(), set()
    for stage, cls in stages.items():
        types = {f.name: f.type for f in fields(cls)}
        for section in SOURCES[stage]:
            for f in fields(getattr(recipe, section)):
                if f.name in types:
                    assert f.type == types[f.name], (stage, f"{section}.{f.name}", f.type, types[f.name])
                    reached.add(f"{section}.{f.name}")
    assert set(recipe.flat()) - reached - campaign_only == set()
