"""The ``floe-dist`` command: one sub-command per stage.

    floe-dist campaign [--config RECIPE] [--section.key VALUE ...]   # all stages (launcher/campaign.py)
    floe-dist score|allocate|search|train|evaluate|generate [--config RECIPE] [--flag VALUE ...]
    floe-dist export --run DIR
    floe-dist plan --model llama3-70b --nodes 2 --gpus-per-node 8    # memory per GPU before any run
    floe-dist slurm --action render --config RECIPE --output runs/c  # an sbatch script that runs a recipe

A campaign is configured only by its recipe (floe_dist/recipe.py; jsonargparse reads the YAML and the
dotted overrides). A single stage takes its own flags; with ``--config`` (and dotted overrides) its
defaults come from the recipe, and flags given explicitly still win. Under ``deepspeed --num_gpus N
--module launcher.cli train ...`` the launcher's --local_rank flag is dropped (LOCAL_RANK is set).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable


def _stages() -> dict[str, tuple[type, Callable[[Any], Any], str]]:
    # Imported here, not at module import, so `python -m launcher.cli` starts no work before parsing.
    from floe_dist.stages import allocate, evaluate, export, generate, plan, score, search, train
    from launcher import campaign, slurm

    return {
        "score": (score.ScoreArgs, score.run, "warm up adapters, score layers by Fisher information, select"),
        "allocate": (allocate.AllocateArgs, allocate.run, "write an allocation file with a registered method"),
        "search": (search.SearchArgs, search.run, "choose rank and learning rate with SMAC from parallel trials"),
        "train": (train.TrainArgs, train.run, "train adapters under DeepSpeed (ZeRO-0/2/3)"),
        "evaluate": (evaluate.EvalArgs, evaluate.run, "accuracy, loss or exact match of a base model or adapter"),
        "generate": (generate.GenerateArgs, generate.run, "what a base model or adapter writes for prompts"),
        "export": (export.ExportArgs, export.run, "rebuild an adapter export from a checkpoint"),
        "campaign": (campaign.CampaignArgs, campaign.run, "run a recipe's stages end to end"),
        "slurm": (slurm.SlurmArgs, slurm.run, "render/submit sbatch scripts (slurm/) and write DeepSpeed hostfiles"),
        "plan": (plan.PlanArgs, plan.run, "predict per-GPU memory and step time of a layout before running it"),
    }


def _base_type(annotation: Any) -> type:
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing})  # dataclasses keep string annotations
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def add_stage_arguments(parser: argparse.ArgumentParser, stage: str, cls: type) -> None:
    """One flag per dataclass field, grouped by the recipe section each comes from."""
    from floe_dist.recipe import section_of

    groups: dict[str, Any] = {}
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--config", default=None, help="a recipe (file or shipped name) whose settings become "
                                                       "this stage's defaults; dotted --section.key flags override it")
    for f in dataclasses.fields(cls):
        section = section_of(stage, f.name)
        title = f"{section} (recipe: {section}.*)" if section else f"{stage}"
        group = groups.setdefault(title, parser.add_argument_group(title))
        flag, kind, help_text = "--" + f.name.replace("_", "-"), _base_type(f.type), f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=f.default, help=f"{help_text} (default: %(default)s)")


def build_parser(stages: dict) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="floe-dist", description="Fisher-placed sparse LoRA-MoE fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    subs = {}
    for name, (cls, _, help_text) in stages.items():
        # the campaign's own parser (jsonargparse, the recipe's sections) handles its flags and --help
        subs[name] = sub.add_parser(name, help=help_text, description=help_text, add_help=name != "campaign")
        if name != "campaign":
            add_stage_arguments(subs[name], name, cls)
    return parser, subs


def strip_launcher_flags(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher prepends --local_rank=N; LOCAL_RANK is in the environment too."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(a)
    return out


def campaign_args(argv: list[str]):
    """``--config`` (default: the shipped default recipe), ``--output`` and dotted recipe settings."""
    from jsonargparse import ArgumentError

    from floe_dist.recipe import DEFAULT_RECIPE, recipe_from_namespace, recipe_parser, recipe_path
    from launcher.campaign import CampaignArgs

    parser = recipe_parser(prog="floe-dist campaign", description=_stages()["campaign"][2])
    parser.add_argument("--output", default="runs/campaign", help="campaign folder; rerun the same command "
                                                                   "to resume")
    argv = resolve_config_names(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(recipe_path(DEFAULT_RECIPE)), *argv]
    try:
        cfg = parser.parse_args(argv)
    except ArgumentError as err:  # unknown keys, wrong types: the message names them
        raise ValueError(f"bad recipe: {err}") from None
    return CampaignArgs(recipe=recipe_from_namespace(parser, cfg), output=cfg.output)


def resolve_config_names(argv: list[str]) -> list[str]:
    """``--config tiny`` names a shipped recipe; the path is what jsonargparse reads."""
    from floe_dist.recipe import recipe_path

    out = list(argv)
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            out[i + 1] = str(recipe_path(out[i + 1]))
        elif a.startswith("--config="):
            out[i] = "--config=" + str(recipe_path(a.split("=", 1)[1]))
    return out


def stage_args(name: str, cls: type, sub: argparse.ArgumentParser, argv: list[str]) -> tuple[Any, Any]:
    """A stage's dataclass from its flags (with --config, the recipe's settings are the defaults), and the resolved
    recipe to save in its output folder (None: nothing to save, or not this rank's to save)."""
    from floe_dist.recipe import load_recipe, stage_settings

    ns, extra = sub.parse_known_args(argv)
    dotted = [a for a in extra if a.startswith("--") and "." in a.split("=")[0]]
    values = [a for a in extra if not a.startswith("--")]
    if len(dotted) + len(values) != len(extra) or (dotted and not ns.config):
        sub.error(f"unrecognized arguments: {' '.join(extra)}" + ("" if ns.config else
                  " (dotted --section.key settings need --config RECIPE)"))
    recipe = None
    if ns.config:
        recipe = load_recipe(ns.config, extra)
        sub.set_defaults(**stage_settings(name, recipe, [f.name for f in dataclasses.fields(cls)]))
        ns, _ = sub.parse_known_args(argv)
    args = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    output = getattr(args, "output", None)
    from floe_dist.distributed.runtime import discover

    if recipe is None or not output or Path(output).suffix or not discover().is_main:
        return args, None
    if hasattr(args, "recipe") and args.recipe is None:
        args.recipe = str(Path(output) / "recipe.yaml")
    return args, recipe


def main(argv: list[str] | None = None) -> int:
    argv = strip_launcher_flags(sys.argv[1:] if argv is None else argv)
    stages = _stages()
    parser, subs = build_parser(stages)
    if not argv or argv[0] not in stages:
        parser.parse_args(argv)  # usage, --help, or the unknown-command error
    name, rest = argv[0], argv[1:]
    cls, fn, _ = stages[name]
    try:
        args, recipe = (campaign_args(rest), None) if name == "campaign" else stage_args(name, cls, subs[name], rest)
        from floe_dist.recipe import write_recipe
        from floe_dist.resume import exclusive_output

        # `slurm` only writes and submits a script: the job's stage holds its folder
        with exclusive_output(None if name == "slurm" else getattr(args, "output", None)):
            if recipe is not None:  # beside the stage's outputs, once the folder is this run's
                write_recipe(Path(args.output), recipe)
            fn(args)
    except (ValueError, FileNotFoundError, FloatingPointError, ChildProcessError) as err:
        print(f"floe-dist {name}: error: {err}", file=sys.stderr)
        return 2
    finally:
        from floe_dist.distributed.runtime import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
