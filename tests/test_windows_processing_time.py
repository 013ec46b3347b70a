"""Processing-time windows and triggers on the injected clock: ``runtime.testing.ManualClock``
moves processing time, so no test waits on the wall clock."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from loop_helpers import operator_metric, wait_until

from connectors import CollectSink
from runtime import (
    Collector,
    ExecutionConfig,
    JobFailedError,
    ProcessingTimeSessionWindows,
    ProcessWindowFunction,
    SlidingProcessingTimeWindows,
    TumblingProcessingTimeWindows,
    WindowAssigner,
)
from runtime.api.sources import END_OF_INPUT, EndOfInput, Source, SourceReader, SourceReaderContext
from runtime.master.jobmaster import JobMaster
from runtime.shell.runner import build_graph
from runtime.testing import ManualClock


class PhasedSource(Source[Any]):
    """Emits one phase of elements when the test releases it (``release()``), then waits for the
    next release; ends after the last phase."""

    def __init__(self, phases: list[list[Any]]) -> None:
        self.phases = phases
        self.released = 0
        self._contexts: list[SourceReaderContext] = []

    def name(self) -> str:
        return "Phased"

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"phase": 0}]

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        self._contexts.append(context)
        return _PhasedReader(self)

    def release(self) -> None:
        self.released += 1
        for context in self._contexts:
            context.notify_available()


class _PhasedReader(SourceReader[Any]):
    def __init__(self, source: PhasedSource) -> None:
        self.source = source
        self.splits: list[dict[str, int]] = []

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> list[Any] | EndOfInput | None:
        for split in self.splits:
            phase = split["phase"]
            if phase >= len(self.source.phases):
                return END_OF_INPUT
            if phase < self.source.released:
                split["phase"] += 1
                return list(self.source.phases[phase])
        return None

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]


class Described(ProcessWindowFunction[Any, Any, str]):
    def process(self, key: str, context: Any, elements: Any, out: Collector[Any]) -> None:
        values = [value for _, value in elements]
        out.collect(
            (
                key,
                context.window.start,
                context.window.end,
                values,
                context.current_processing_time(),
            )
        )


async def run_phases(
    assigner: WindowAssigner, phases: list[tuple[int, list[Any]]], parallelism: int = 2
) -> list[Any]:
    """Per phase (processing time, records): move the clock there, release the records and wait
    until the window operator has them; after the last, move the clock far ahead so that every
    window fires, and end the input."""
    clock = ManualClock(start_ms=phases[0][0])
    source = PhasedSource([records for _, records in phases])
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .set_parallelism(1)
            .key_by(lambda r: r[0])
            .window(assigner)
            .process(Described())
            .uid("windows")
            .sink_to(sink)
        )

    master = JobMaster(build_graph(build, parallelism=parallelism), ExecutionConfig(clock=clock))
    job = asyncio.create_task(master.run())
    try:
        seen = 0
        for now, records in phases:
            clock.set(now)
            source.release()
            seen += len(records)
            await wait_until(
                lambda n=seen: operator_metric(master, "windows", "records_in") == n,
                "the records",
                job,
            )
        before_end = len(sink.results)
        clock.advance(1_000_000)
        await wait_until(lambda: len(sink.results) > before_end, "the last windows", job)
        source.release()  # the end of input
        await asyncio.wait_for(job, 30)
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError, JobFailedError):
            await job
    return sorted(sink.results)


@pytest.mark.asyncio
async def test_tumbling_processing_time_windows_fire_when_the_clock_passes_their_end() -> None:
    results = await run_phases(
        TumblingProcessingTimeWindows.of("1s"),
        [
            (10_000, [("a", 1), ("b", 2), ("a", 3)]),
            (10_500, [("a", 4)]),
            # The clock passed 10999, the end of [10000, 11000): it fired before these came.
            (11_000, [("a", 5), ("b", 6)]),
            (12_500, [("b", 7)]),
        ],
    )
    assert results == [
        ("a", 10_000, 11_000, [1, 3, 4], 11_000),
        ("a", 11_000, 12_000, [5], 12_500),
        ("b", 10_000, 11_000, [2], 11_000),
        ("b", 11_000, 12_000, [6], 12_500),
        ("b", 12_000, 13_000, [7], 1_012_500),
    ]


@pytest.mark.asyncio
async def test_sliding_processing_time_windows_hold_each_record_in_every_overlapping_window() -> (
    None
):
    results = await run_phases(
        SlidingProcessingTimeWindows.of(2000, "1s"),
        [(10_000, [("a", 1)]), (11_000, [("a", 2)]), (13_500, [("a", 3)])],
        parallelism=1,
    )
    assert results == [
        ("a", 9_000, 11_000, [1], 11_000),
        ("a", 10_000, 12_000, [1, 2], 13_500),
        ("a", 11_000, 13_000, [2], 13_500),
        ("a", 12_000, 14_000, [3], 1_013_500),
        ("a", 13_000, 15_000, [3], 1_013_500),
    ]


@pytest.mark.asyncio
async def test_processing_time_sessions_merge_until_the_gap_passes() -> None:
    results = await run_phases(
        ProcessingTimeSessionWindows.with_gap("1s"),
        [
            (10_000, [("a", 1), ("b", 2)]),
            (10_800, [("a", 3)]),  # within a's gap: [10000, 11800); b's session ends at 11000
            (12_000, [("a", 4)]),  # a's session ended at 11800: a new one
        ],
    )
    assert results == [
        ("a", 10_000, 11_800, [1, 3], 12_000),
        ("a", 12_000, 13_000, [4], 1_012_000),
        ("b", 10_000, 11_000, [2], 12_000),
    ]
