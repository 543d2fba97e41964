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
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from floe_dist.data import Example, collate, encode
from floe_dist.distributed.sharded_eval import SINGLE, Ranks
from floe_dist.generation import generate, longest_first, numeric_answer, score_generations, stop_strings
from floe_dist.modeling.answer_lm import AnswerLM
from floe_dist.modeling.backbone import resolve_model
from floe_dist.recipe import EvaluateSection, Recipe
from floe_dist.resources import Resources


def dummy_forward(model, tokenizer, device) -> Callable[[], object]:
    """One forward of a two-token sequence: a partitioned rank's step with no work left (sharded_eval.Ranks)."""
    batch = collate([([tokenizer.pad_token_id] * 2, 1)], tokenizer.pad_token_id)
    return lambda: model(**{k: v.to(device) for k, v in batch.items()})


STOP_CHUNK = 4  # batches: an evaluation that may stop goes in chunks of this many, each taken longest first


def scoring_plan(tokenizer, examples: list[Example], max_length: int, share_prompts: bool = True
                 ) -> tuple[list[tuple[int, list[int], list[list[int]]]], list[tuple[int, int]], list[int]]:
    """How ``choice_scores`` takes ``examples``: (example, prompt ids, choices' ids) whose prompt runs once for every
    choice, longest first; then (example, choice) pairs scored one sequence each (a prompt cut to fit, or none),
    longest first, with their lengths."""
    tokens = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    shared, pairs, pair_lengths = [], [], []
    for i, ex in enumerate(examples):
        prompt, answers = tokens(ex.prompt) if ex.prompt else [], [tokens(c) for c in ex.choices]
        if share_prompts and prompt and len(prompt) + max(len(a) for a in answers) <= max_length:
            shared.append((i, prompt, answers))
        else:
            pairs += [(i, c) for c in range(len(ex.choices))]
            pair_lengths += [len(prompt) + len(a) for a in answers]
    shared = [shared[k] for k in longest_first([len(p) + max(map(len, a)) for _, p, a in shared])]
    order = longest_first(pair_lengths)
    return shared, [pairs[k] for k in order], [pair_lengths[k] for k in order]


def padded_tokens(plan: tuple, batch_size: int, max_length: int) -> int:
    """The tokens ``choice_scores`` runs for a ``scoring_plan``'s examples, padding included: each batch's prompts
    padded to the longest, then each choice position to its longest answer; a pair to its batch's longest. What
    a multiple-choice evaluation's time goes with: a split scored in chunks of random examples (``choice_scores_
    until``) pads more than the whole split sorted at once."""
    shared, _, lengths = plan
    lengths = [min(n, max_length) for n in lengths]  # ``encode`` cuts the prompt to fit
    total = 0
    for start in range(0, len(shared), batch_size):
        batch = [(p, a) for _, p, a in shared[start:start + batch_size]]
        total += len(batch) * max(len(p) for p, _ in batch)
        total += sum(len(batch) * max(len(a[c]) if c < len(a) else len(a[0]) for _, a in batch)
                     for c in range(max(len(a) for _, a in batch)))
    return total + sum(len(lengths[s:s + batch_size]) * max(lengths[s:s + batch_size])
                       for s in range(0, len(lengths), batch_size))


@torch.no_grad()
def choice_scores(model: AnswerLM, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                  device: torch.device, progress: bool = True, share_prompts: bool = True,
                  ranks: Ranks = SINGLE, stop: Callable[[], bool] | None = None, plan: tuple | None = None
                  ) -> list[list[float]] | None:
    """Summed log-probability of every choice of every example: the prompt runs once per example and its
    KV cache serves every choice (``AnswerLM.choice_logprobs``); an example whose prompt must be cut to fit
    ``max_length``, or has none (or every example, ``share_prompts=False``, or a partitioned model), is scored
    pair by pair, each prompt + choice a sequence of its own, as ``encode`` cuts it. Batches are taken longest
    first (``longest_first``); the scores come back in the examples' order. ``ranks`` keeps a
    partitioned model's forwards in step with the other ranks' (these examples are this rank's share). ``stop``
    (one process) is asked before each batch: None once it is true (``choice_scores_until``). ``plan``: these
    examples' ``scoring_plan`` where the caller made it already."""
    scores: list[list[float]] = [[0.0] * len(ex.choices) for ex in examples]
    shared, pairs, _ = plan or scoring_plan(tokenizer, examples, max_length, share_prompts and not ranks.partitioned)
    model.eval()
    with tqdm(total=len(shared) + len(pairs), desc="evaluate", disable=not progress, leave=False) as bar:
        for start in range(0, len(shared), batch_size):
            if stop is not None and stop():
                return None
            chunk = shared[start:start + batch_size]
            got = model.choice_logprobs([p for _, p, _ in chunk], [a for _, _, a in chunk], tokenizer.pad_token_id)
            for (i, _, _), s in zip(chunk, got):
                scores[i] = s
            bar.update(len(chunk))
        for chunk in ranks.chunks(pairs, batch_size, dummy_forward(model, tokenizer, device)):
            if stop is not None and stop():  # one process: no other rank waits for this one's forwards
                return None
            batch = collate([encode(tokenizer, examples[i].prompt, examples[i].choices[c], max_length)
                             for i, c in chunk], tokenizer.pad_token_id)
            out = model(**{k: v.to(device) for k, v in batch.items()})
            for (i, c), s in zip(chunk, out["seq_logprob"].tolist()):
                scores[i][c] = s
            bar.update(len(chunk))
    return scores


def score_until(examples: list, batch_size: int, stop: Callable[[], bool], score: Callable) -> tuple[list, float]:
    """``score(part, stop)`` over ``examples`` in chunks, in their order (one batch, then ``STOP_CHUNK`` batches at a
    time), until ``stop()`` is true: ``score`` asks it before each batch of a chunk after the first and returns None
    once it is. The chunks' results, in order, and the seconds an example took in them (a chunk cut short counts in
    neither): an evaluation that may stop, multiple choice or generative."""
    done, finished, seconds = [], 0, 0.0
    while finished < len(examples):
        began = time.perf_counter()
        part = examples[finished:finished + (STOP_CHUNK if finished else 1) * batch_size]
        got = score(part, stop if finished else None)
        if got is None:
            break
        done.append(got)
        finished, seconds = finished + len(part), seconds + time.perf_counter() - began
    return done, seconds / max(finished, 1)


def choice_scores_until(model: AnswerLM, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                        device: torch.device, stop: Callable[[], bool]) -> tuple[list[list[float]], float, int]:
    """``choice_scores`` by ``score_until``: the scores of the chunks finished (those of the examples' first part),
    the seconds an example took in them and the tokens they ran (``padded_tokens``)."""
    def score(part: list[Example], until: Callable[[], bool] | None):
        plan = scoring_plan(tokenizer, part, max_length)  # tokenised once: scored and counted
        got = choice_scores(model, tokenizer, part, batch_size, max_length, device, progress=False, stop=until,
                            plan=plan)
        return None if got is None else (got, padded_tokens(plan, batch_size, max_length))

    chunks, pace = score_until(examples, batch_size, stop, score)
    return [s for scores, _ in chunks for s in scores], pace, sum(tokens for _, tokens in chunks)


def choice_errors(scores: list[list[float]], examples: list[Example]) -> list[float]:
    """1.0 where the highest-scored choice is not the right one, else 0.0, per example."""
    return [float(max(range(len(s)), key=s.__getitem__) != ex.label) for s, ex in zip(scores, examples)]


def accuracy(scores: list[list[float]], examples: list[Example]) -> float:
    return (len(examples) - sum(choice_errors(scores, examples))) / len(examples)


@torch.no_grad()
def answer_nlls(model: AnswerLM, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                device: torch.device, ranks: Ranks = SINGLE) -> list[tuple[float, int]]:
    """Each example's summed negative log-likelihood of its answer tokens, and their count, in order (``model`` in
    eval mode: an ``AnswerLM`` or a DeepSpeed engine around one; ``ranks``: see ``choice_scores``); batches are
    taken longest first (``longest_first``)."""
    encoded = [encode(tokenizer, e.prompt, e.choices[e.label], max_length) for e in examples]
    order, pairs = longest_first([len(ids) for ids, _ in encoded]), [(0.0, 0)] * len(examples)
    for chunk in ranks.chunks(order, batch_size, dummy_forward(model, tokenizer, device)):
        batch = collate([encoded[i] for i in chunk], tokenizer.pad_token_id)
        out = model(**{k: v.to(device) for k, v in batch.items()})
        counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
        for i, nll, n in zip(chunk, (-out["seq_logprob"]).tolist(), counts):
            pairs[i] = (nll, n)
    return pairs


def answer_nll(model: AnswerLM, tokenizer, examples: list[Example], batch_size: int, max_length: int,
               device: torch.device, ranks: Ranks = SINGLE) -> tuple[float, int]:
    """``answer_nlls`` summed: the answer tokens' negative log-likelihood and their count (a training run sums
    each rank's share)."""
    pairs = answer_nlls(model, tokenizer, examples, batch_size, max_length, device, ranks)
    return sum(nll for nll, _ in pairs), sum(n for _, n in pairs)


def choice_losses(scores: list[list[float]], examples: list[Example]) -> list[float]:
    """Each example's cross-entropy of the right choice under a softmax over the choices' log-likelihoods."""
    return [-torch.log_softmax(torch.tensor(s, dtype=torch.float64), 0)[ex.label].item()
            for s, ex in zip(scores, examples)]


def choice_loss(scores: list[list[float]], examples: list[Example]) -> float:
    """Mean of ``choice_losses``: a smooth stand-in for 1 - accuracy, the objective of ``floe-dist search``."""
    return sum(choice_losses(scores, examples)) / len(examples)


def evaluate(recipe: Recipe, resources: Resources | None = None, per_example: bool = False,
             on_ranks: bool = False, generations: bool = True, stop: Callable[[], bool] | None = None) -> dict:
    """Load the backbone (and ``model.adapter``) and score it on ``evaluate.split``: in this process, or
    ``on_ranks``, together with every rank of the job, each scoring its share (floe_dist/distributed/sharded_eval.py:
    partitioned under ZeRO-3 as training is). ``stop``: see ``evaluate_lm``."""
    from floe_dist.distributed.sharded_eval import backbone_on_ranks, full_bytes, held_bytes
    from floe_dist.modeling.export import export_meta, load_adapter

    recipe.validate("evaluate", "model", "data", "parallel")
    m, e, start = recipe.model, recipe.evaluate, time.time()
    if m.adapter:
        meta = export_meta(m.adapter)  # fail early on a bad folder, before loading a model
        if meta.get("quant", "none") != m.quant:
            print(f"note: adapter was trained with quant={meta.get('quant')}, evaluating with {m.quant}")
    resources = resources or Resources()
    model_dir = resolve_model(m.name)
    tokenizer = resources.tokenizer(model_dir)
    if on_ranks:
        lm, ranks, device = backbone_on_ranks(recipe, model_dir)
    else:
        ranks, device = SINGLE, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        lm = resources.eval_backbone(model_dir, m.quant, device)
        lm.set_attn_implementation(m.attn_implementation)
        if m.adapter:
            load_adapter(lm, m.adapter)
    scoring_start = time.time()
    result = evaluate_lm(recipe, lm, tokenizer, device, resources, per_example, ranks, generations, stop)
    result.setdefault("scoring_seconds", time.time() - scoring_start)  # a stopped one's: its chunks' own
    result.update(ranks=ranks.world, partitioned=ranks.partitioned, model_bytes=full_bytes(lm),
                  rank_model_bytes=max(ranks.gather([held_bytes(lm)])))
    if e.lm_eval_task_list:
        result["lm_eval"] = lm_eval_results(lm, tokenizer, e, ranks)
    result["seconds"] = time.time() - start
    what = (f"exact match {result['exact_match']:.4f}, numeric {result['numeric_match']:.4f}"
            if "exact_match" in result else "no generations" if result["accuracy"] is None
            else f"accuracy {result['accuracy']:.4f}")
    if ranks.rank == 0:
        on = f", {ranks.world} ranks" + (" (ZeRO-3)" if ranks.partitioned else "") if ranks.world > 1 else ""
        part = f" of {result['examples_of']} (stopped)" if "examples_of" in result else ""
        print(f"{recipe.data.name}/{recipe.evaluate.split}: {what}, loss {result['loss']:.4f} on "
              f"{result['examples']}{part} examples ({'adapter ' + m.adapter if m.adapter else 'zero-shot'}{on}, "
              f"{result['seconds']:.0f}s)")
    return result


def lm_eval_results(lm, tokenizer, settings: EvaluateSection, ranks: Ranks = SINGLE) -> dict:
    """lm-evaluation-harness's scores of the loaded model on ``evaluate.lm_eval_tasks`` (on ``ranks``), printed a
    line each."""
    from floe_dist.lm_eval_model import harness_results  # lm-eval's presence: EvaluateSection.problems
    results = harness_results(lm, tokenizer, settings.lm_eval_task_list, settings.lm_eval_include, settings.limit,
                              settings.batch_size, ranks)
    for task, metrics in results.items() if ranks.rank == 0 else ():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        print(f"lm-eval {task}: {shown}")
    return results


def evaluate_lm(recipe: Recipe, lm, tokenizer, device: torch.device, resources: Resources | None = None,
                per_example: bool = False, ranks: Ranks = SINGLE, generations: bool = True,
                stop: Callable[[], bool] | None = None) -> dict:
    """The task's scores for ``lm`` as it is (with or without adapters): the work of ``run`` after loading.
    ``per_example`` adds each example's loss (and a choice example's 0/1 error), in order (a search compares two
    trials example by example, so it can tell a margin from the noise of a small validation set); without
    ``generations`` a generative task is scored by its loss alone (accuracy None). With ``ranks`` each rank scores
    its share and every rank returns the whole result. ``stop`` (one process): the examples are scored in a random
    order (a user's test file may be sorted by label) and once ``stop()`` is true the scores cover those finished
    (``choice_scores_until``, ``generative_until``), a random part of the split; ``examples_of`` says how many the
    split holds, ``seconds_per_example`` what one took and ``scoring_seconds`` what the scoring took in all (a chunk
    cut short included); for multiple choice ``scored_tokens`` and ``split_tokens`` are the tokens the finished
    chunks ran and those the whole split would, sorted at once (``padded_tokens``)."""
    d, e, max_length = recipe.data, recipe.evaluate, recipe.model.max_length
    resources = resources or Resources()
    examples = resources.examples(d, e.split, tokenizer)[: e.limit]
    mine = ranks.share(examples)
    model = AnswerLM(lm)
    model.reset_activity()
    result = {"task": d.name, "split": e.split, "examples": len(examples), "adapter": recipe.model.adapter}
    if stop is not None:
        if ranks.world > 1 or per_example:
            raise ValueError("an evaluation that may stop early runs in one process, without per-example scores")
        examples = [examples[i] for i in np.random.default_rng(0).permutation(len(examples))]
    if all(x.generative for x in examples):
        result.update(evaluate_generative(e, max_length, model, lm, tokenizer, examples, device, ranks, per_example,
                                          generations, stop))
    else:
        if stop is None:
            scores = ranks.gather(choice_scores(model, tokenizer, mine, e.batch_size, max_length, device,
                                                progress=ranks.rank == 0, ranks=ranks))
        else:
            began = time.perf_counter()
            scores, result["seconds_per_example"], result["scored_tokens"] = choice_scores_until(
                model, tokenizer, examples, e.batch_size, max_length, device, stop)
            result["scoring_seconds"] = time.perf_counter() - began
            result["split_tokens"] = padded_tokens(scoring_plan(tokenizer, examples, max_length), e.batch_size,
                                                   max_length)
        if len(scores) < len(examples):
            result.update(examples=len(scores), examples_of=len(examples))
            examples = examples[:len(scores)]
        result.update(accuracy=accuracy(scores, examples), choice_loss=choice_loss(scores, examples))
        result["loss"] = result["choice_loss"]
        if per_example:
            result["example_losses"] = choice_losses(scores, examples)
            result["example_errors"] = choice_errors(scores, examples)
    # each rank's own tokens; averaged over ranks (their shares differ by at most one example)
    result["active_parameters_per_token"] = ranks.total(model.active_parameters_per_token())[0] / ranks.world
    return result


def evaluate_generative(settings: EvaluateSection, max_length: int, model: AnswerLM, lm, tokenizer,
                        examples: list[Example], device, ranks: Ranks = SINGLE, per_example: bool = False,
                        generations: bool = True, stop: Callable[[], bool] | None = None) -> dict:
    """Loss and perplexity on every example (``per_example``: each example's share of the loss, in order);
    generation scores on those with a prompt (not plain text) unless ``generations`` is off (a search trial whose
    objective is the loss: generating took two thirds of a trial's validation); with ``ranks``, each rank works on
    its share of both. ``stop`` (one process): those of the examples' first part that ``generative_until``
    finished."""
    import math

    result = {}
    if stop is None:
        pairs = ranks.gather(answer_nlls(model.eval(), tokenizer, ranks.share(examples), settings.batch_size,
                                         max_length, device, ranks))
        prompts = [e.prompt for e in examples if e.prompt] if generations else []
        texts = ranks.gather(generate(lm, tokenizer, ranks.share(prompts), max_new_tokens=settings.max_new_tokens,
                                      stop=stop_strings(settings.stop), batch_size=settings.batch_size,
                                      max_length=max_length, device=device, ranks=ranks)) if prompts else []
    else:
        began = time.perf_counter()
        pairs, texts, result["seconds_per_example"] = generative_until(settings, max_length, model, lm, tokenizer,
                                                                       examples, device, generations, stop)
        result["scoring_seconds"] = time.perf_counter() - began
        if len(pairs) < len(examples):
            result.update(examples=len(pairs), examples_of=len(examples))
            examples = examples[:len(pairs)]
    tokens = max(sum(n for _, n in pairs), 1)
    loss = sum(nll for nll, _ in pairs) / tokens
    result.update(loss=loss, perplexity=math.exp(min(loss, 50.0)), accuracy=0.0 if generations else None)
    if per_example:  # their mean is the loss: token-weighted, as the loss is
        result["example_losses"] = [nll * len(pairs) / tokens for nll, _ in pairs]
    if not generations:
        return result
    prompted = [e for e in examples if e.prompt]
    if prompted:
        scores = score_generations(texts, [e.reference for e in prompted])
        result.update(scores, accuracy=scores["exact_match"],
                      samples=[{"prompt": e.prompt[-200:], "generation": t, "reference": e.reference}
                               for e, t in list(zip(prompted, texts))[:5]])
        if all(numeric_answer(e.reference) is not None for e in prompted):  # a numeric task: its answer decides
            result["accuracy"] = scores["numeric_match"]
    return result


def generative_until(settings: EvaluateSection, max_length: int, model: AnswerLM, lm, tokenizer,
                     examples: list[Example], device, generations: bool, stop: Callable[[], bool]
                     ) -> tuple[list[tuple[float, int]], list[str], float]:
    """``evaluate_generative``'s work by ``score_until``, each chunk's generations and answer losses together: those
    of the chunks finished, and the seconds an example took in them. Generating is the slow part: on Natural
    Questions 0.48 s a question on one thread."""
    def score(part: list[Example], until: Callable[[], bool] | None):
        prompts = [e.prompt for e in part if e.prompt] if generations else []
        if not prompts and until is not None and until():  # nothing to generate: asked once for the chunk
            return None
        texts = generate(lm, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                         stop=stop_strings(settings.stop), batch_size=settings.batch_size, max_length=max_length,
                         device=device, until=until) if prompts else []
        if texts is None:
            return None
        return answer_nlls(model.eval(), tokenizer, part, settings.batch_size, max_length, device), texts

    chunks, pace = score_until(examples, settings.batch_size, stop, score)
    return [p for pairs, _ in chunks for p in pairs], [t for _, texts in chunks for t in texts], pace
