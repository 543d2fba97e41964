"""The ``floe-dist`` command: one sub-command per stage, one parser for all of them.

    floe-dist campaign [--config RECIPE] [--section.key VALUE ...]   # all stages (launcher/campaign.py)
    floe-dist score|allocate|search|train|evaluate|generate [--config RECIPE] [--section.key VALUE ...]
    floe-dist STAGE --config RECIPE --print_config                  # the settings that stage runs with
    floe-dist export --run DIR
    floe-dist plan --config recipes/llama3-70b-2node.yaml            # memory per GPU before any run (a stage too)
    floe-dist slurm --action render --config RECIPE --output runs/c  # an sbatch script that runs a recipe
    floe-dist lm-eval --model floe-dist --model_args adapter=DIR --tasks T  # lm-eval's CLI, our model in it

Every stage and the campaign read the same settings tree (floe_dist/recipe.py) through jsonargparse:
``--config`` (a file or a shipped recipe's name), dotted ``--section.key`` overrides, ``--print_config``.
A stage also takes its settings' short spellings, e.g. ``train --steps 80 --micro-batch 2``: each is an
alias of the first of the stage's sections (its ``SECTIONS``, in order) that has that name, derived
here, never declared again; ``--model X`` is ``--model.name X``, ``--allocation F`` is
``--allocate.file F`` and ``--adapter D`` is ``--model.adapter D``. Under ``deepspeed --num_gpus N
--module launcher.cli train ...`` the launcher's --local_rank flag is dropped (LOCAL_RANK is set).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import fields
from pathlib import Path

# Sub-commands whose settings are the recipe: name -> (module, one-line help). Each module has SECTIONS,
# OUTPUT (the default --output) and run(recipe, output).
RECIPE_COMMANDS = {
    "score": ("floe_dist.stages.score", "warm up adapters, score layers by Fisher information, select"),
    "allocate": ("floe_dist.stages.allocate", "write an allocation file with a registered method"),
    "search": ("floe_dist.stages.search", "choose rank and learning rate with SMAC from parallel trials"),
    "train": ("floe_dist.stages.train", "train adapters under DeepSpeed (ZeRO-0/2/3)"),
    "evaluate": ("floe_dist.stages.evaluate", "accuracy, loss or exact match of a base model or adapter"),
    "generate": ("floe_dist.stages.generate", "what a base model or adapter writes for prompts"),
    "plan": ("floe_dist.stages.plan", "predict per-GPU memory and step time of a layout before running it"),
    "campaign": ("launcher.campaign", "run a recipe's stages end to end"),
}
# Tools with options of their own: name -> (module, options class, help). A tool whose options name a
# ``recipe`` (slurm) also takes --config RECIPE: the resolved recipe is written beside its output and named there.
TOOL_COMMANDS = {
    "export": ("floe_dist.stages.export", "ExportArgs", "rebuild an adapter export from a checkpoint"),
    "slurm": ("launcher.slurm", "SlurmArgs", "render/submit sbatch scripts (slurm/) and write DeepSpeed hostfiles"),
}
# Other programs' command lines, run with floe-dist's pieces registered: name -> (module, help). Each module has
# main(argv).
PASSTHROUGH = {"lm-eval": ("floe_dist.lm_eval_model", "lm-evaluation-harness's own CLI with the floe-dist model "
                                                      "(--model floe-dist --model_args adapter=DIR)")}
SHORTCUTS = {"model": "model.name", "allocation": "allocate.file", "adapter": "model.adapter"}


def aliases(sections: tuple[str, ...]) -> dict[str, str]:
    """{short name: dotted key} for a stage: each setting of its sections by its own name (first section
    first), a nested one also as ``<sub>_<name>`` (``flexora_steps``), plus the SHORTCUTS."""
    from floe_dist.recipe import Recipe, field_paths

    paths = field_paths(Recipe)
    counts: dict[str, int] = {}
    for key in paths:
        counts[key.rsplit(".", 1)[1]] = counts.get(key.rsplit(".", 1)[1], 0) + 1
    found = dict(SHORTCUTS)
    for section in sections:
        for key in paths:
            parts = key.split(".")
            if parts[0] != section:
                continue
            if len(parts) == 2:
                found.setdefault(parts[1], key)
            else:
                found.setdefault("_".join(parts[1:]), key)
                if counts[parts[-1]] == 1:
                    found.setdefault(parts[-1], key)
    return found


def expand_aliases(argv: list[str], sections: tuple[str, ...], own: set[str] = frozenset()) -> list[str]:
    """``--micro-batch 2`` -> ``--train.micro_batch 2``, ``--pack``/``--no-pack`` -> ``--data.pack true|false``;
    dotted keys, ``own`` options and unknown names pass through (jsonargparse names what it does not know)."""
    from floe_dist.recipe import Recipe, field_paths

    table, paths, out = aliases(sections), field_paths(Recipe), []
    for i, a in enumerate(argv):
        if not a.startswith("--") or a == "--":
            out.append(a)
            continue
        flag, eq, value = a[2:].partition("=")
        name = flag.replace("-", "_")
        negated = name.startswith("no_") and table.get(name[3:]) and paths[table[name[3:]]].type in ("bool", bool)
        key = table.get(name[3:] if negated else name)
        if "." in flag or name in own or key is None:
            out.append(a)
        elif paths[key].type in ("bool", bool) and not eq and (negated or i + 1 == len(argv)
                                                               or argv[i + 1].startswith("--")):
            out += [f"--{key}", "false" if negated else "true"]
        else:
            out.append(f"--{key}" + (f"={value}" if eq else ""))
    return out


def command_parser(name: str, output: str | None):
    """The recipe's parser with the command's ``--output``: every command shows the whole tree, by section (a
    stage's file is a campaign's recipe; ``--print_config`` prints all of it)."""
    from floe_dist.recipe import recipe_parser

    parser = recipe_parser(prog=f"floe-dist {name}", description=RECIPE_COMMANDS[name][1])
    parser.add_argument("--output", type=str | None, default=output,
                        help="output folder (rerun the same command to resume)" if output else "also write here")
    return parser


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


def parse_command(name: str, argv: list[str]):
    """(module, recipe, output) for a recipe command; (module, options, recipe or None) for a tool."""
    from floe_dist.recipe import parse_recipe

    if name in TOOL_COMMANDS:
        module_name, cls_name, help_text = TOOL_COMMANDS[name]
        module = importlib.import_module(module_name)
        return module, *parse_options(name, getattr(module, cls_name), help_text, argv)
    module = importlib.import_module(RECIPE_COMMANDS[name][0])
    parser = command_parser(name, module.OUTPUT)
    recipe, cfg = parse_recipe(expand_aliases(argv, module.SECTIONS, {"output", "config", "print_config", "help"}),
                               parser)
    return module, recipe, cfg.output


def parse_options(name: str, cls: type, help_text: str, argv: list[str]):
    """A tool's options class from its flags (``--tasks-per-node`` or ``--tasks_per_node``), and the recipe of
    ``--config`` where the tool takes one. Returns (options, recipe or None)."""
    from jsonargparse import ArgumentError, ArgumentParser

    from floe_dist.recipe import load_recipe

    parser = ArgumentParser(prog=f"floe-dist {name}", description=help_text, exit_on_error=False)
    if "recipe" in {f.name for f in fields(cls)}:
        parser.add_argument("--config", type=str | None, default=None,
                            help="a recipe (file or shipped name) for the job; its settings are the job's")
    parser.add_class_arguments(cls, fail_untyped=True, sub_configs=False)
    helps = {f.name: f.metadata.get("help") for f in fields(cls)}
    for action in parser._actions:
        if action.dest in helps:
            action.help = helps[action.dest]
    argv = [a if not a.startswith("--") else "--" + a[2:].split("=")[0].replace("-", "_")
            + ("=" + a.split("=", 1)[1] if "=" in a else "") for a in argv]
    try:
        cfg = parser.parse_args(argv)
        recipe = load_recipe(cfg.config) if cfg.get("config") else None
    except ArgumentError as err:
        raise ValueError(f"bad arguments: {err}") from None
    return cls(**{f.name: cfg[f.name] for f in fields(cls)}), recipe


def main(argv: list[str] | None = None) -> int:
    argv = strip_launcher_flags(sys.argv[1:] if argv is None else argv)
    commands = {**{n: h for n, (_, h) in RECIPE_COMMANDS.items()}, **{n: h for n, (_, _, h) in TOOL_COMMANDS.items()},
                **{n: h for n, (_, h) in PASSTHROUGH.items()}}
    if not argv or argv[0] not in commands:
        top = argparse.ArgumentParser(prog="floe-dist", description="Fisher-placed sparse LoRA-MoE fine-tuning")
        sub = top.add_subparsers(dest="command", required=True)
        for command, help_text in commands.items():
            sub.add_parser(command, help=help_text, add_help=False)
        top.parse_args(argv)  # usage, --help, or the unknown-command error
    name, rest = argv[0], argv[1:]
    if name in PASSTHROUGH:
        try:
            module = importlib.import_module(PASSTHROUGH[name][0])
        except ImportError as err:
            print(f"floe-dist {name}: error: needs the floe-dist[eval] extra ({err})", file=sys.stderr)
            return 2
        module.main(rest)
        return 0
    from floe_dist.distributed.runtime import discover, shutdown
    from floe_dist.files import exclusive_output
    from floe_dist.recipe import write_recipe

    try:
        parsed = parse_command(name, rest)
        if name in TOOL_COMMANDS:
            module, options, recipe = parsed
            held = None if name == "slurm" else options.output  # slurm only writes a script: the job holds it
            with exclusive_output(held, discover().is_main):
                if recipe is not None and hasattr(options, "recipe") and options.recipe is None:
                    options.recipe = str(write_recipe(Path(options.output), recipe))  # what the job runs
                module.run(options)
        else:
            module, recipe, output = parsed
            with exclusive_output(output, discover().is_main):
                module.run(recipe, output)
                if output and not Path(output).suffix and discover().is_main and name != "campaign":
                    write_recipe(Path(output), recipe)  # beside the stage's outputs; a refused run leaves nothing
    except (ValueError, FileNotFoundError, FloatingPointError, ChildProcessError) as err:
        print(f"floe-dist {name}: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
