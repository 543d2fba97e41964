"""Evaluation: what fits the task's format, on a base model or an exported adapter (``floe-dist evaluate``,
the campaign's zero-shot and final scores, and each search trial's validation cost).

Multiple choice: each (prompt, choice) pair is scored by the summed log-probability of the choice
tokens given the prompt; the prediction is the highest-scoring choice (lm-eval-harness's ``acc``).
Generative (alpaca, chat, text, arithmetic): validation loss (mean negative log-likelihood per answer
token) and perplexity, and, for examples with a prompt, greedy generation scored by normalised exact
match (SQuAD's normalisation) and by numeric answer (GSM8K's ``#### 42``, "the answer is 42", else the
last number). Runs in one process on the exported adapter, so evaluation also proves the export loads back.

"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from floe_dist.data import Example, collate, encode
from floe_dist.generation import generate, numeric_answer, score_generations, stop_strings
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import resolve_model
from floe_dist.recipe import EvaluateSection, Recipe
from floe_dist.resources import Resources


@torch.no_grad()
def choice_scores(model: AnswerLM, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                  device: torch.device, progress: bool = True, share_prompts: bool = True) -> list[list[float]]:
    """Summed log-probability of every choice of every example: the prompt runs once per example and its
    KV cache serves every choice (``AnswerLM.choice_logprobs``); an example whose prompt must be cut to fit
    ``max_length``, or has none (or every example, ``share_prompts=False``), is scored pair by pair, each
    prompt + choice a sequence of its own, as ``encode`` cuts it."""
    tokens = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    scores: list[list[float]] = [[0.0] * len(ex.choices) for ex in examples]
    shared, pairs = [], []
    for i, ex in enumerate(examples):
        prompt, answers = tokens(ex.prompt) if ex.prompt else [], [tokens(c) for c in ex.choices]
        if share_prompts and prompt and len(prompt) + max(len(a) for a in answers) <= max_length:
            shared.append((i, prompt, answers))
        else:
            pairs += [(i, c) for c in range(len(ex.choices))]
    model.eval()
    with tqdm(total=len(shared) + len(pairs), desc="evaluate", disable=not progress, leave=False) as bar:
        for start in range(0, len(shared), batch_size):
            chunk = shared[start:start + batch_size]
            got = model.choice_logprobs([p for _, p, _ in chunk], [a for _, _, a in chunk], tokenizer.pad_token_id)
            for (i, _, _), s in zip(chunk, got):
                scores[i] = s
            bar.update(len(chunk))
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = collate([encode(tokenizer, examples[i].prompt, examples[i].choices[c], max_length)
                             for i, c in chunk], tokenizer.pad_token_id)
            out = model(**{k: v.to(device) for k, v in batch.items()})
            for (i, c), s in zip(chunk, out["seq_logprob"].tolist()):
                scores[i][c] = s
            bar.update(len(chunk))
    return scores


def choice_errors(scores: list[list[float]], examples: list[Example]) -> list[float]:
    """1.0 where the highest-scored choice is not the right one, else 0.0, per example."""
    return [float(max(range(len(s)), key=s.__getitem__) != ex.label) for s, ex in zip(scores, examples)]


def accuracy(scores: list[list[float]], examples: list[Example]) -> float:
    return (len(examples) - sum(choice_errors(scores, examples))) / len(examples)


@torch.no_grad()
def answer_nll(model: AnswerLM, tokenizer, examples: list[Example], batch_size: int, max_length: int,
               device: torch.device) -> tuple[float, int]:
    """Summed negative log-likelihood of the answer tokens, and their count (``model`` in eval mode: an
    ``AnswerLM`` or a DeepSpeed engine around one; a training run sums each rank's share)."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate([encode(tokenizer, e.prompt, e.choices[e.label], max_length)
                         for e in examples[start:start + batch_size]], tokenizer.pad_token_id)
        out = model(**{k: v.to(device) for k, v in batch.items()})
        total -= out["seq_logprob"].sum().item()
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    return total, tokens


def answer_loss(model: AnswerLM, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                device: torch.device) -> float:
    """Mean negative log-likelihood per answer token (its exp is the perplexity)."""
    total, tokens = answer_nll(model.eval(), tokenizer, examples, batch_size, max_length, device)
    return total / max(tokens, 1)


def choice_losses(scores: list[list[float]], examples: list[Example]) -> list[float]:
    """Each example's cross-entropy of the right choice under a softmax over the choices' log-likelihoods."""
    return [-torch.log_softmax(torch.tensor(s, dtype=torch.float64), 0)[ex.label].item()
            for s, ex in zip(scores, examples)]


def choice_loss(scores: list[list[float]], examples: list[Example]) -> float:
    """Mean of ``choice_losses``: a smooth stand-in for 1 - accuracy, the objective of ``floe-dist search``."""
    return sum(choice_losses(scores, examples)) / len(examples)


def evaluate(recipe: Recipe, resources: Resources | None = None, per_example: bool = False) -> dict:
    """Load the backbone (and ``model.adapter``) in one process and score it on ``evaluate.split``."""
    from floe_dist.modeling.export import export_meta, load_adapter

    recipe.validate("evaluate", "model", "data")
    m, start = recipe.model, time.time()
    if m.adapter:
        meta = export_meta(m.adapter)  # fail early on a bad folder, before loading a model
        if meta.get("quant", "none") != m.quant:
            print(f"note: adapter was trained with quant={meta.get('quant')}, evaluating with {m.quant}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resources = resources or Resources()
    model_dir = resolve_model(m.name)
    tokenizer = resources.tokenizer(model_dir)
    lm = resources.eval_backbone(model_dir, m.quant, device)
    lm.set_attn_implementation(m.attn_implementation)
    if m.adapter:
        load_adapter(lm, m.adapter)
    result = evaluate_lm(recipe, lm, tokenizer, device, resources, per_example)
    e = recipe.evaluate
    if e.lm_eval_task_list:
        result["lm_eval"] = lm_eval_results(lm, tokenizer, e)
    result["seconds"] = time.time() - start
    what = (f"exact match {result['exact_match']:.4f}, numeric {result['numeric_match']:.4f}"
            if "exact_match" in result else f"accuracy {result['accuracy']:.4f}")
    print(f"{recipe.data.name}/{recipe.evaluate.split}: {what}, loss {result['loss']:.4f} on {result['examples']} "
          f"examples ({'adapter ' + m.adapter if m.adapter else 'zero-shot'}, {result['seconds']:.0f}s)")
    return result


def lm_eval_results(lm, tokenizer, settings: EvaluateSection) -> dict:
    """lm-evaluation-harness's scores of the loaded model on ``evaluate.lm_eval_tasks``, printed a line each."""
    from floe_dist.lm_eval_model import harness_results  # lm-eval's presence: EvaluateSection.problems
    results = harness_results(lm, tokenizer, settings.lm_eval_task_list, settings.lm_eval_include, settings.limit,
                              settings.batch_size)
    for task, metrics in results.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        print(f"lm-eval {task}: {shown}")
    return results


def evaluate_lm(recipe: Recipe, lm, tokenizer, device: torch.device, resources: Resources | None = None,
                per_example: bool = False) -> dict:
    """The task's scores for ``lm`` as it is (with or without adapters): the work of ``run`` after loading.
    ``per_example`` adds each choice example's loss and 0/1 error, in order (a search compares two trials
    example by example, so it can tell a margin from the noise of a small validation set)."""
    d, e, max_length = recipe.data, recipe.evaluate, recipe.model.max_length
    resources = resources or Resources()
    examples = resources.examples(d, e.split, tokenizer)[: e.limit]
    model = AnswerLM(lm)
    model.reset_activity()
    result = {"task": d.name, "split": e.split, "examples": len(examples), "adapter": recipe.model.adapter}
    if all(x.generative for x in examples):
        result.update(evaluate_generative(e, max_length, model, lm, tokenizer, examples, device))
    else:
        scores = choice_scores(model, tokenizer, examples, e.batch_size, max_length, device)
        result.update(accuracy=accuracy(scores, examples), choice_loss=choice_loss(scores, examples))
        result["loss"] = result["choice_loss"]
        if per_example:
            result["example_losses"] = choice_losses(scores, examples)
            result["example_errors"] = choice_errors(scores, examples)
    result["active_parameters_per_token"] = model.active_parameters_per_token()  # 0 without adapters
    return result


def evaluate_generative(settings: EvaluateSection, max_length: int, model: AnswerLM, lm, tokenizer, examples: list[Example],
                        device) -> dict:
    """Loss and perplexity on every example; generation scores on those with a prompt (not plain text)."""
    import math

    loss = answer_loss(model, tokenizer, examples, settings.batch_size, max_length, device)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": 0.0}
    prompted = [e for e in examples if e.prompt]
    if prompted:
        texts = generate(lm, tokenizer, [e.prompt for e in prompted], max_new_tokens=settings.max_new_tokens,
                         stop=stop_strings(settings.stop), batch_size=settings.batch_size, max_length=max_length,
                         device=device)
        scores = score_generations(texts, [e.reference for e in prompted])
        result.update(scores, accuracy=scores["exact_match"],
                      samples=[{"prompt": e.prompt[-200:], "generation": t, "reference": e.reference}
                               for e, t in list(zip(prompted, texts))[:5]])
        if all(numeric_answer(e.reference) is not None for e in prompted):  # a numeric task: its answer decides
            result["accuracy"] = scores["numeric_match"]
    return result
