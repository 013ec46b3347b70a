"""``DataStream.process(ProcessFunction)`` on non-keyed streams (collector, side outputs,
processing time and watermark, no timers), and ``ctx.output(tag, value)`` in every process
function's context: side outputs keep the records' timestamps at parallelism 1 and 2."""

from __future__ import annotations

from typing import Any

import pytest
from test_timers import TrickleSource

from actors.events import MIN_TIMESTAMP
from connectors import CollectionSource, CollectSink
from runtime import (
    Collector,
    ExecutionConfig,
    Job,
    JobDefinitionError,
    JobFailedError,
    KeyedCoProcessFunction,
    KeyedProcessContext,
    KeyedProcessFunction,
    OutputTag,
    ProcessContext,
    ProcessFunction,
    run_job,
)
from runtime.testing import ManualClock

ODD = OutputTag("odd")
BIG = OutputTag("big")
RECORDS = [(f"k{i % 5}", i) for i in range(1, 301)]


class Route(ProcessFunction[Any, Any]):
    """Even values to the main output, odd ones to ``ODD``, values above 250 also to ``BIG``."""

    def process_element(self, value: Any, ctx: ProcessContext, out: Collector[Any]) -> None:
        if value[1] % 2:
            ctx.output(ODD, value)
        else:
            out.collect(value)
        if value[1] > 250:
            ctx.output(BIG, value[1])


class Stamped(ProcessFunction[Any, Any]):
    """Each record with the timestamp it arrived with."""

    def process_element(self, value: Any, ctx: ProcessContext, out: Collector[Any]) -> None:
        out.collect((value, ctx.timestamp))


def timed(job: Job, records: list[Any]) -> Any:
    return job.from_source(CollectionSource(records)).assign_timestamps_and_watermarks(
        lambda r: 1000 + r[1]
    )


@pytest.mark.parametrize("parallelism", [1, 2])
def test_process_function_side_outputs_keep_their_records_and_timestamps(parallelism: int) -> None:
    main, odd, big = CollectSink(), CollectSink(), CollectSink()

    def build(job: Job) -> None:
        routed = timed(job, RECORDS).process(Route())
        routed.process(Stamped()).sink_to(main)
        routed.get_side_output(ODD).process(Stamped()).sink_to(odd)
        routed.get_side_output(BIG).sink_to(big)

    run_job(build, parallelism=parallelism)
    assert sorted(main.results) == sorted([(r, 1000 + r[1]) for r in RECORDS if r[1] % 2 == 0])
    assert sorted(odd.results) == sorted([(r, 1000 + r[1]) for r in RECORDS if r[1] % 2])
    assert sorted(big.results) == list(range(251, 301))


class KeyedRoute(KeyedProcessFunction[Any, Any, Any]):
    """Counts per key; odd values go to ``ODD``; a timer 1 ms after each record sends
    ``("timer", key, timestamp)`` to ``BIG``, with the timer's timestamp."""

    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        if value[1] % 2:
            ctx.output(ODD, value)
        else:
            out.collect(value)
        assert ctx.timestamp is not None
        ctx.timer_service().register_event_time_timer(ctx.timestamp + 1)

    def on_timer(self, timestamp: int, ctx: KeyedProcessContext[Any], out: Collector[Any]) -> None:
        ctx.output(BIG, ("timer", ctx.current_key, timestamp))


@pytest.mark.parametrize("parallelism", [1, 2])
def test_keyed_process_function_side_outputs_from_records_and_timers(parallelism: int) -> None:
    main, odd, timers = CollectSink(), CollectSink(), CollectSink()

    def build(job: Job) -> None:
        routed = timed(job, RECORDS).key_by(lambda r: r[0]).process(KeyedRoute())
        routed.process(Stamped()).sink_to(main)
        routed.get_side_output(ODD).process(Stamped()).sink_to(odd)
        routed.get_side_output(BIG).process(Stamped()).sink_to(timers)

    run_job(build, parallelism=parallelism)
    assert sorted(main.results) == sorted([(r, 1000 + r[1]) for r in RECORDS if r[1] % 2 == 0])
    assert sorted(odd.results) == sorted([(r, 1000 + r[1]) for r in RECORDS if r[1] % 2])
    expected_timers = sorted((("timer", k, 1001 + v), 1001 + v) for k, v in RECORDS)
    assert sorted(timers.results) == expected_timers


class Join(KeyedCoProcessFunction[Any, Any, Any]):
    """Input 1 to the main output, input 2 to ``ODD``."""

    def process_element1(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        out.collect(value)

    def process_element2(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        ctx.output(ODD, value)


@pytest.mark.parametrize("parallelism", [1, 2])
def test_keyed_co_process_function_side_outputs(parallelism: int) -> None:
    main, side = CollectSink(), CollectSink()
    first = [r for r in RECORDS if r[1] % 2 == 0]
    second = [r for r in RECORDS if r[1] % 2]

    def build(job: Job) -> None:
        joined = (
            timed(job, first)
            .connect(timed(job, second))
            .key_by(lambda r: r[0], lambda r: r[0])
            .process(Join())
        )
        joined.sink_to(main)
        joined.get_side_output(ODD).process(Stamped()).sink_to(side)

    run_job(build, parallelism=parallelism)
    assert sorted(main.results) == sorted(first)
    assert sorted(side.results) == sorted([(r, 1000 + r[1]) for r in second])


class Timer(ProcessFunction[Any, Any]):
    def process_element(self, value: Any, ctx: ProcessContext, out: Collector[Any]) -> None:
        ctx.timer_service().register_event_time_timer(10)


def test_registering_a_timer_on_a_non_keyed_stream_is_refused_clearly() -> None:
    def build(job: Job) -> None:
        job.from_source(CollectionSource([1])).process(Timer(), name="timers").sink_to(
            CollectSink()
        )

    with pytest.raises(JobFailedError) as failure:
        run_job(build)
    message = str(failure.value)
    assert "operator 'timers'" in message
    assert "cannot register an event-time timer on a non-keyed stream" in message
    assert "key_by(...).process(KeyedProcessFunction)" in message


class Times(ProcessFunction[Any, Any]):
    def process_element(self, value: Any, ctx: ProcessContext, out: Collector[Any]) -> None:
        time = ctx.timer_service()
        assert time.current_watermark == ctx.current_watermark()
        out.collect((value[1], ctx.current_watermark(), ctx.current_processing_time()))


def test_the_time_service_gives_the_watermark_and_the_jobs_processing_time() -> None:
    records = [("a", 5), ("a", 9), ("a", 20)]
    sink = CollectSink()

    def build(job: Job) -> None:
        # One record per buffer: the watermark after each is its timestamp - 1.
        job.from_source(TrickleSource(records)).assign_timestamps_and_watermarks(
            lambda r: r[1]
        ).process(Times()).sink_to(sink)

    run_job(build, config=ExecutionConfig(clock=ManualClock(123_456)))
    assert sink.results == [(5, MIN_TIMESTAMP, 123_456), (9, 4, 123_456), (20, 8, 123_456)]


def test_process_needs_the_function_kind_of_its_stream() -> None:
    job = Job()
    stream = job.from_source(CollectionSource(RECORDS))
    with pytest.raises(JobDefinitionError, match=r"KeyedProcessFunction .* needs a keyed stream"):
        stream.process(KeyedRoute())
    with pytest.raises(JobDefinitionError, match="on a keyed stream needs a KeyedProcessFunction"):
        stream.key_by(lambda r: r[0]).process(Route())
    with pytest.raises(JobDefinitionError, match="needs a ProcessFunction, got function"):
        stream.process(lambda r: r)  # type: ignore[arg-type]


class BadTag(ProcessFunction[Any, Any]):
    def process_element(self, value: Any, ctx: ProcessContext, out: Collector[Any]) -> None:
        ctx.output("odd", value)  # type: ignore[arg-type]


def test_output_needs_an_output_tag() -> None:
    def build(job: Job) -> None:
        job.from_source(CollectionSource([1])).process(BadTag()).sink_to(CollectSink())

    with pytest.raises(JobFailedError, match=r"output\(\) needs an OutputTag .* got str"):
        run_job(build)
