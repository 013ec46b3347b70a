"""A map chained into a filter in one task runs as one loop over the buffer (operator fusion).

The fused pair must behave exactly as the two operators one after the other: the same output and
timestamps, each operator's records in and out, errors naming the operator whose function raised
and the record it raised on, and an awaitable refused with the same error. What fusion adds is
that the records the filter drops are freed at once, not a buffer later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from connectors import CollectionSource, CollectSink
from runtime import (
    Collector,
    ExecutionConfig,
    JobFailedError,
    JobResult,
    ProcessContext,
    ProcessFunction,
    WatermarkStrategy,
    run_job,
)
from runtime.master.jobmaster import JobMaster
from runtime.master.restart import NoRestart
from runtime.shell.runner import build_graph

WAIT_S = 10.0
RECORDS = list(range(3000))  # several source buffers


class Tracked:
    """A mapped record that counts how many of its kind are alive."""

    alive = 0
    most_alive = 0

    def __init__(self, n: int) -> None:
        self.n = n
        Tracked.alive += 1
        Tracked.most_alive = max(Tracked.most_alive, Tracked.alive)

    def __del__(self) -> None:
        Tracked.alive -= 1


def test_the_records_a_filter_drops_after_a_map_are_freed_at_once() -> None:
    Tracked.alive = Tracked.most_alive = 0
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(RECORDS))
            .map(Tracked)
            .filter(lambda t: t.n == -1)  # drops every record
            .sink_to(sink)
        )

    run_job(build, parallelism=1)
    assert sink.results == []
    # Unfused, a whole buffer of mapped records (1,024) waits for the filter.
    assert Tracked.most_alive <= 2


def _is_even(value: int) -> bool:
    return value % 2 == 0


class WithTimestamp(ProcessFunction[Any, Any]):
    def process_element(self, value: Any, ctx: ProcessContext, out: Collector[Any]) -> None:
        out.collect((value, ctx.timestamp))


def _map_then_filter(fused: bool, timestamps: bool) -> tuple[list[Any], JobResult]:
    sink = CollectSink()

    def build(job: Any) -> None:
        stream = job.from_source(CollectionSource(RECORDS)).uid("source")
        if timestamps:
            stream = stream.assign_timestamps_and_watermarks(
                WatermarkStrategy.for_monotonous_timestamps().with_timestamp_assigner(
                    lambda v, _: 1000 + v
                )
            ).uid("timestamps")
        mapped = stream.map(lambda v: v * 3).uid("triple")
        if not fused:
            mapped = mapped.disable_chaining()
        kept = mapped.filter(_is_even).uid("even")
        kept.process(WithTimestamp()).uid("stamped").sink_to(sink).uid("sink")

    result = run_job(build, parallelism=1)
    return sink.results, result


def _records_in_out(result: JobResult) -> dict[str, tuple[int, int]]:
    return {op.uid: (op.records_in, op.records_out) for op in result.operators}


@pytest.mark.parametrize("timestamps", [False, True], ids=["no-timestamps", "event-time"])
def test_a_fused_map_and_filter_give_the_output_timestamps_and_metrics_of_the_unfused(
    timestamps: bool,
) -> None:
    fused_out, fused_result = _map_then_filter(fused=True, timestamps=timestamps)
    unfused_out, unfused_result = _map_then_filter(fused=False, timestamps=timestamps)
    expected = [(v * 3, 1000 + v if timestamps else None) for v in RECORDS if v * 3 % 2 == 0]
    assert fused_out == unfused_out == expected
    metrics = _records_in_out(fused_result)
    assert metrics == _records_in_out(unfused_result)
    assert metrics["triple"] == (len(RECORDS), len(RECORDS))
    assert metrics["even"] == (len(RECORDS), len(expected))


def _fails_on_7(value: int) -> int:
    if value == 7:
        raise ValueError("seven")
    return value


async def _failure(
    map_fn: Callable[[Any], Any], filter_fn: Callable[[Any], Any], fused: bool
) -> str:
    def build(job: Any) -> None:
        mapped = job.from_source(CollectionSource(RECORDS)).map(map_fn, name="parse")
        if not fused:
            mapped = mapped.disable_chaining()
        mapped.filter(filter_fn, name="keep").sink_to(CollectSink())

    graph = build_graph(build, {}, 1)
    with pytest.raises(JobFailedError) as info:
        await asyncio.wait_for(
            JobMaster(graph, ExecutionConfig(restart_strategy=NoRestart())).run(), WAIT_S
        )
    return str(info.value)


async def _coroutine(value: Any) -> Any:
    return value


def _returns_a_coroutine(value: Any) -> Any:
    return _coroutine(value)


def _plus_one(value: int) -> int:
    return value + 1


ERROR_CASES: list[tuple[str, Callable[[Any], Any], Callable[[Any], Any], list[str]]] = [
    ("map raises", _fails_on_7, _is_even,
     ["'parse' (subtask 1/1) failed on record 7 (record 8 of its buffer", "seven"]),
    ("filter raises", _plus_one, _fails_on_7,
     ["'keep' (subtask 1/1) failed on record 7 (record 7 of its buffer", "seven"]),
    ("map returns an awaitable", _returns_a_coroutine, _is_even,
     ["'parse' (subtask 1/1)", "the map function returned a coroutine for record 0"]),
    ("filter returns an awaitable", _plus_one, _returns_a_coroutine,
     ["'keep' (subtask 1/1)", "the filter function returned a coroutine for record 1"]),
]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("map_fn", "filter_fn", "expected"),
    [c[1:] for c in ERROR_CASES],
    ids=[c[0] for c in ERROR_CASES],
)
async def test_a_fused_map_and_filter_fail_as_the_unfused_naming_the_operator_and_record(
    map_fn: Callable[[Any], Any], filter_fn: Callable[[Any], Any], expected: list[str]
) -> None:
    fused = await _failure(map_fn, filter_fn, fused=True)
    unfused = await _failure(map_fn, filter_fn, fused=False)
    for part in expected:
        assert part in fused, fused
        assert part in unfused, unfused
