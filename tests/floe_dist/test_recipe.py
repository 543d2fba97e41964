"""Settings: one tree, each setting declared once with one default; every stage parses it the same way."""
from __future__ import annotations

import importlib
import json
import pkgutil
import types
from dataclasses import dataclass, fields, is_dataclass

import pytest
import yaml

import floe_dist
import launcher
from floe_dist.config import arg
from floe_dist.recipe import (
    Recipe,
    field_paths,
    from_dict,
    load_recipe,
    read_recipe,
    section_paths,
    shipped_recipes,
    write_recipe,
)
from launcher.cli import RECIPE_COMMANDS, TOOL_COMMANDS, aliases, expand_aliases
from tests.conftest import run_floe, run_here

# Tools with options of their own: `slurm` names the job's shape (nodes, ranks per node, GPUs) with flags whose
# defaults come from the job's recipe (SlurmArgs.resolve_shape), not from a second declaration.
TOOLS_WITH_OWN_OPTIONS = {"SlurmArgs"}


def declared_fields(modules) -> dict[str, list[str]]:
    """{field name: ["Class.field", ...]} of every dataclass field declared with ``arg()`` (a help line)."""
    found: dict[str, list[str]] = {}
    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, type) and is_dataclass(obj) and obj.__module__ == module.__name__:
                for f in fields(obj):
                    if "help" in f.metadata:
                        found.setdefault(f.name, []).append(f"{obj.__name__}.{f.name}")
    return found


def redeclared(modules, recipe=Recipe) -> list[str]:
    """Settings declared outside the recipe tree again (a second definition, a second default), and names used
    twice inside it for one setting (the same help line)."""
    sections = {cls.__name__ for cls in [recipe, *section_paths(recipe).values()]}
    keys = field_paths(recipe)
    problems = []
    for name, places in declared_fields(modules).items():
        outside = [p for p in places if p.split(".")[0] not in sections | TOOLS_WITH_OWN_OPTIONS]
        if outside and any(key.rsplit(".", 1)[1] == name for key in keys):
            problems.append(f"{name}: declared in the recipe and again in {outside}")
        elif len(outside) > 1:
            problems.append(f"{name}: declared {len(outside)} times outside the recipe: {outside}")
    helps: dict[tuple[str, str], list[str]] = {}
    for key, f in keys.items():
        helps.setdefault((key.rsplit(".", 1)[1], f.metadata["help"]), []).append(key)
    problems += [f"{keys_} are one setting declared {len(keys_)} times" for keys_ in helps.values() if len(keys_) > 1]
    return problems


def package_modules() -> list[types.ModuleType]:
    names = [m.name for pkg in (floe_dist, launcher) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return [importlib.import_module(n) for n in names if not n.endswith("__main__")]


def test_every_setting_is_declared_once_and_the_check_catches_a_second_declaration():
    modules = package_modules()
    assert redeclared(modules) == []

    copy = types.ModuleType("copy_of_a_stage")

    @dataclass
    class TrainArgs:  # a stage that declares train.steps again, with its own default
        steps: int = arg(40, "optimizer steps")

    TrainArgs.__module__ = copy.__name__
    copy.TrainArgs = TrainArgs
    assert redeclared([*modules, copy]) == ["steps: declared in the recipe and again in ['TrainArgs.steps']"]


def test_the_default_recipe_is_the_dataclass_defaults_and_every_shipped_recipe_loads():
    assert {"smollm2-sst2", "tiny", "llama3-70b-2node"} <= set(shipped_recipes())
    assert load_recipe("smollm2-sst2") == Recipe() == load_recipe(None)
    for name in shipped_recipes():
        assert isinstance(load_recipe(name), Recipe)
    assert load_recipe("tiny").model.name == "tiny"


def test_dotted_overrides_change_one_setting_and_bad_ones_name_the_key():
    recipe = load_recipe("tiny", ["--train.lr", "1e-4", "--search.enabled", "false", "--allocate.flexora.steps", "3"])
    assert recipe.train.lr == 1e-4 and recipe.search.enabled is False and recipe.allocate.flexora.steps == 3
    tiny = load_recipe("tiny").flat()
    changed = {k for k, v in recipe.flat().items() if v != tiny[k]}
    assert changed == {"train.lr", "search.enabled", "allocate.flexora.steps"}
    with pytest.raises(ValueError, match="train.lrr"):
        load_recipe("tiny", ["--train.lrr", "1"])
    with pytest.raises(ValueError, match="train.steps"):
        load_recipe("tiny", ["--train.steps", "many"])
    with pytest.raises(ValueError, match="score.mode"):  # choices are types: a misspelt one fails while parsing
        load_recipe("tiny", ["--score.mode", "gain"])
    with pytest.raises(FileNotFoundError, match="not a shipped recipe"):
        load_recipe("no-such-recipe")


NATURAL = """\
parallel: {zero: 3}
adapter: {targets: [q_proj, v_proj]}
search: {ranks: [4, 8, 16], lr: [2.0e-4, 3.0e-3], experts: [2, 4], allocations: [uniform, "floe:2"]}
data:
  columns: {instruction: question, output: answer}
  roles: {human: user}
  sources:
    - {task: a.jsonl, columns: {instruction: question}}
allocate: {hilo: {expert_schedule: [2, 4, 6, 8]}}
train: {report_to: [tensorboard, mlflow]}
evaluate: {stop: ["\\n", "###"], lm_eval_tasks: [hellaswag, arc_easy]}
campaign: {budget: 900}
"""
COMPACT = ["--parallel.zero", "3", "--adapter.targets", "q_proj,v_proj", "--search.ranks", "4,8,16",
           "--search.lr", "2e-4:3e-3", "--search.experts", "2,4", "--search.allocations", "uniform,floe:2",
           "--data.columns", "instruction=question,output=answer", "--data.roles", "human=user",
           "--data.sources", '[{"task": "a.jsonl", "columns": "instruction=question"}]',
           "--allocate.hilo.expert_schedule", "2468", "--train.report_to", "tensorboard,mlflow",
           "--evaluate.stop", "\\n||###", "--evaluate.lm_eval_tasks", "hellaswag,arc_easy", "--campaign.budget", "900"]


def test_lists_ranges_and_maps_are_plain_yaml_and_the_compact_strings_still_parse(tmp_path):
    from floe_dist.recipe import parse_recipe

    (tmp_path / "natural.yaml").write_text(NATURAL)
    natural = parse_recipe(["--config", str(tmp_path / "natural.yaml")])[0]
    assert natural == parse_recipe(COMPACT)[0] and natural.problems() == []
    assert (natural.search.ranks, natural.search.lr, natural.parallel.zero) == ("4,8,16", "2e-4:3e-3", "3")
    assert natural.data.sources == [{"task": "a.jsonl", "columns": "instruction=question"}]
    assert read_recipe(write_recipe(tmp_path, natural)) == natural  # recipe.yaml holds the compact strings
    assert from_dict(Recipe, yaml.safe_load(NATURAL)) == natural  # as a stage's saved recipe is read back


@pytest.mark.parametrize("yaml_text,message", [
    ("train: {lr: [1.0e-3]}", "train.lr: expected one float, got [0.001]"),
    ("search: {ranks: [a, b]}", "search.ranks: expected a list of integers >= 1"),
    ("search: {mode: bayes}", "search.mode: expected one of 'smac', 'bo', 'random', 'grid', got bayes"),
    ("adapter: {targets: {q: v}}", "adapter.targets: expected a list of names"),
])
def test_a_value_of_the_wrong_shape_names_its_setting_and_what_it_takes(tmp_path, yaml_text, message):
    from floe_dist.recipe import parse_recipe

    (tmp_path / "bad.yaml").write_text(yaml_text)
    with pytest.raises(ValueError) as err:
        parse_recipe(["--config", str(tmp_path / "bad.yaml")])
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_bad_values_in_yaml_form_are_listed_by_the_recipe_check(tmp_path):
    (tmp_path / "bad.yaml").write_text("search: {ranks: [0, 4], lr: [3.0e-3, 2.0e-4], time_limit: -5}\n"
                                       "train: {time_limit: 0}\n"
                                       "data: {sources: [{task: a.jsonl, columns: [question]}]}\n")
    found = load_recipe(str(tmp_path / "bad.yaml")).problems()
    assert "search.time_limit must be > 0 seconds (or none), got -5.0" in found
    assert "train.time_limit must be > 0 seconds (or none), got 0.0" in found
    assert "search.ranks needs integers >= 1, got '0,4'" in found
    assert any(p.startswith("search.lr needs 0 < LO <= HI") for p in found)
    assert any(p.startswith("data.sources[0].columns: expected a map") for p in found)


def test_the_resolved_recipe_reads_back_equal(tmp_path):
    recipe = load_recipe("llama3-70b-2node", ["--train.steps", "7", "--allocate.guilomo.order", "first"])
    assert read_recipe(write_recipe(tmp_path, recipe)) == recipe


def test_short_flags_are_aliases_of_the_first_section_of_the_stage_that_has_the_name():
    assert aliases(("train", "adapter", "allocate", "model", "data", "parallel"))["micro_batch"] == "train.micro_batch"
    assert aliases(("search", "allocate", "model", "data"))["micro_batch"] == "search.micro_batch"
    assert aliases(("score", "adapter"))["seed"] == "score.seed"
    assert aliases(("allocate",))["flexora_steps"] == "allocate.flexora.steps"
    assert aliases(("allocate",))["expert_schedule"] == "allocate.hilo.expert_schedule"
    assert expand_aliases(["--model", "tiny", "--pack", "--no-gradient-checkpointing", "--zero=3", "--train.lr", "1",
                           "--output", "o"], ("train", "model", "data", "parallel"), {"output"}) == [
        "--model.name", "tiny", "--data.pack", "true", "--train.gradient_checkpointing", "false", "--parallel.zero=3",
        "--train.lr", "1", "--output", "o"]


def cli_stdout(argv: list[str], capsys) -> str:
    """What ``floe-dist ARGV`` prints before it exits with status 0 (--help, --print_config), run in this process
    (the same ``launcher.cli.main`` a subprocess runs, without 4 s of interpreter start per call)."""
    from launcher.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code in (0, None), argv
    return capsys.readouterr().out


def test_every_command_prints_the_settings_the_campaign_resolves(capsys):
    """`STAGE --config R --print_config` is the campaign's resolved recipe: a stage alone runs what the campaign's
    stage runs, and with no --config both are the default recipe."""
    for config in ([], ["--config", "tiny"]):
        campaign = yaml.safe_load(cli_stdout(["campaign", *config, "--train.steps", "9", "--print_config"], capsys))
        campaign_output = campaign.pop("output")
        expected = load_recipe(config[1] if config else None, ["--train.steps", "9"])
        assert read_recipe_dict(campaign) == expected
        for stage in sorted(RECIPE_COMMANDS):
            printed = yaml.safe_load(cli_stdout([stage, *config, "--train.steps", "9", "--print_config"], capsys))
            assert printed.pop("output") != campaign_output or stage == "campaign"  # each command's own folder
            assert printed == campaign, stage


def read_recipe_dict(data: dict) -> Recipe:
    from floe_dist.recipe import from_dict

    return from_dict(Recipe, {k: v for k, v in data.items() if k not in ("config", "output")})


def test_every_command_has_help_for_every_option(capsys):
    for stage in [*RECIPE_COMMANDS, *TOOL_COMMANDS]:
        # a recipe (--config) where the command runs one: every stage, and slurm's job; not export
        assert ("--config" in cli_stdout([stage, "--help"], capsys)) == (stage != "export"), stage
    train_help = cli_stdout(["train", "--help"], capsys)
    assert "train: the final training of the chosen adapter" in train_help and "--train.steps" in train_help
    assert "lm-eval" in cli_stdout(["--help"], capsys)
    assert run_floe(["train", "--help"]).stdout == train_help  # the same in a process of its own


def test_a_stage_run_from_a_recipe_with_a_short_flag_on_top(tmp_path):
    out = tmp_path / "alloc.json"
    run_floe(["allocate", "--config", "tiny", "--allocate.method", "uniform", "--adapter.rank", "3",
              "--experts", "2", "--output", str(out)])
    layers = json.loads(out.read_text())["layers"]
    module = layers["0"]["q_proj"]
    assert len(layers) == 4 and module["ranks"] == [3, 3]  # rank from the dotted key, experts from the short flag
    proc = run_here(["allocate", "--model", "tiny", "--adapter.rank", "0", "--output", str(out)])
    assert proc.returncode == 2 and "adapter.rank must be >= 1" in proc.stderr


def test_the_70b_recipe_plans_and_renders_its_sbatch(tmp_path):
    plan = run_floe(["plan", "--config", "llama3-70b-2node", "--output", str(tmp_path / "plan.json")])
    result = json.loads((tmp_path / "plan.json").read_text())
    assert result["world_size"] == 16 and result["args"]["zero"] == 3 and "llama3-70b" in plan.stdout
    run_floe(["slurm", "--action", "render", "--config", "llama3-70b-2node", "--output", str(tmp_path / "c")])
    script = (tmp_path / "c" / "campaign.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert f"--config {tmp_path / 'c' / 'recipe.yaml'}" in script and "--parallel.nproc 8" in script
    assert read_recipe(tmp_path / "c" / "recipe.yaml") == load_recipe("llama3-70b-2node")


def test_flash_attention_without_its_package_is_refused_before_any_stage():
    import importlib.util

    recipe = load_recipe("tiny", ["--model.attn_implementation", "flash_attention_2"])
    refused = any("flash_attention_2 needs the flash-attn package" in p for p in recipe.problems())
    assert refused == (importlib.util.find_spec("flash_attn") is None)
    assert load_recipe("tiny", ["--model.attn_implementation", "eager"]).problems() == []
