"""Log-likelihood scoring against the plain full-logits definition, and the evaluate command."""
from __future__ import annotations

import math

import pytest
import torch

from floe_dist.data import Example, collate, encode
from floe_dist.evaluation import accuracy, answer_nlls, choice_loss, choice_scores
from floe_dist.generation import generate, longest_first
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import load_backbone, load_tokenizer
from tests.conftest import run_floe, run_here


def test_choice_scores_equal_full_logit_log_likelihood(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    lm = load_backbone(tiny_model_dir)
    examples = [Example("Review: good film\nSentiment:", (" negative", " positive"), 1),
                Example("Q: two plus two?\nA:", (" four", " five hundred", " 4"), 0),
                Example("Q: a much longer question, " * 12 + "yes or no?\nA:", (" yes", " no"), 1)]  # cut to fit
    # prompts run once for all their choices (a KV cache, left-padded batches) and, where the prompt must
    # be cut, prompt + choice pairs: both equal the plain definition, in any batch size
    scores = choice_scores(AnswerLM(lm), tok, examples, batch_size=3, max_length=64,
                           device=torch.device("cpu"), progress=False)
    one_by_one = choice_scores(AnswerLM(lm), tok, examples, batch_size=1, max_length=64,
                               device=torch.device("cpu"), progress=False)
    assert len(tok(examples[2].prompt, add_special_tokens=False).input_ids) > 64
    for ex, row, single in zip(examples, scores, one_by_one):
        assert row == pytest.approx(single, abs=1e-4)
        for c, score in enumerate(row):
            ids, n = encode(tok, ex.prompt, ex.choices[c], 64)
            with torch.no_grad():
                logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0, :-1], -1)
            manual = sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))
            assert abs(score - manual) < 1e-4
    assert accuracy([[0.0, -1.0], [-3.0, -2.0, -9.0]], examples[:2]) == 0.0
    assert accuracy([[-1.0, 0.0], [-1.0, -2.0, -9.0]], examples[:2]) == 1.0
    # choice loss: -log of the right choice's softmax share; equal scores give log(#choices)
    assert abs(choice_loss([[0.0, 0.0], [-5.0, -5.0, -5.0]], examples[:2]) - (math.log(2) + math.log(3)) / 2) < 1e-12
    assert abs(choice_loss([[0.0, math.log(3)], [0.0, -50.0, -50.0]], examples[:2]) - math.log(4 / 3) / 2) < 1e-9


def test_batches_run_longest_first_and_results_come_back_in_order(tiny_model_dir):
    tok, lm = load_tokenizer(tiny_model_dir), load_backbone(tiny_model_dir)
    assert longest_first([2, 5, 1, 5, 3]) == [1, 3, 4, 0, 2]
    prompts = ["Q: one?\nA:", "Q: a rather longer question than the first one, about seven?\nA:", "Q: two?\nA:",
               "Q: a question of middling length?\nA:", "Q: the longest question here, " * 3 + "eight?\nA:"]
    examples = [Example(p, (f" {i}",), 0) for i, p in enumerate(prompts)]
    cpu = torch.device("cpu")
    batched = answer_nlls(AnswerLM(lm).eval(), tok, examples, batch_size=2, max_length=64, device=cpu)
    alone = [answer_nlls(AnswerLM(lm).eval(), tok, [e], batch_size=1, max_length=64, device=cpu)[0] for e in examples]
    assert [n for _, n in batched] == [n for _, n in alone]
    assert [nll for nll, _ in batched] == pytest.approx([nll for nll, _ in alone], abs=1e-4)
    written = generate(lm, tok, prompts, max_new_tokens=4, stop=[], batch_size=2, max_length=64, device=cpu)
    assert written == [generate(lm, tok, [p], max_new_tokens=4, stop=[], batch_size=1, max_length=64,
                                device=cpu)[0] for p in prompts]


def answer_loss_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain definition: cross-entropy of every labelled token from full logits (B, T, V)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


def test_answer_loss_equals_cross_entropy_on_full_logits(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    lm = load_backbone(tiny_model_dir)
    batch = collate([encode(tok, "Review: bad\nSentiment:", " negative", 64),
                     encode(tok, "Review: lovely and warm\nSentiment:", " positive", 64)], tok.pad_token_id)
    with torch.no_grad():
        ours = AnswerLM(lm)(**batch)["ce"]
        ref = answer_loss_reference(lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    assert abs(ours.item() - ref.item()) < 1e-5


def test_evaluate_command_and_its_errors(tmp_path):
    proc = run_floe(["evaluate", "--model", "tiny", "--task", "sst2", "--limit", "8"])
    assert "sst2/test: accuracy" in proc.stdout
    proc = run_here(["evaluate", "--model", "tiny", "--adapter", str(tmp_path / "none")])
    assert proc.returncode == 2 and "not a complete floe-dist export" in proc.stderr
    proc = run_here(["evaluate", "--model", str(tmp_path / "nomodel")])
    assert proc.returncode == 2 and "not a known name" in proc.stderr


def test_padded_tokens_count_what_choice_scoring_runs_padding_included():
    """Batches taken longest first: each batch's prompts padded to the longest, then each choice position to its
    longest answer; an example whose prompt must be cut is scored pair by pair, each pair padded to its batch's
    longest (words as tokens here)."""
    from types import SimpleNamespace

    from floe_dist.evaluation import padded_tokens, scoring_plan

    tok = lambda text, add_special_tokens=False: SimpleNamespace(input_ids=text.split())  # noqa: E731
    count = lambda examples, batch, most: padded_tokens(scoring_plan(tok, examples, most), batch, most)  # noqa: E731
    a, b = Example("p p p", (" x", " y y y"), 0), Example("p", (" x x", " y"), 1)  # 3+3 and 1+2 tokens long
    assert count([a, b], 2, 100) == 2 * 3 + 2 * 2 + 2 * 3  # prompts to 3, choice 0 to 2, choice 1 to 3
    assert count([b, a], 1, 100) == (3 + 1 + 3) + (1 + 2 + 1)  # a first: one batch each
    long = Example("p p p p p", (" x", " y y"), 0)  # 5 + 2 > 6: two pairs, 6 and 7 tokens, cut to 6
    assert count([long, b], 2, 6) == (1 + 2 + 1) + 2 * 6


def test_a_stopped_evaluation_scores_a_random_part_of_the_split(tiny_model_dir):
    """``stop`` asked before each batch after the first: the chunks finished count (one batch, then STOP_CHUNK
    batches each), drawn in a random order, and their scores are the full evaluation's for those examples."""
    from dataclasses import replace
    from itertools import count

    import numpy as np

    from floe_dist.data import load_data
    from floe_dist.evaluation import STOP_CHUNK, evaluate_lm, padded_tokens, scoring_plan
    from floe_dist.recipe import load_recipe

    recipe = load_recipe("tiny")
    recipe = replace(recipe, evaluate=replace(recipe.evaluate, limit=40, batch_size=4))
    tok, lm, cpu = load_tokenizer(tiny_model_dir), load_backbone(tiny_model_dir), torch.device("cpu")
    full = evaluate_lm(recipe, lm, tok, cpu, per_example=True)
    asked = count(1)
    stopped = evaluate_lm(recipe, lm, tok, cpu, stop=lambda: next(asked) > STOP_CHUNK)  # true in the third chunk
    assert (stopped["examples"], stopped["examples_of"]) == (4 + 4 * STOP_CHUNK, 40)
    part = np.random.default_rng(0).permutation(40)[:stopped["examples"]]
    assert stopped["choice_loss"] == pytest.approx(np.mean([full["example_losses"][i] for i in part]), abs=1e-4)
    examples = load_data(recipe.data, "test", tok)[:40]
    shuffled = [examples[i] for i in np.random.default_rng(0).permutation(40)]
    chunks = [shuffled[:4], shuffled[4:4 + 4 * STOP_CHUNK]]  # each sorted on its own, as it ran
    count = lambda part: padded_tokens(scoring_plan(tok, part, recipe.model.max_length), 4,  # noqa: E731
                                       recipe.model.max_length)
    assert stopped["scored_tokens"] == sum(count(c) for c in chunks) and stopped["split_tokens"] == count(shuffled)
    assert "examples_of" not in evaluate_lm(recipe, lm, tok, cpu, stop=lambda: False)
    with pytest.raises(ValueError, match="one process, without per-example"):
        evaluate_lm(recipe, lm, tok, cpu, per_example=True, stop=lambda: False)


def test_a_stopped_generative_evaluation_scores_a_random_part_of_the_split(tiny_model_dir):
    """A generative task stops as a multiple-choice one does: the chunks finished (one batch, then STOP_CHUNK
    batches), drawn in a random order; its loss and generation scores are those of exactly those examples."""
    from itertools import count

    import numpy as np

    from floe_dist.data import load_data
    from floe_dist.evaluation import STOP_CHUNK, evaluate_lm
    from floe_dist.generation import score_generations
    from tests.conftest import recipe_for

    recipe = recipe_for("evaluate", model="tiny", task="arithmetic", limit=40, max_new_tokens=2, batch_size=4)
    tok, lm, cpu = load_tokenizer(tiny_model_dir), load_backbone(tiny_model_dir), torch.device("cpu")
    asked = count(1)
    stopped = evaluate_lm(recipe, lm, tok, cpu, stop=lambda: next(asked) > STOP_CHUNK)  # true in chunk three
    n = 4 + 4 * STOP_CHUNK
    assert (stopped["examples"], stopped["examples_of"]) == (n, 40)
    examples = load_data(recipe.data, "test", tok)[:40]
    part = [examples[i] for i in np.random.default_rng(0).permutation(40)[:n]]
    pairs = answer_nlls(AnswerLM(lm).eval(), tok, part, 4, recipe.model.max_length, cpu)
    assert stopped["loss"] == pytest.approx(sum(x for x, _ in pairs) / sum(k for _, k in pairs), rel=1e-5)
    write = lambda chunk: generate(lm, tok, [e.prompt for e in chunk], max_new_tokens=2, stop=["\n"],  # noqa: E731
                                   batch_size=4, max_length=recipe.model.max_length, device=cpu)
    texts = write(part[:4]) + write(part[4:])  # each chunk sorted on its own, as it ran
    assert stopped["numeric_match"] == score_generations(texts, [e.reference for e in part])["numeric_match"]
    assert stopped["seconds_per_example"] > 0 and stopped["scoring_seconds"] > 0
    whole = evaluate_lm(recipe, lm, tok, cpu, stop=lambda: False)
    assert "examples_of" not in whole and whole["examples"] == 40
