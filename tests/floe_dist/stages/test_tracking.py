"""Metrics beyond metrics.jsonl: held-out loss during training (equal to evaluating the export on the same
examples, with the work split over ZeRO-3 ranks), and W&B (offline) and MLflow runs that a resume continues."""
from __future__ import annotations

import json

import pytest
import torch

from floe_dist.data import load_data
from floe_dist.evaluation import answer_nll
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model
from floe_dist.modeling.export import load_adapter
from tests.conftest import read_metrics, recipe_for, run_floe

TRACKED = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def test_held_out_loss_and_trackers_continue_the_same_runs_on_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    common = ["train", "--model", "tiny", "--zero", "3", "--micro-batch", "2", "--checkpoint-every", "4",
              "--eval-every", "4", "--eval-examples", "7", "--report-to", "tensorboard,wandb,mlflow",
              "--output", str(out)]
    run_floe([*common, "--steps", "4"], nproc=2, env=TRACKED)
    ids = json.loads((out / "tracking.json").read_text())
    run_floe([*common, "--steps", "8"], nproc=2, env=TRACKED)  # resumes at step 4
    assert json.loads((out / "tracking.json").read_text()) == ids
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert [m["step"] for m in metrics if "eval_loss" in m] == [4, 8]
    # the logged held-out loss is the export's answer loss on the first 6 test examples (7 cut to 3 per rank)
    tok = load_tokenizer(resolve_model("tiny"))
    recipe = recipe_for("train", model="tiny")
    held_out = load_data(recipe.data, "test", tok)[:6]
    lm = load_adapter(load_backbone(resolve_model("tiny")), out / "adapter").eval()
    nll, tokens = answer_nll(AnswerLM(lm), tok, held_out, 4, recipe.model.max_length, torch.device("cpu"))
    expected = nll / tokens
    assert metrics[-1]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics[-1]["eval_loss"] != pytest.approx(metrics[3]["eval_loss"], rel=1e-6)  # training moved it
    # W&B: an offline run per start, both under the one id; MLflow: one run holding all eight steps
    starts = sorted((out / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(s.name.endswith(ids["wandb"]) and any(s.glob("*.wandb")) for s in starts)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "train.loss")] == list(range(1, 9))
    history = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "eval.loss")}
    assert history == pytest.approx({4: metrics[3]["eval_loss"], 8: metrics[-1]["eval_loss"]})


def test_an_unknown_tracker_or_one_without_its_library_is_refused_before_training(tmp_path, monkeypatch):
    import floe_dist.tracking

    monkeypatch.setattr(floe_dist.tracking, "missing_library", lambda name: name == "wandb")
    assert recipe_for("train", report_to="tensorboard,wandb").problems("train") == [
        "train.report_to=wandb needs its library: pip install 'floe-dist[track]'"]
    proc = run_floe(["train", "--model", "tiny", "--steps", "2", "--report-to", "tensorboard,comet",
                     "--output", str(tmp_path / "x")], check=False)
    assert proc.returncode == 2 and "train.report_to: unknown ['comet']" in proc.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()
