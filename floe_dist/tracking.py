"""Where a training run's metrics go, on rank 0: ``metrics.jsonl`` always, and the trackers of
``train.report_to``: TensorBoard (default), Weights & Biases and MLflow, each through its own library.

A resumed run continues the same tracker run: the W&B and MLflow run ids are kept in ``tracking.json`` in the
output folder and handed back to ``wandb.init(id=..., resume="allow")`` and ``mlflow.start_run(run_id=...)``.
The libraries' own settings apply (``WANDB_MODE=offline``, ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ...);
without ``MLFLOW_TRACKING_URI`` MLflow writes ``mlflow.db`` (SQLite) in the output folder. Entries past the
checkpoint a run resumes from are dropped from ``metrics.jsonl`` and TensorBoard; W&B keeps the steps it has,
and MLflow keeps both values of a step logged twice.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from floe_dist.files import write_json_atomic

TRACKERS = ("tensorboard", "wandb", "mlflow")


class TensorBoard:
    def __init__(self, out: Path, start_step: int, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: Path, run_id: str | None, name: str, config: dict, **_):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "floe-dist"), name=name, config=config,
                              id=run_id, resume="allow", dir=str(out))
        self.id = self.run.id

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, out: Path, run_id: str | None, name: str, config: dict, **_):
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{out.resolve() / 'mlflow.db'}")
        if not run_id:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "floe-dist"))
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else name)
        self.id = self.run.info.run_id
        if not run_id:
            mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def missing_library(tracker: str) -> bool:
    """Whether a tracker's library (a module of the tracker's name) is not installed, found without importing it."""
    return importlib.util.find_spec(tracker) is None


class MetricsLog:
    """``metrics.jsonl`` plus the trackers; on resume, drops ``metrics.jsonl`` entries past the checkpoint."""

    def __init__(self, out: Path, start_step: int, trackers: list[str] = ("tensorboard",), config: dict | None = None):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        kept = []
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.last: dict = json.loads(kept[-1]) if kept else {}
        ids_file = out / "tracking.json"
        ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        kinds = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
        self.trackers = {}
        for name in trackers:  # checked by the recipe (TrainSection.problems): known, library installed
            self.trackers[name] = kinds[name](out, start_step=start_step, run_id=ids.get(name),
                                              name=out.resolve().name, config=config or {})
        ids.update({n: t.id for n, t in self.trackers.items() if hasattr(t, "id")})
        if ids:
            write_json_atomic(ids_file, ids)

    def write(self, step: int, expert_load: dict[int, list[float]], **scalars: float) -> None:
        self.last = {"step": step, **scalars}
        self.file.write(json.dumps(self.last) + "\n")
        self.file.flush()
        tracked = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in scalars.items()}
        for layer, load in expert_load.items():
            tracked.update({f"expert_load/layer_{layer:02d}/expert_{e}": s for e, s in enumerate(load)})
        for tracker in self.trackers.values():
            tracker.log(tracked, step)

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers.values():
            tracker.close()
