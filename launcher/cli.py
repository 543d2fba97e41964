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
import os
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
# Stages that run on the recipe's ranks: alone, they start parallel.nproc local ranks as the campaign does.
RANK_COMMANDS = ("train", "score", "evaluate", "generate")
SHORTCUTS = {"model": "model.name", "allocation": "allocate.file", "adapter": "model.adapter"}
# Spellings of the release before the one settings tree: command -> {old flag: what it is now}. Each still works,
# with a warning that names the new spelling, until the next release (CHANGELOG.md lists them).
RENAMED = {
    "campaign": {"preset": "config", "nproc": "parallel.nproc", "nodes": "parallel.nodes", "zero": "parallel.zero",
                 "launcher": "parallel.launcher", "steps": "train.steps", "quant": "model.quant",
                 "select_k": "allocate.k", "search": "search.enabled"},
    "plan": {"seq_len": "model.max_length"},
}


def renamed(command: str, argv: list[str]) -> list[str]:
    """The earlier spellings of ``RENAMED`` rewritten to today's (``--preset tiny`` -> ``--config tiny``, and
    ``--config default`` is the default recipe; ``--no-search`` -> ``--search.enabled false``), each with a warning
    on stderr."""
    table, out = RENAMED.get(command, {}), []
    for i, a in enumerate(argv):
        flag, eq, value = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        name = flag.replace("-", "_")
        negated = name.startswith("no_") and table.get(name[3:]) == "search.enabled"
        new = table.get(name[3:] if negated else name)
        if new is None or "." in flag:
            out.append(a)
            continue
        spelled = f"{new} false" if negated else new
        print(f"floe-dist {command}: warning: --{flag} is now --{spelled} (the old spelling goes in the next "
              f"release)", file=sys.stderr)
        if new == "search.enabled" and not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out += [f"--{new}", "false" if negated else "true"]
        else:
            out.append(f"--{new}" + (f"={value}" if eq else ""))
    return out


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


def command_parser(name: str, module):
    """The recipe's parser with the command's ``--output``: every command shows the whole tree, by section (a
    stage's file is a campaign's recipe; ``--print_config`` prints all of it). Its help ends with the command's
    short flags and the dotted key each stands for; jsonargparse's section-file flags that a short flag takes
    (``--model FILE``) are left out, so no flag in the help means two things."""
    from argparse import RawDescriptionHelpFormatter

    from floe_dist.recipe import recipe_parser

    parser = recipe_parser(prog=f"floe-dist {name}", description=RECIPE_COMMANDS[name][1])
    one_file = getattr(module, "OUTPUT_FILE", None)  # a command that writes one file (floe_dist/files.py)
    parser.add_argument("--output", type=str | None, default=module.OUTPUT, help=(
        f"folder to write {one_file} into, or a path ending {Path(one_file).suffix} to write instead"
        + ("" if module.OUTPUT else "; without it the result is only printed")) if one_file else
        "output folder (rerun the same command to resume)")
    short = {k: v for k, v in aliases(module.SECTIONS).items() if module.SECTIONS or k in SHORTCUTS}
    taken = {f"--{k}" for k in [*short, *RENAMED.get(name, {})]}
    for action in [a for a in parser._actions if set(a.option_strings) & taken]:
        parser._handle_conflict_resolve(None, [(o, action) for o in action.option_strings])
    lines = [f"  --{k.replace('_', '-'):<26} --{v}" for k, v in sorted(short.items())]
    parser.formatter_class = type("Formatter", (RawDescriptionHelpFormatter, parser.formatter_class), {})
    parser.epilog = f"short flags of floe-dist {name} (each is the dotted key beside it):\n" + "\n".join(lines)
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
    parser = command_parser(name, module)
    argv = expand_aliases(renamed(name, argv), module.SECTIONS, {"output", "config", "print_config", "help"})
    printing = [a for a in argv if a.split("=")[0] == "--print_config"]
    if printing:  # print the resolved recipe, then what the command's checks find in it
        try:
            parse_recipe(argv, parser)
        except SystemExit as done:
            if done.code:
                raise
        recipe = parse_recipe([a for a in argv if a not in printing], parser)[0]
        found = module.problems(recipe) if hasattr(module, "problems") else recipe.problems(*module.SECTIONS)
        if found:
            raise ValueError("bad recipe:\n  - " + "\n  - ".join(found))
        raise SystemExit(0)
    recipe, cfg = parse_recipe(argv, parser)
    return module, recipe, cfg.output


def parse_options(name: str, cls: type, help_text: str, argv: list[str]):
    """A tool's options class from its flags (``--tasks-per-node`` or ``--tasks_per_node``), and the recipe of
    ``--config`` where the tool takes one. Returns (options, recipe or None)."""
    from jsonargparse import ArgumentError, ArgumentParser

    from floe_dist.recipe import load_recipe, readable

    parser = ArgumentParser(prog=f"floe-dist {name}", description=help_text, exit_on_error=False)
    if "recipe" in {f.name for f in fields(cls)}:
        parser.add_argument("--config", type=str | None, default=None,
                            help="a recipe (file or shipped name) for the job; its settings are the job's")
    parser.add_class_arguments(cls, fail_untyped=True, sub_configs=False)
    helps = {f.name: f.metadata.get("help") for f in fields(cls)}
    for action in parser._actions:
        if action.dest in helps:
            action.help = helps[action.dest]
    for group in parser._action_groups:  # the options' heading: the class's docstring, not its repr
        if group.title == str(cls):
            group.title = cls.__doc__
    argv = [a if not a.startswith("--") else "--" + a[2:].split("=")[0].replace("-", "_")
            + ("=" + a.split("=", 1)[1] if "=" in a else "") for a in argv]
    try:
        cfg = parser.parse_args(argv)
        recipe = load_recipe(cfg.config) if cfg.get("config") else None
    except ArgumentError as err:
        raise ValueError(f"bad arguments: {readable(str(err))}") from None
    return cls(**{f.name: cfg[f.name] for f in fields(cls)}), recipe


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("floe-dist")
    except PackageNotFoundError:  # a checkout that was never installed
        return "unknown (not installed)"


def forks_locally(name: str, recipe) -> bool:
    """Whether the command starts local processes that a zygote could fork: a campaign's stages and trials, a
    search's trials (floe_dist/distributed/forked_ranks.py)."""
    if name == "campaign":
        return recipe.parallel.launcher != "srun" or not recipe.search.runner.startswith("slurm")
    return name == "search" and not recipe.search.runner.startswith("slurm")


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None  # this process has run no tensor op yet: it may fork ranks (forked_ranks.py)
    argv = strip_launcher_flags(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"floe-dist {version()}")
        return 0
    commands = {**{n: h for n, (_, h) in RECIPE_COMMANDS.items()}, **{n: h for n, (_, _, h) in TOOL_COMMANDS.items()},
                **{n: h for n, (_, h) in PASSTHROUGH.items()}}
    if not argv or argv[0] not in commands:
        top = argparse.ArgumentParser(prog="floe-dist", description="Fisher-placed sparse LoRA-MoE fine-tuning")
        top.add_argument("--version", "-V", action="store_true", help="print floe-dist's version")
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
    from floe_dist.distributed.forked_ranks import Zygote
    from floe_dist.distributed.runtime import discover, shutdown
    from floe_dist.files import exclusive_output, output_file
    from floe_dist.recipe import write_recipe
    from launcher.cluster import ranks_to_start, run_local_ranks, threads_per_rank

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
            one_file = getattr(module, "OUTPUT_FILE", None)  # else --output is the run's folder
            folder = output if output and (one_file is None or output_file(output, one_file) != Path(output)) \
                else None
            if name in RANK_COMMANDS and (nproc := ranks_to_start(recipe.parallel)):
                if from_command_line:
                    Zygote.start()
                with exclusive_output(folder):  # held here for the ranks (FLOE_DIST_OUTPUT_HELD)
                    print(f"floe-dist {name}: starting parallel.nproc = {nproc} ranks on this machine", flush=True)
                    env = {**os.environ, "OMP_NUM_THREADS": threads_per_rank(nproc),
                           "FLOE_DIST_OUTPUT_HELD": str(folder)}
                    return run_local_ranks([name, *rest], nproc, env)
            if from_command_line and forks_locally(name, recipe):
                Zygote.start()  # the stages and search workers it starts are forked from it
            held = os.environ.get("FLOE_DIST_OUTPUT_HELD") == str(folder)
            with exclusive_output(folder, discover().is_main and not held):
                module.run(recipe, output)
                if folder and discover().is_main and name != "campaign":
                    write_recipe(Path(folder), recipe)  # beside the stage's outputs; a refused run leaves nothing
    except (ValueError, FileNotFoundError, FloatingPointError, ChildProcessError) as err:
        print(f"floe-dist {name}: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
