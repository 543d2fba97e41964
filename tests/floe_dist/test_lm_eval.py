"""lm-evaluation-harness as a client: its own task machinery, on a local task the test writes, scores a LoRA-MoE
adapter exactly as ``floe-dist evaluate`` does, and a plain-LoRA export the same through the floe-dist model and
through lm-eval's stock ``hf`` model with ``peft=``.

lm-eval is imported inside the tests, never at collection: importing it sets environment variables
(``HF_XET_HIGH_PERFORMANCE``), and a test process whose environment differs from its forked-CLI server's runs
every later CLI call in a fresh interpreter (tests/forked_cli.py); the conftest restores the environment after
each test."""
from __future__ import annotations

import json
import re

import pytest
import torch

from floe_dist.allocation import Allocation
from floe_dist.data import Example
from floe_dist.evaluation import choice_scores
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model
from floe_dist.modeling.export import load_adapter, save_adapter
from floe_dist.modeling.inject import inject_adapters, lora_state_dict
from tests.conftest import run_floe

REVIEWS = [("a warm, funny film", 1), ("dull and far too long", 0), ("the best thing this year", 1),
           ("I walked out", 0), ("sharp writing, great cast", 1), ("a mess from start to end", 0),
           ("quietly moving", 1), ("boring", 0), ("a delight", 1), ("nothing works here", 0)]
TASKS = {
    "toy_choice": {"output_type": "multiple_choice", "doc_to_text": "{{prompt}}", "doc_to_choice": "{{choices}}",
                   "doc_to_target": "label", "target_delimiter": "", "metric_list": [{"metric": "acc"}]},
    "toy_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{prompt}}",
                    "metric_list": [{"metric": "word_perplexity"}]},
    "toy_generate": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{choices[label]}}",
                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                     "metric_list": [{"metric": "exact_match"}, {"metric": "chrf"}]},  # chrF: text, scored
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


def write_tasks(folder):
    """A JSONL of multiple-choice rows (floe-dist's format) and lm-eval task YAMLs over it."""
    rows = [{"prompt": f"Review: {text}\nSentiment:", "choices": [" negative", " positive"], "label": label}
            for text, label in REVIEWS]
    (folder / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, spec in TASKS.items():
        config = {"task": name, "dataset_path": "json", "test_split": "test",
                  "dataset_kwargs": {"data_files": {"test": str(folder / "reviews.jsonl")}}, **spec}
        (folder / f"{name}.yaml").write_text(json.dumps(config))  # YAML reads JSON
    return folder


def random_export(folder, experts: int):
    """An export of adapters with random weights on every layer's q_proj and v_proj (B is not zero)."""
    allocation = Allocation.uniform(4, ["q_proj", "v_proj"], experts=experts, rank=4, alpha=16.0, router="dense")
    lm = load_backbone(resolve_model("tiny"))
    torch.manual_seed(experts)
    inject_adapters(lm, allocation)
    with torch.no_grad():
        for p in lora_state_dict(lm).values():
            p.normal_(0, 0.3)
    return save_adapter(folder, {k: v.detach().clone() for k, v in lora_state_dict(lm).items()}, allocation,
                        {"base_model": "tiny", "quant": "none"})


def harness(model: str, model_args: str, tasks: list[str], task_dir) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import floe_dist.lm_eval_model  # noqa: F401  (registers "floe-dist")

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=4, device="cpu",
                                   task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)


def our_choice_scores(export, quant: str = "none") -> list[float]:
    """floe-dist's log-likelihood of every choice, on the backbone and adapter that ``evaluate`` loads."""
    lm = load_adapter(load_backbone(resolve_model("tiny"), quant), export).eval()
    tok = load_tokenizer(resolve_model("tiny"))
    scores = choice_scores(AnswerLM(lm), tok, [Example(f"Review: {t}\nSentiment:", (" negative", " positive"), y)
                                               for t, y in REVIEWS], 4, 64, torch.device("cpu"), progress=False)
    return [x for row in scores for x in row]


def harness_choice_scores(out: dict) -> list[float]:
    theirs = {s["doc_id"]: [ll for ll, _ in s["filtered_resps"]] for s in out["samples"]["toy_choice"]}
    return [x for i in range(len(REVIEWS)) for x in theirs[i]]


def test_lm_eval_scores_a_lora_moe_adapter_as_floe_dist_evaluate_does(tmp_path, task_dir):
    export = random_export(tmp_path / "moe", experts=2)
    out = harness("floe-dist", f"adapter={export}", ["toy_choice"], task_dir)
    assert harness_choice_scores(out) == pytest.approx(our_choice_scores(export), abs=1e-4)  # every choice
    # the accuracy through the CLI: floe-dist evaluate's own and lm-eval's, in one run
    proc = run_floe(["evaluate", "--model", "tiny", "--adapter", str(export), "--task", str(task_dir / "reviews.jsonl"),
                     "--data-format", "multiple_choice", "--split", "all", "--lm-eval-tasks", "toy_choice",
                     "--lm-eval-include", str(task_dir)])
    accuracy = float(re.search(r"accuracy (\d\.\d+)", proc.stdout).group(1))
    harness_acc = float(re.search(r"lm-eval toy_choice: acc,none (\d\.\d+)", proc.stdout).group(1))
    assert accuracy == harness_acc == pytest.approx(out["results"]["toy_choice"]["acc,none"], abs=1e-4)
    assert 0 < accuracy < 1  # the adapter moves scores off the base's (a random model's answers are not all one way)


def test_the_floe_dist_model_loads_an_nf4_backbone_as_evaluate_does(tmp_path, task_dir):
    export = random_export(tmp_path / "moe", experts=2)
    nf4 = harness_choice_scores(harness("floe-dist", f"adapter={export},quant=nf4", ["toy_choice"], task_dir))
    assert nf4 == pytest.approx(our_choice_scores(export, "nf4"), abs=1e-4)
    assert nf4 != pytest.approx(our_choice_scores(export), abs=1e-4)  # the 4-bit backbone, not the fp32 one


def test_a_plain_lora_export_scores_the_same_through_lm_evals_hf_model_with_peft(tmp_path, task_dir):
    export = random_export(tmp_path / "lora", experts=1)
    tasks = list(TASKS)
    ours = harness("floe-dist", f"adapter={export}", tasks, task_dir)
    stock = harness("hf", f"pretrained={resolve_model('tiny')},peft={export / 'peft'},dtype=float32", tasks, task_dir)
    base = harness("floe-dist", "base=tiny", ["toy_rolling"], task_dir)
    for task in tasks:
        mine = {s["doc_id"]: s["filtered_resps"] for s in ours["samples"][task]}
        theirs = {s["doc_id"]: s["filtered_resps"] for s in stock["samples"][task]}
        if task == "toy_generate":
            assert mine == theirs and any(r[0] for r in mine.values())  # greedy text, word for word
        else:
            flat = lambda resps: [float(x) for i in sorted(resps) for x in re.findall(r"-?\d+\.\d+", str(resps[i]))]  # noqa: E731
            assert flat(mine) == pytest.approx(flat(theirs), abs=1e-4) and flat(mine)
    perplexity = "word_perplexity,none"
    assert ours["results"]["toy_rolling"][perplexity] == pytest.approx(stock["results"]["toy_rolling"][perplexity],
                                                                        rel=1e-5)
    assert ours["results"]["toy_rolling"][perplexity] != pytest.approx(base["results"]["toy_rolling"][perplexity],
                                                                         rel=1e-3)  # the adapter was applied
