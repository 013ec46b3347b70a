"""Two connected streams that are not keyed: ``a.connect(b)`` with a ``CoMapFunction``,
``CoFlatMapFunction`` or ``CoProcessFunction`` (side outputs, timestamps), and the watermark of a
two-input operator: the minimum of both inputs, where an idle (broadcast) input does not stall
event time."""

from __future__ import annotations

from typing import Any

import pytest
from loop_helpers import (
    FedSplitsSource,
    advance_clock,
    running_job,
    subtask_metrics,
    wait_until,
)

from actors.events import MIN_TIMESTAMP
from connectors import CollectionSource, CollectSink
from runtime import (
    CoFlatMapFunction,
    Collector,
    CoMapFunction,
    CoProcessFunction,
    ExecutionConfig,
    Job,
    JobDefinitionError,
    KeyedBroadcastContext,
    KeyedBroadcastProcessFunction,
    KeyedBroadcastReadOnlyContext,
    KeyedCoProcessFunction,
    OutputTag,
    ProcessContext,
    WatermarkStrategy,
    run_job,
)
from runtime.shell.runner import build_graph
from runtime.testing import ManualClock
from state import MapStateDescriptor

NUMBERS = list(range(10))
WORDS = ["one", "two", "three", "four"]


class Describe(CoMapFunction[int, str, str]):
    def map1(self, value: int) -> str:
        return f"number {value}"

    def map2(self, value: str) -> str:
        return f"word {value}"


class Explode(CoFlatMapFunction[int, str, Any]):
    def flat_map1(self, value: int) -> Any:
        return [value] * (value % 3)

    def flat_map2(self, value: str) -> Any:
        return list(value)


def two_inputs(job: Job) -> tuple[Any, Any]:
    return (
        job.from_source(CollectionSource(NUMBERS), name="numbers"),
        job.from_source(CollectionSource(WORDS), name="words"),
    )


@pytest.mark.parametrize("parallelism", [1, 3])
def test_co_map_maps_each_input_with_its_own_method(parallelism: int) -> None:
    sink = CollectSink()

    def build(job: Job) -> None:
        numbers, words = two_inputs(job)
        numbers.connect(words).map(Describe(), name="describe").sink_to(sink)

    run_job(build, parallelism=parallelism)
    expected = [f"number {n}" for n in NUMBERS] + [f"word {w}" for w in WORDS]
    assert sorted(sink.results) == sorted(expected)


@pytest.mark.parametrize("parallelism", [1, 3])
def test_co_flat_map_emits_any_number_of_results_per_record(parallelism: int) -> None:
    sink = CollectSink()

    def build(job: Job) -> None:
        numbers, words = two_inputs(job)
        numbers.connect(words).flat_map(Explode()).sink_to(sink)

    run_job(build, parallelism=parallelism)
    expected = [n for n in NUMBERS for _ in range(n % 3)] + [c for w in WORDS for c in w]
    assert sorted(map(str, sink.results)) == sorted(map(str, expected))


LONG = OutputTag("long-words")


class Tagged(CoProcessFunction[int, str, Any]):
    """Input 1 with its timestamp; input 2's words longer than three letters go to a side output."""

    def process_element1(self, value: int, ctx: ProcessContext, out: Collector[Any]) -> None:
        out.collect(("number", value, ctx.timestamp))

    def process_element2(self, value: str, ctx: ProcessContext, out: Collector[Any]) -> None:
        if len(value) > 3:
            ctx.output(LONG, value)
        else:
            out.collect(("word", value, ctx.timestamp))


def test_co_process_has_timestamps_and_side_outputs() -> None:
    main, side = CollectSink(), CollectSink()

    def build(job: Job) -> None:
        numbers, words = two_inputs(job)
        stamped = numbers.assign_timestamps_and_watermarks(lambda n: 1000 + n)
        processed = stamped.connect(words).process(Tagged())
        processed.sink_to(main)
        processed.get_side_output(LONG).sink_to(side)

    run_job(build, parallelism=2)
    assert sorted(main.results, key=str) == sorted(
        [("number", n, 1000 + n) for n in NUMBERS] + [("word", "one", None), ("word", "two", None)],
        key=str,
    )
    assert sorted(side.results) == ["four", "three"]


class Nothing(KeyedCoProcessFunction[Any, Any, Any]):
    pass


def test_connected_streams_refuse_functions_that_do_not_fit() -> None:
    def build_with(call: Any) -> Any:
        def build(job: Job) -> None:
            numbers, words = two_inputs(job)
            call(numbers.connect(words))

        return build

    with pytest.raises(JobDefinitionError, match="map\\(\\) on connected streams needs a CoMap"):
        build_graph(build_with(lambda c: c.map(lambda v: v)), {}, 1)
    with pytest.raises(JobDefinitionError, match="flat_map\\(\\) on connected streams needs a"):
        build_graph(build_with(lambda c: c.flat_map(Describe())), {}, 1)
    with pytest.raises(JobDefinitionError, match="needs key_by\\(first_key, second_key\\) first"):
        build_graph(build_with(lambda c: c.process(Nothing())), {}, 1)


def stamped_source(source: FedSplitsSource, job: Job, name: str) -> Any:
    strategy = WatermarkStrategy.for_monotonous_timestamps().with_timestamp_assigner(
        lambda record, _ts: record[1]
    )
    return job.from_source(source, name=name, watermark_strategy=strategy)


@pytest.mark.asyncio
async def test_the_watermark_of_connected_streams_is_the_minimum_of_both_inputs() -> None:
    first, second, sink = FedSplitsSource(1), FedSplitsSource(1), CollectSink()

    def build(job: Job) -> None:
        a = stamped_source(first, job, "a")
        b = stamped_source(second, job, "b")
        a.connect(b).map(Describe()).uid("both").sink_to(sink)

    async with running_job(build, 1, ExecutionConfig(clock=ManualClock())) as (master, job):

        def watermark() -> int:
            return int(subtask_metrics(master, "both", "watermark")[0])

        first.feed(0, [(1, 1000)])
        await wait_until(lambda: len(sink.results) == 1, "input 1's record", job)
        assert watermark() == MIN_TIMESTAMP  # input 2 has no watermark yet: it holds it back
        second.feed(0, [("x", 50)])
        await wait_until(lambda: watermark() == 49, "the minimum: input 2's watermark", job)
        second.feed(0, [("y", 5000)])
        await wait_until(lambda: watermark() == 999, "the minimum: input 1's watermark", job)


RULES = MapStateDescriptor[str, str]("rules")
IDLE_MS = 1000


class TimerPerEvent(KeyedBroadcastProcessFunction[str, Any, Any, Any]):
    def process_element(
        self, value: Any, ctx: KeyedBroadcastReadOnlyContext[str], out: Collector[Any]
    ) -> None:
        assert ctx.timestamp is not None
        ctx.timer_service().register_event_time_timer(ctx.timestamp + 10)

    def on_timer(
        self, timestamp: int, ctx: KeyedBroadcastReadOnlyContext[str], out: Collector[Any]
    ) -> None:
        out.collect(("timer", ctx.current_key, timestamp, ctx.get_broadcast_state(RULES).items()))

    def process_broadcast_element(
        self, value: Any, ctx: KeyedBroadcastContext, out: Collector[Any]
    ) -> None:
        ctx.get_broadcast_state(RULES).put(value[0], value[0])


@pytest.mark.asyncio
async def test_an_idle_broadcast_input_does_not_stall_event_time() -> None:
    """The rules (with idleness) get one record at time 0 and then nothing: until they are idle
    their watermark holds the events' timers back; once idle, event time follows the events."""
    events, rules, sink = FedSplitsSource(1), FedSplitsSource(1), CollectSink()
    clock = ManualClock()

    def build(job: Job) -> None:
        idle_rules = WatermarkStrategy.for_monotonous_timestamps().with_idleness(IDLE_MS)
        broadcast = job.from_source(
            rules,
            name="rules",
            watermark_strategy=idle_rules.with_timestamp_assigner(lambda r, _ts: r[1]),
        ).broadcast(RULES)
        (
            stamped_source(events, job, "events")
            .key_by(lambda e: e[0])
            .connect(broadcast)
            .process(TimerPerEvent())
            .uid("timers")
            .sink_to(sink)
        )

    async with running_job(build, 1, ExecutionConfig(clock=clock)) as (master, job):

        def watermark() -> int | None:
            watermarks = subtask_metrics(master, "timers", "watermark")
            return int(watermarks[0]) if watermarks else None

        rules.feed(0, [("gold", 0)])
        events.feed(0, [("a", 100)])
        await wait_until(lambda: watermark() == -1, "the rules' watermark", job)
        await wait_until(lambda: events.all_read(), "the event read", job)
        assert sink.results == []
        # Two periodic watermark emissions (one per source) stay scheduled on the clock.
        await advance_clock(clock, IDLE_MS, scheduled=2, job=job)
        events.feed(0, [("a", 200)])
        await wait_until(lambda: len(sink.results) == 1, "the first timer", job)
        assert sink.results == [("timer", "a", 110, [("gold", "gold")])]


class AsyncMap2(CoMapFunction[int, str, str]):
    def map1(self, value: int) -> str:
        return str(value)

    async def map2(self, value: str) -> str:  # type: ignore[override]
        return value


class AsyncBroadcastSide(KeyedBroadcastProcessFunction[str, Any, Any, Any]):
    async def process_broadcast_element(  # type: ignore[override]
        self, value: Any, ctx: KeyedBroadcastContext, out: Collector[Any]
    ) -> None:
        pass


def test_async_methods_of_co_and_broadcast_functions_are_refused_when_the_job_is_built() -> None:
    def co_map(job: Job) -> None:
        numbers, words = two_inputs(job)
        numbers.connect(words).map(AsyncMap2())

    def broadcast(job: Job) -> None:
        numbers, words = two_inputs(job)
        numbers.key_by(str).connect(words.broadcast(RULES)).process(AsyncBroadcastSide())

    with pytest.raises(
        JobDefinitionError, match=r"map\(\): AsyncMap2\.map2 .* is an async function"
    ):
        build_graph(co_map, {}, 1)
    with pytest.raises(
        JobDefinitionError,
        match=r"process\(\): AsyncBroadcastSide\.process_broadcast_element .* is an async function",
    ):
        build_graph(broadcast, {}, 1)
