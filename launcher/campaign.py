"""``floe-dist campaign``: the stages end to end, each resumable, each timed.

    floe-dist campaign                  # SmolLM2-135M on SST-2, 2 local ranks under ZeRO-3
    floe-dist campaign --preset tiny    # the same path on a tiny random Llama, about a minute

Stages: prepare the model (GGUF -> safetensors, cached) -> zero-shot accuracy -> score (warm-up
and Fisher layer selection, floe_dist/score.py) -> search (SMAC picks rank and learning rate for the
selected layers from short parallel trials, launcher/search.py) -> train -> accuracy of the exported
adapter. Score and train run as ``torchrun`` groups of ``--nproc`` ranks; search trials are single
processes, as many at once as the machine holds. A stage whose result file exists is skipped when
the campaign is rerun, so an interrupted campaign continues where it stopped (the search resumes
its trials and training its last checkpoint).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from floe_dist.allocation import write_json_atomic
from floe_dist.config import arg
from floe_dist.distributed.runtime import free_port
from floe_dist.evaluate import EvalArgs
from floe_dist.evaluate import run as evaluate
from floe_dist.modeling.backbone import resolve_model
from floe_dist.score import ScoreArgs
from floe_dist.train import TrainArgs
from launcher.cluster import srun_stage_command
from launcher.search import SearchArgs
from launcher.search import run as search

PRESETS = {
    # Real model and data; measured to finish well under 15 minutes on 2 CPU cores.
    "default": dict(model="smollm2-135m", task="sst2", steps=40, micro_batch=4, nproc=2, eval_limit=None,
                    score=dict(warmup_steps=20, proxy_examples=256, samples=256),
                    search=dict(ranks="2,4,8,16", lr="2e-4:3e-3", min_steps=8, max_steps=24, max_compute=4.0,
                                val_limit=100, micro_batch=4)),
    # Same code path on a random tiny Llama: a smoke test of the whole campaign.
    "tiny": dict(model="tiny", task="sst2", steps=6, micro_batch=2, nproc=2, eval_limit=32,
                 score=dict(warmup_steps=3, proxy_examples=32, samples=32, micro_batch=2),
                 search=dict(ranks="2,4", lr="1e-3:1e-2", min_steps=1, max_steps=3, max_compute=2.0,
                             val_limit=16, micro_batch=2)),
}


@dataclass
class CampaignArgs:
    preset: str = arg("default", f"one of {sorted(PRESETS)}")
    output: str = arg("runs/campaign", "campaign folder; rerun the same command to resume")
    nproc: int | None = arg(None, "training ranks (local processes); default from the preset")
    steps: int | None = arg(None, "training steps; default from the preset")
    zero: str = arg("3", "DeepSpeed config for training: 0, 2, 3 or a JSON path")
    quant: str = arg("none", "backbone for training and evaluation: none or nf4")
    allocation: str | None = arg(None, "allocation.json to train; skips the score stage")
    select_k: int | None = arg(None, "layers the score stage keeps; default 25%% of the layers")
    search: bool = arg(True, "search rank and learning rate with SMAC before training (--no-search: "
                             "train the allocation as scored, at the default learning rate)")
    launcher: str = arg("local", "how score and train start their ranks: local (torchrun on this machine) "
                                 "or srun (inside an sbatch job: --nodes x --nproc tasks; see slurm/)")
    nodes: int = arg(1, "nodes for score and train with --launcher srun (--nproc is ranks per node)")

    def validate(self) -> None:
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"unknown preset {self.preset!r}: choose one of {sorted(PRESETS)}")
        if self.launcher not in ("local", "srun"):
            problems.append(f"--launcher must be local or srun, got {self.launcher!r}")
        if self.nodes < 1 or (self.nproc is not None and self.nproc < 1):
            problems.append("--nodes and --nproc must be >= 1")
        if self.nodes > 1 and self.launcher != "srun":
            problems.append("--nodes > 1 needs --launcher srun (run the campaign from an sbatch script: "
                            "floe-dist slurm render)")
        if self.launcher == "srun" and "MASTER_ADDR" not in os.environ:
            problems.append("--launcher srun needs MASTER_ADDR (the sbatch template exports it)")
        if problems:
            raise ValueError("bad campaign arguments:\n  - " + "\n  - ".join(problems))


def _stage(name: str, result_file: Path, timings: dict, fn):
    """Run ``fn`` unless its result file exists; record wall time."""
    if result_file.is_file():
        print(f"[campaign] {name}: done earlier ({result_file})")
        result = json.loads(result_file.read_text())
        timings[name] = result.get("_seconds", 0.0)
        return result
    print(f"[campaign] {name} ...", flush=True)
    start = time.time()
    result = fn()
    result["_seconds"] = timings[name] = time.time() - start
    write_json_atomic(result_file, result)
    return result


def stage_command(stage: str, stage_args, nproc: int) -> list[str]:
    """A torchrun command line (argument list, never a shell string) for a stage's dataclass args."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "launcher.cli",
            *stage_argv(stage, stage_args)]


def stage_argv(stage: str, stage_args) -> list[str]:
    """``STAGE --flag value ...`` for the fields of a stage's dataclass that differ from their defaults."""
    argv = [stage]
    for f in fields(stage_args):
        value = getattr(stage_args, f.name)
        if value is None or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        argv += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return argv


def run(args: CampaignArgs) -> dict:
    args.validate()
    preset = PRESETS[args.preset]
    nproc = args.nproc or preset["nproc"]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    _stage("prepare", out / "prepare.json", timings,
           lambda: {"model_dir": str(resolve_model(preset["model"]))})
    eval_args = dict(model=preset["model"], task=preset["task"], quant=args.quant, limit=preset["eval_limit"])
    zero_shot = _stage("zero_shot", out / "zero_shot.json", timings, lambda: evaluate(EvalArgs(**eval_args)))

    def launch(stage: str, stage_args, result: Path) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
        if args.launcher == "srun":  # this script runs on the allocation's first node, MASTER_ADDR
            env["MASTER_PORT"] = str(free_port())
            command = srun_stage_command(stage_argv(stage, stage_args), args.nodes, nproc)
        else:
            command = stage_command(stage, stage_args, nproc)
        code = subprocess.call(command, env=env)
        if code != 0:
            raise ChildProcessError(f"{stage} stage failed (exit {code}, its error is printed above); "
                                    f"rerun the campaign to resume it")
        return json.loads(result.read_text())

    allocation = args.allocation
    if allocation is None:
        score_args = ScoreArgs(model=preset["model"], task=preset["task"], output=str(out / "score"),
                               zero=args.zero, quant=args.quant, k=args.select_k, **preset["score"])
        scored = _stage("score", out / "score_stage.json", timings,
                        lambda: launch("score", score_args, out / "score" / "fisher.json"))
        print(f"[campaign] selected layers {scored['selected_layers']}")
        allocation = str(out / "score" / "allocation.json")
    lr = TrainArgs.lr
    if args.search:
        search_args = SearchArgs(model=preset["model"], task=preset["task"], allocation=allocation,
                                 output=str(out / "search"), quant=args.quant, **preset["search"])
        found = _stage("search", out / "search_stage.json", timings, lambda: search(search_args))
        allocation, lr = str(out / "search" / "allocation.json"), found["lr"]
        print(f"[campaign] search chose rank {found['rank']}, learning rate {lr:.2e}")
    train_args = TrainArgs(model=preset["model"], task=preset["task"], output=str(out / "train"),
                           steps=args.steps or preset["steps"], micro_batch=preset["micro_batch"],
                           zero=args.zero, quant=args.quant, allocation=allocation, lr=lr)
    trained = _stage("train", out / "train_stage.json", timings,
                     lambda: launch("train", train_args, out / "train" / "train.json"))
    final = _stage("final_eval", out / "final_eval.json", timings,
                   lambda: evaluate(EvalArgs(**eval_args, adapter=str(out / "train" / "adapter"))))

    summary = {"preset": args.preset, "model": preset["model"], "task": preset["task"], "ranks": nproc * args.nodes,
               "allocation": allocation, "lr": lr,
               "zero_shot_accuracy": zero_shot["accuracy"], "final_accuracy": final["accuracy"],
               "trainable_parameters": trained["trainable_parameters"], "stage_seconds": timings,
               "args": asdict(args)}
    write_json_atomic(out / "campaign.json", summary)
    print("\n[campaign] summary")
    print(f"  model / task          {preset['model']} / {preset['task']} ({final['examples']} test examples)")
    print(f"  zero-shot accuracy    {zero_shot['accuracy']:.4f}")
    print(f"  final accuracy        {final['accuracy']:.4f}")
    print(f"  trainable parameters  {trained['trainable_parameters']:,}")
    for name, seconds in timings.items():
        print(f"  {name:<21} {seconds:7.1f} s")
    print(f"  total                 {sum(timings.values()):7.1f} s")
    return summary
