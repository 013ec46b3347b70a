"""In-memory sources and sinks for tests and the dev loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from runtime.api.sources import (
    END_OF_INPUT,
    EndOfInput,
    Source,
    SourceReader,
    SourceReaderContext,
    contiguous_splits,
)
from runtime.testing import TestingSink


class CollectionSource(Source[Any]):
    """Emits the given elements, split into one contiguous slice per subtask; bounded.

    Each split is ``{"split": i, "start": a, "end": b, "next": position}``; the position is kept in
    operator state, so a restored job resumes after the last element of the checkpoint.
    """

    def __init__(self, elements: Iterable[Any], rate: float = 0.0) -> None:
        self.elements = list(elements)
        self.rate = rate

    def name(self) -> str:
        return "Collection"

    def create_splits(self, parallelism: int) -> list[Any]:
        return list(contiguous_splits(len(self.elements), parallelism))

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        return _CollectionReader(self.elements)


class _CollectionReader(SourceReader[Any]):
    def __init__(self, elements: list[Any]) -> None:
        self.elements = elements
        self.splits: list[dict[str, Any]] = []

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> list[Any] | EndOfInput | None:
        for split in self.splits:
            if split["next"] < split["end"]:
                start = split["next"]
                end = min(split["end"], start + max_records)
                split["next"] = end
                return self.elements[start:end]
        return END_OF_INPUT

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]


CollectSink = TestingSink
"""A list-backed sink for tests: ``results`` (everything written) and ``committed`` (what
completed checkpoints committed). The same class as :class:`runtime.testing.TestingSink`."""


class GeneratorSource(Source[Any]):
    """Records ``generate(i)`` for i = 0, 1, 2, ... — unbounded unless ``count`` is given.

    Subtask *s* of *p* produces the indexes ``s, s + p, s + 2p, ...``; its next index is kept in
    operator state. ``rate`` throttles each subtask (records per second); use it for demos and for
    jobs that must run until stopped.
    """

    def __init__(
        self, generate: Callable[[int], Any], rate: float = 0.0, count: int | None = None
    ) -> None:
        self.generate = generate
        self.rate = rate
        self.count = count
        self.bounded = count is not None

    def name(self) -> str:
        return "Generator"

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"split": i, "stride": parallelism, "next": i} for i in range(parallelism)]

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        return _GeneratorReader(self)


class _GeneratorReader(SourceReader[Any]):
    def __init__(self, source: GeneratorSource) -> None:
        self.source = source
        self.splits: list[dict[str, Any]] = []

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> list[Any] | EndOfInput | None:
        count = self.source.count
        generate = self.source.generate
        for split in self.splits:
            stride = split["stride"]
            start = split["next"]
            stop = start + stride * max_records
            if count is not None:
                stop = min(stop, count)
            if start < stop:
                split["next"] = start + len(range(start, stop, stride)) * stride
                return [generate(i) for i in range(start, stop, stride)]
        return END_OF_INPUT if count is not None else None

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]
