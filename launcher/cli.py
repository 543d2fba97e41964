"""The ``floe-dist`` command: one sub-command per stage, flags generated from each stage's dataclass.

    floe-dist campaign [--preset tiny]      # the whole default campaign (see launcher/campaign.py)
    floe-dist search ...                    # SMAC over rank and learning rate (launcher/search.py)
    floe-dist train ...                     # also under `deepspeed --num_gpus N --module launcher.cli train`
    floe-dist evaluate ...
    floe-dist export --run DIR
    floe-dist plan --model llama3-70b --nodes 2 --gpus-per-node 8   # memory per GPU before any run
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, Callable


def _stages() -> dict[str, tuple[type, Callable[[Any], Any], str]]:
    # Imported here, not at module import, so `python -m launcher.cli` starts no work before parsing.
    from floe_dist import allocate, evaluate, export_run, plan, score, train
    from launcher import campaign, search, slurm

    return {
        "score": (score.ScoreArgs, score.run, "warm up adapters, score layers by Fisher information, select"),
        "search": (search.SearchArgs, search.run, "choose rank and learning rate with SMAC from parallel trials"),
        "allocate": (allocate.AllocateArgs, allocate.run, "write an allocation file with a registered method"),
        "train": (train.TrainArgs, train.run, "train adapters under DeepSpeed (ZeRO-0/2/3)"),
        "evaluate": (evaluate.EvalArgs, evaluate.run, "multiple-choice accuracy of a base model or adapter"),
        "export": (export_run.ExportArgs, export_run.run, "rebuild an adapter export from a checkpoint"),
        "campaign": (campaign.CampaignArgs, campaign.run, "run the stages end to end"),
        "slurm": (slurm.SlurmArgs, slurm.run, "render/submit sbatch scripts (slurm/) and write DeepSpeed hostfiles"),
        "plan": (plan.PlanArgs, plan.run, "predict per-GPU memory and step time of a layout before running it"),
    }


def _base_type(annotation: Any) -> type:
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing})  # dataclasses keep string annotations
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(f.type)
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=f"{help_text} (default: %(default)s)")


def build_parser(stages: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="floe-dist", description="Fisher-placed sparse LoRA-MoE fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in stages.items():
        add_dataclass_arguments(sub.add_parser(name, help=help_text, description=help_text), cls)
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


def main(argv: list[str] | None = None) -> int:
    stages = _stages()
    ns = build_parser(stages).parse_args(strip_launcher_flags(sys.argv[1:] if argv is None else argv))
    cls, fn, _ = stages[ns.command]
    args = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    try:
        fn(args)
    except (ValueError, FileNotFoundError, FloatingPointError, ChildProcessError) as err:
        print(f"floe-dist {ns.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        from floe_dist.distributed.runtime import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
