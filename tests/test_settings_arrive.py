"""Every recipe setting that changes a computation reaches code that reads it.

A recipe with settings away from their defaults runs every stage in this process (score, allocate with each
method, search, train, evaluate, generate, plan) through section objects that record which of their settings code
reads. Reads made to copy, print, compare or validate a recipe (``dataclasses``, ``Recipe.flat``, ``problems``)
do not count. A setting no stage reads never arrives: the test names it. Settings marked as saying only how or
where work runs (``resume="runs"``) or read by the campaign alone (``"campaign"``) are the launcher's and the
campaign's, not the stages'.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import replace

import yaml

from floe_dist.recipe import Recipe, field_paths, load_recipe, marked
from tests.floe_dist.test_data_formats import ALPACA_COLUMNS, alpaca_rows, write_jsonl
from tests.floe_dist.test_lm_eval import task_dir  # noqa: F401  (the fixture: lm-eval tasks of its own)

NOT_COUNTED = {"flat", "problems", "validate", "__post_init__"}


def recording(section, prefix: str, read: set[str]):
    """``section`` (and the sections in it) as objects of subclasses that add the dotted name of every setting
    code reads to ``read``."""
    names = {f.name for f in dataclasses.fields(section)}

    def getattribute(self, name):
        if name in names:
            frame = sys._getframe(1)
            callers = set()
            while frame is not None:
                callers.add(frame.f_code.co_name)
                copying = frame.f_code.co_filename.endswith(("dataclasses.py", "copy.py"))
                frame = None if copying else frame.f_back
            if not copying and not callers & NOT_COUNTED:
                read.add(prefix + name)
        return object.__getattribute__(self, name)

    cls = type(type(section).__name__, (type(section),), {"__getattribute__": getattribute})
    copy = object.__new__(cls)
    for f in dataclasses.fields(section):
        value = object.__getattribute__(section, f.name)
        object.__setattr__(copy, f.name, recording(value, f"{prefix}{f.name}.", read)
                           if dataclasses.is_dataclass(value) else value)
    return copy


def test_every_setting_that_computes_is_read_by_a_stage(tmp_path, task_dir):  # noqa: F811
    from floe_dist.stages import allocate, evaluate, generate, plan, score, search, train

    data = write_jsonl(tmp_path / "data.jsonl", alpaca_rows(60))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "model": {"name": "tiny", "max_length": 48, "attn_implementation": "eager"},
        "data": {"task": str(data), "columns": ALPACA_COLUMNS, "data_format": "alpaca", "test_size": 6,
                 "val_size": 6, "max_train_examples": 40, "system_prompt": "Answer briefly.", "pack": True},
        "adapter": {"targets": ["q_proj", "v_proj"], "experts": 2, "rank": 2, "router": "topk", "top_k": 2,
                    "top_p": 0.9, "min_k": 1, "alpha": 8.0, "dropout": 0.05},
        "score": {"mode": "param", "normalize_param": True, "proxy_examples": 16, "warmup_steps": 2,
                  "warmup_lr": 2e-3, "micro_batch": 2, "samples": 8, "score_batch": 4, "select": "refine",
                  "final_experts": 2, "final_rank": 2, "seed": 1},
        "allocate": {"k": 2, "budget": 5000, "seed": 1,
                     "flexora": {"steps": 2, "batch": 2, "val": 4, "lr": 2e-3},
                     "guilomo": {"steps": 2, "order": "first", "batch": 2, "experts": 2, "rank": 2, "lr": 1e-3},
                     "hilo": {"expert_schedule": [2, 4], "rank_schedule": [2, 4]}},
        "search": {"mode": "smac", "surrogate": "rf", "random_interleave": 0.1, "model_min_points": 2,
                   "model_data": "pooled", "pending": "worst", "ranks": [2, 4], "lr": [5e-4, 2e-3],
                   "experts": [2], "top_ks": [1], "min_steps": 1, "max_steps": 2, "eta": 2, "brackets": "sh",
                   "max_trials": 3, "max_compute": 3.0, "initial_configs": 1, "grid_lr_points": 2,
                   "objective": "error", "separation": 1.0, "failed_cost": 5.0, "micro_batch": 2, "zero": 0,
                   "val_limit": 4, "seed": 1, "trial_seed": 1, "trial_nproc": 1, "trial_launcher": "torchrun",
                   "time_limit": 600, "workers": 1},
        "train": {"steps": 3, "micro_batch": 2, "accumulation": 2, "lr": 2e-3, "warmup_ratio": 0.3,
                  "warmup_steps": 1, "schedule": "wsd", "decay_ratio": 0.5, "weight_decay": 0.01,
                  "balance_coef": 0.02, "split": "train", "seed": 1, "checkpoint_every": 2, "keep_checkpoints": 1,
                  "gradient_checkpointing": True, "capacity_factor": 2.0, "eval_every": 2, "eval_examples": 4,
                  "report_to": "none"},
        "evaluate": {"split": "val", "limit": 4, "max_new_tokens": 3, "stop": ["\n", "###"],
                     "lm_eval_tasks": ["toy_choice"], "lm_eval_include": str(task_dir)},
        "generate": {"prompt": "Add 2 and 3.", "chat": False, "max_new_tokens": 3, "stop": ["\n"], "batch_size": 2},
        "plan": {"device": "cpu", "gpu_memory": 40.0, "peak_tflops": 500.0, "mfu": 0.4, "flash_attention": False,
                 "full_sequence_loss": True, "offload": True, "double_quant": True},
        "campaign": {"budget": "10m", "search_share": 0.4}}))
    read: set[str] = set()
    recipe = recording(load_recipe(str(recipe_file)), "", read)
    out = tmp_path / "runs"

    score.run(recipe, str(out / "score"))
    scored = replace(recipe, allocate=replace(recipe.allocate, scores=str(out / "score" / "fisher.json")))
    for method in ("floe", "random", "flexora", "guilomo", "hilo"):
        allocate.run(replace(scored, allocate=replace(scored.allocate, method=method)), str(out / method))
    chosen = replace(recipe, allocate=replace(recipe.allocate, file=str(out / "floe" / "allocation.json")))
    search.run(chosen, str(out / "search"))
    grid = replace(chosen.search, mode="grid", max_trials=1, trial_nproc=2, trial_launcher="torchrun")
    search.run(replace(chosen, search=grid, train=replace(chosen.train, warmup_steps=None)), str(out / "grid"))
    train.run(chosen, str(out / "train"))
    train.run(replace(chosen, train=replace(chosen.train, warmup_steps=None)), str(out / "warmup_ratio"))
    adapted = replace(chosen, model=replace(chosen.model, adapter=str(out / "train" / "adapter")))
    evaluate.run(adapted, str(out / "evaluate"))
    generate.run(adapted, None)
    generate.run(replace(adapted, generate=replace(adapted.generate, prompt=None, input=str(data), limit=2)), None)
    plan.run(replace(recipe, model=replace(recipe.model, shape="llama3-8b", quant="nf4")), None)

    not_the_stages = marked("runs", "campaign")
    unread = sorted(set(field_paths(Recipe)) - read - not_the_stages)
    assert unread == [], unread
