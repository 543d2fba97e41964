"""Training data read as a stream (``data.streaming``), for corpora that do not fit a rank's memory.

The source (a hub dataset, a hub-style folder, a data file) is opened with ``datasets``' streaming reader and
never held whole: each rank keeps only the rows of its own micro-batches. The splits are positions in the
stream, so they need counts, not fractions: the first ``test_size`` examples are the test split (or
``eval_task`` is), the next ``val_size`` the search's validation split, and the rest its fit split; the train
split is everything after the test split.

Rows are addressed as ``train_batch`` addresses the in-memory ones: optimizer step s reads rows
[s*G, (s+1)*G) of an endless sequence of epochs, rank r micro-step m the block of ``micro_batch`` rows at
``(m * world + r) * micro_batch`` within it. So N ranks of micro-batch b train on what one rank of micro-batch
N*b trains on, and a resumed run reads exactly the rows it would have read: it reads the stream up to its
step again (each row read and made an Example, but not tokenised), which costs time, not memory. Unlike the
in-memory path the order is the source's own, the same every epoch: shuffle a corpus before streaming it.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace

from floe_dist.data import (
    TASKS,
    Example,
    check_format,
    check_task,
    load_data,
    pieces_of,
    reading_of,
    row_reader,
    token_rows,
)
from floe_dist.sources import hub_of, open_source, source_name


class ExampleStream:
    """Examples ``[start, stop)`` of a streamed source (``stop`` None: to its end), converted as they are read.
    ``stream[:n]`` is a list of the first n (what scoring or a limit reads); ``stream[:None]`` is the stream."""

    def __init__(self, open_rows: Callable[[int], Iterator[dict]], convert: Callable[[dict, int], Example],
                 start: int = 0, stop: int | None = None):
        self.open_rows, self.convert, self.start, self.stop = open_rows, convert, start, stop

    def __iter__(self) -> Iterator[Example]:
        rows = self.open_rows(self.start)
        if self.stop is not None:
            rows = itertools.islice(rows, self.stop - self.start)
        return (self.convert(row, n) for n, row in enumerate(rows, self.start + 1))

    def __getitem__(self, part: slice):
        if not isinstance(part, slice) or part.start or part.step:
            raise TypeError("a stream is read from its start: stream[:n]")
        return self if part.stop is None else list(itertools.islice(self, part.stop))


class RowStream:
    """The tokenised training rows of an ExampleStream, read forward, for ``train_batch``: ``rows_at(first, n)``
    returns rows ``first .. first+n-1`` of the endless sequence of epochs, reading on from where the last call
    stopped (or from the start, when asked for an earlier row). Only kept rows are tokenised, save plain text
    (its length decides how many rows it makes)."""

    def __init__(self, examples: ExampleStream, tokenizer, max_length: int):
        self.examples, self.tokenizer, self.max_length = examples, tokenizer, max_length
        self.epoch_rows: int | None = None  # rows per epoch, known once an epoch has been read to its end
        self._rows: Iterator | None = None
        self._at = self._epoch_start = 0  # the next row's position; where the current epoch began

    def _epoch(self) -> Iterator[Callable[[], tuple]]:
        """The rows of one pass, each a function that tokenises it."""
        for example in self.examples:
            pieces = pieces_of(example)
            if example.prompt or example.segments:  # not plain text: exactly one row
                yield lambda pieces=pieces: self._tokenise(pieces)[0]
            else:
                for row in self._tokenise(pieces):
                    yield lambda row=row: row

    def _tokenise(self, pieces: list[tuple[str, bool]]) -> list[tuple]:
        ids = self.tokenizer([t for t, _ in pieces], add_special_tokens=False).input_ids
        return [(input_ids, labels) for input_ids, labels, _ in
                token_rows(ids, [flag for _, flag in pieces], self.max_length)]

    def rows_at(self, first: int, count: int) -> list[tuple]:
        if self._rows is None or first < self._at:
            self._epoch_start = first - first % self.epoch_rows if self.epoch_rows else 0
            self._rows, self._at = self._epoch(), self._epoch_start
        out = []
        while self._at < first + count:
            row = next(self._rows, None)
            if row is None:  # the epoch ended: the next one reads the stream again
                if self._at == self._epoch_start:
                    raise ValueError("the streamed training split has no examples")
                self.epoch_rows = self._at - self._epoch_start
                self._rows, self._epoch_start = self._epoch(), self._at
                continue
            if self._at >= first:
                out.append(row())
            self._at += 1
        return out


def load_split(data, split: str, tokenizer=None) -> ExampleStream | list[Example]:
    """The examples of a recipe's ``data`` section in ``split``: ``data.load_data``'s, or for a streamed section
    test and val as lists (their counts) and train, fit and all as ExampleStreams."""
    if not data.streaming:
        return load_data(data, split, tokenizer)
    if data.eval_task and split == "test":  # a separate file, read whole
        return load_data(replace(data, streaming=False), split, tokenizer)
    if data.sources:
        raise ValueError("data.streaming reads one task: give data.task, not data.sources")
    if data.task in TASKS:
        raise ValueError(f"data.streaming: the built-in task {data.task!r} fits in memory; stream a data file, "
                         f"a folder or a hub dataset")
    check_task(data.task)
    check_format(data.data_format, data.task)
    where = source_name(data.task)
    source = open_source(data.task, hub_of(data), streaming=True)
    first = next(iter(source), None)
    if first is None:
        raise ValueError(f"{where}: no examples")
    convert = row_reader(set(first), where, data.data_format, data.columns, tokenizer, **reading_of(data))

    def open_rows(skip: int) -> Iterator[dict]:
        return iter(source.skip(skip) if skip else source)

    n_test = 0 if data.eval_task else count_of(data.test_size, "test_size")
    if split == "all":
        return ExampleStream(open_rows, convert)
    if split == "test":
        return list(ExampleStream(open_rows, convert, 0, n_test))
    if split == "train":
        return ExampleStream(open_rows, convert, n_test)
    n_val = count_of(data.val_size, "val_size")
    if split == "val":
        return list(ExampleStream(open_rows, convert, n_test, n_test + n_val))
    return ExampleStream(open_rows, convert, n_test + n_val)  # fit


def count_of(size: float | None, name: str) -> int:
    """A split's size as a count: a stream's length is not known before it is read."""
    if size is None or (0 < size < 1):
        other = " or data.eval_task (a separate test file)" if name == "test_size" else ""
        raise ValueError(f"data.streaming: data.{name} must be a count of examples (the stream's length is not "
                         f"known before it is read), got {size}; give a whole number{other}")
    return int(size)
