"""Side outputs: an operator emits records to a tag besides its main output, and the stream read
with ``get_side_output(tag)`` gets them (with their timestamps, and the watermarks), at any
parallelism, through any partitioning; a tag nobody reads is counted, never silently lost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_timers import TimerAfter, TrickleSource

from actors.events import MAX_TIMESTAMP
from connectors import CollectionSource, CollectSink
from runtime import Job, JobDefinitionError, OutputTag, run_job
from runtime.api.operators import UserFunctionOperator
from runtime.api.streams import DataStream
from runtime.master.jobmaster import JobMaster
from runtime.plan.graph import build_job_graph
from runtime.shell.runner import build_graph

ODD = OutputTag("odd")


class SplitOperator(UserFunctionOperator):
    """Records for which the function holds go to the main output, the others to the side
    output named by ``ODD`` (the mechanism under the user-facing ``ctx.output``)."""

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        keep = [bool(self.function(v)) for v in values]
        main = [v for v, k in zip(values, keep, strict=True) if k]
        side = [v for v, k in zip(values, keep, strict=True) if not k]
        if timestamps is None:
            await self.output.emit(main, None)
            await self.emit_side(ODD.name, side, None)
            return
        await self.output.emit(main, [t for t, k in zip(timestamps, keep, strict=True) if k])
        await self.emit_side(
            ODD.name, side, [t for t, k in zip(timestamps, keep, strict=True) if not k]
        )


def split(stream: DataStream, predicate: Any) -> DataStream:
    return stream._operator(SplitOperator, "Split", predicate, None)


def is_even(record: Any) -> bool:
    return record[1] % 2 == 0


RECORDS = [(f"k{i % 7}", i) for i in range(1, 400)]


@pytest.mark.parametrize("parallelism", [1, 2])
def test_main_and_side_output_each_get_their_records(parallelism: int) -> None:
    evens, odds = CollectSink(), CollectSink()

    def build(job: Job) -> None:
        main = split(job.from_source(CollectionSource(RECORDS)), is_even)
        main.sink_to(evens)
        main.get_side_output(ODD).sink_to(odds)

    run_job(build, parallelism=parallelism)
    assert sorted(evens.results) == sorted(r for r in RECORDS if is_even(r))
    assert sorted(odds.results) == sorted(r for r in RECORDS if not is_even(r))


def test_a_side_output_is_partitioned_and_read_by_several_consumers() -> None:
    per_key: CollectSink = CollectSink()
    copies: CollectSink = CollectSink()

    def build(job: Job) -> None:
        main = split(job.from_source(CollectionSource(RECORDS)), is_even)
        main.sink_to(CollectSink())
        late = main.get_side_output(ODD)
        late.key_by(lambda r: r[0]).reduce(lambda a, b: (a[0], a[1] + b[1])).set_parallelism(
            3
        ).sink_to(per_key)
        late.map(lambda r: r[1]).set_parallelism(1).sink_to(copies)

    run_job(build, parallelism=2)
    totals: dict[str, int] = {}
    for key, value in RECORDS:
        if value % 2:
            totals[key] = totals.get(key, 0) + value
    last = {}
    for key, total in per_key.results:
        last[key] = max(last.get(key, 0), total)
    assert last == totals
    assert sorted(copies.results) == [v for _, v in RECORDS if v % 2]


def test_side_output_records_keep_their_timestamps_and_get_the_watermarks() -> None:
    # Watermark after each record = its timestamp - 1: a timer 5 after a side output record fires
    # during the run, so watermarks reach the side output, not only the end of input.
    records = [("a", 11), ("a", 12), ("a", 13), ("a", 20), ("a", 31)]
    sink = CollectSink()

    def build(job: Job) -> None:
        timed = job.from_source(TrickleSource(records)).assign_timestamps_and_watermarks(
            lambda r: r[1]
        )
        main = split(timed, is_even)
        main.sink_to(CollectSink())
        main.get_side_output(ODD).key_by(lambda r: r[0]).process(TimerAfter(5)).sink_to(sink)

    run_job(build)
    timers = [r for r in sink.results if r[0] == "timer"]
    # TimerAfter checks each record's timestamp is its own (r[1]).
    assert [r for r in sink.results if r[0] != "timer"] == [("a", 11), ("a", 13), ("a", 31)]
    assert ("timer", "a", 16, 19) in timers and ("timer", "a", 18, 19) in timers
    assert ("timer", "a", 36, MAX_TIMESTAMP) in timers


@pytest.mark.asyncio
async def test_records_to_a_tag_nobody_reads_are_counted_as_dropped() -> None:
    def build(job: Job) -> None:
        split(job.from_source(CollectionSource(RECORDS)), is_even).sink_to(CollectSink())

    master = JobMaster(build_graph(build, parallelism=2))
    await asyncio.wait_for(master.run(), 30)
    dropped = sum(
        op.metrics.side_output_dropped
        for task in master.tasks
        for op in task.operators
        if isinstance(op, SplitOperator)
    )
    assert dropped == sum(1 for r in RECORDS if not is_even(r))


def test_a_side_output_edge_is_a_channel_never_a_chain() -> None:
    job = Job(parallelism=2)
    main = split(job.from_source(CollectionSource(RECORDS)), is_even)
    main.map(lambda r: r).sink_to(CollectSink())
    main.get_side_output(ODD).map(lambda r: r, name="late map").sink_to(CollectSink())
    graph = build_job_graph(job)
    [side_edge] = [e for e in graph.edges if e.side_output is not None]
    assert side_edge.side_output == "odd"
    assert side_edge.source_operator.name == "Split(is_even)"
    assert side_edge.target_vertex.head.name == "late map"
    # The main output's consumer is chained to the splitter, the side output's is not.
    [splitter_vertex] = [v for v in graph.vertices if v is side_edge.source_vertex]
    names = [op.name for op in splitter_vertex.operators]
    assert names.index("Map") == names.index("Split(is_even)") + 1
    assert "late map" not in names
    assert "side output odd" in graph.describe()


def test_get_side_output_needs_an_operator_and_a_tag() -> None:
    job = Job()
    stream = job.from_source(CollectionSource(RECORDS))
    with pytest.raises(JobDefinitionError, match=r"on a partitioned stream .*key_by"):
        stream.key_by(lambda r: r[0]).get_side_output(ODD)
    with pytest.raises(JobDefinitionError, match="needs an OutputTag, got str"):
        stream.get_side_output("odd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="OutputTag name 'late data' must be"):
        OutputTag("late data")
    assert OutputTag("late") == OutputTag("late")
