"""``floe-dist slurm``: render and submit the sbatch templates in ``slurm/``, write DeepSpeed hostfiles.

    floe-dist slurm --action render --template campaign --nodes 2 --tasks-per-node 4 --gpus-per-node 4 \\
        --output runs/c70b --config llama3-70b-2node          # -> runs/c70b/campaign.sbatch
    floe-dist slurm --action submit ...                        # render, then sbatch; prints the job id
    floe-dist slurm --action hostfile --hostfile H --slots 8   # inside an allocation: DeepSpeed hostfile

Templates use ``@{name}`` placeholders (bash keeps its own ``${...}``). The stage's flags (``--args``)
are passed through verbatim, and ``--output`` is also the stage's output folder, so a requeued job
finds its checkpoints there.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from floe_dist.assets import SbatchTemplate
from floe_dist.config import arg, below_one
from launcher.cluster import DeepSpeedLauncher, need_command, render_hostfile, slurm_hosts

CLI_SCRIPT = Path(__file__).with_name("cli.py")  # the `floe-dist` entry point as a script
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")
JOB_START = 60.0  # seconds into a job before the campaign reads its time left: the interpreter's start and imports


@dataclass
class SlurmArgs:
    """slurm: an sbatch script that runs a recipe, or a DeepSpeed hostfile"""
    action: Literal["render", "submit", "hostfile"] = arg(
        "render", "render (write the sbatch script), submit (render + sbatch) or hostfile")
    template: Literal["campaign", "train"] = arg("campaign", "campaign or train (slurm/<template>.sbatch)")
    output: str = arg("runs/slurm", "run folder: the script, Slurm's log and the stage's outputs go here")
    args: str = arg("", "flags of the stage, passed through; write --args=\"--train.steps 80\" (--output is added)")
    recipe: str | None = arg(None, "recipe the job runs (--config of the stage); with this command's --config, "
                                   "the resolved recipe written into --output")
    # The job's shape is the recipe's parallel section (nodes, nproc, gpus_per_node); these flags override it.
    nodes: int | None = arg(None, "#SBATCH --nodes (default: the recipe's parallel.nodes)")
    tasks_per_node: int | None = arg(None, "ranks per node (default: the recipe's parallel.nproc)")
    gpus_per_node: int | None = arg(None, "#SBATCH --gpus-per-node (default: the recipe's parallel.gpus_per_node)")
    cpus_per_task: int = arg(1, "CPU cores per rank")
    time: str = arg("04:00:00", "wall-time limit, [D-]HH:MM:SS")
    partition: str | None = arg(None, "partition (#SBATCH --partition)")
    sbatch_args: str = arg("", "more #SBATCH options, e.g. \"--account=abc --qos=high\"")
    launch: Literal["srun", "deepspeed"] = arg(
        "srun", "train template: srun (one task per rank) or deepspeed (hostfile launch)")
    deepspeed_launcher: DeepSpeedLauncher = arg(
        "slurm", "with --launch deepspeed: how deepspeed starts the ranks on the hosts")
    job_name: str = arg("floe-dist", "job name")
    hostfile: str = arg("hostfile", "hostfile action: where to write it")
    nodelist: str | None = arg(None, "hostfile action: node list (default: this allocation's)")
    slots: int = arg(1, "hostfile action: ranks per host")

    def resolve_shape(self) -> None:
        """Fill the shape flags left unset from the parallel section of the job's recipe (--recipe, or the one
        --config wrote), else of the default recipe."""
        from floe_dist.recipe import Recipe, load_recipe

        if None in (self.nodes, self.tasks_per_node, self.gpus_per_node):
            shape = recipe_defaults(load_recipe(self.recipe) if self.recipe else Recipe())
            for name, value in shape.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)

    def validate(self) -> None:
        self.resolve_shape()
        problems = below_one(self, ("nodes", "tasks_per_node", "cpus_per_task", "slots"))
        if self.gpus_per_node < 0:
            problems.append("--gpus-per-node must be >= 0")
        if not _TIME.match(self.time):
            problems.append(f"--time {self.time!r} is not [D-]HH:MM:SS")
        if self.launch == "deepspeed" and self.template != "train":
            problems.append("--launch deepspeed applies to the train template (a campaign starts its stages with srun)")
        if "--output" in shlex.split(self.args):
            problems.append("--args must not set --output: the run folder is --output of this command")
        if self.template == "campaign" and not problems:
            problems += self.budget_problems()
        if problems:
            raise ValueError("bad slurm arguments:\n  - " + "\n  - ".join(problems))

    def budget_problems(self) -> list[str]:
        """A campaign's budget that --time cannot hold, refused now rather than when the job starts after its wait in
        the queue (launcher/campaign.py ``budget_in_job``): the campaign starts up to ``JOB_START`` seconds into the
        job and keeps ``JOB_END_MARGIN`` to end in."""
        from floe_dist.recipe import load_recipe
        from launcher.campaign import JOB_END_MARGIN

        try:
            c = load_recipe(self.recipe, shlex.split(self.args)).campaign
        except ValueError:
            return []  # the job's campaign names its recipe's problems itself
        if c.from_job or c.problems() or not c.budget.strip():
            return []
        need, limit = c.budget_seconds() + JOB_END_MARGIN + JOB_START, slurm_seconds(self.time)
        if limit >= need:
            return []
        minutes = -(-int(need) // 60)
        return [f"--time {self.time} ({limit:.0f}s) cannot hold campaign.budget {c.budget} ({c.budget_seconds():.0f}s) "
                f"with the campaign's start and end ({JOB_START:.0f}s and {JOB_END_MARGIN:.0f}s): give --time "
                f"{minutes // 60}:{minutes % 60:02d}:00 or more, or --campaign.budget job"]


def slurm_seconds(time: str) -> float:
    """sbatch's --time in seconds: a bare number is minutes there."""
    from floe_dist.config import duration_seconds

    return 60.0 * int(time) if time.isdigit() else duration_seconds(time, "--time")


def recipe_defaults(recipe) -> dict:
    """The job's shape: the recipe's parallel section, under this command's names."""
    p = recipe.parallel
    return {"nodes": p.nodes, "tasks_per_node": p.nproc, "gpus_per_node": p.gpus_per_node}


def render(args: SlurmArgs) -> str:
    out = Path(args.output).resolve()
    recipe = ["--config", str(Path(args.recipe).resolve())] if args.recipe else []
    stage_args = recipe + shlex.split(args.args) + ["--output", str(out)]
    lines = [f"#SBATCH --partition={args.partition}"] if args.partition else []
    if args.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    lines += [f"#SBATCH {opt}" for opt in shlex.split(args.sbatch_args)]
    python = shlex.quote(sys.executable)
    quoted = " ".join(shlex.quote(a) for a in stage_args)
    if args.launch == "srun":
        launch = f"exec srun --kill-on-bad-exit=1 --gpu-bind=none {python} -m launcher.cli train {quoted}"
    else:
        hostfile = shlex.quote(str(out / "hostfile"))
        # only pdsh reaches the nodes over ssh; srun and mpirun (through Slurm) start the ranks themselves
        no_ssh = "" if args.deepspeed_launcher == "pdsh" else " --no_ssh_check"
        bindir = shlex.quote(str(Path(sys.executable).parent))  # mpirun from PyPI's mpich sits beside python
        launch = (f"export PATH={bindir}:\"$PATH\"\n"
                  f"{python} -m launcher.cli slurm --action hostfile --hostfile {hostfile} "
                  f"--slots {args.tasks_per_node}\n"
                  f"exec {python} -m deepspeed.launcher.runner --hostfile {hostfile} --master_addr \"$MASTER_ADDR\" "
                  f"--master_port \"$MASTER_PORT\" --launcher {args.deepspeed_launcher}{no_ssh} "
                  f"{shlex.quote(str(CLI_SCRIPT))} train {quoted}")  # a script path: the slurm
        # backend of deepspeed 0.19.8 drops --module and would run `python launcher.cli`
    return SbatchTemplate.named(args.template).substitute(
        job_name=args.job_name, nodes=args.nodes, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        time=args.time, output=str(out), sbatch_lines="\n".join(lines), workdir=shlex.quote(str(Path.cwd())),
        python=python, args=quoted, launch=launch)


def run(args: SlurmArgs) -> dict:
    args.validate()
    if args.action == "hostfile":
        text = render_hostfile(slurm_hosts(args.nodelist), args.slots)
        Path(args.hostfile).write_text(text)
        print(text, end="")
        return {"hostfile": args.hostfile}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    script = out / f"{args.template}.sbatch"
    script.write_text(render(args))
    print(f"wrote {script}")
    result = {"script": str(script)}
    if args.action == "submit":
        sbatch = need_command("sbatch", "submitting needs the Slurm client (or use --action render and copy "
                                        "the script to a login node)")
        proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ChildProcessError(f"sbatch refused {script}: {proc.stderr.strip()}")
        result["job_id"] = proc.stdout.strip().split(";")[0]
        print(f"submitted job {result['job_id']}; log: {out.resolve()}/slurm-{result['job_id']}.out")
    return result
