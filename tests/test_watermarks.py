"""Event time: watermark strategies and generators, the watermark valve of a task (idle inputs
ignored, IDLE forwarded when all are, never backwards), idle splits and source subtasks without
splits in running jobs, and processing time on the injected clock (``ManualClock``: no test here
waits on the wall clock)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import pytest
from loop_helpers import (
    EventTimeTimers,
    FedSplitsSource,
    control_status,
    fired,
    records,
    running_job,
    wait_until,
)

from actors.events import (
    MAX_TIMESTAMP,
    MIN_TIMESTAMP,
    WATERMARK_ACTIVE,
    WATERMARK_IDLE,
    EndOfData,
    Event,
    Watermark,
    WatermarkStatus,
)
from actors.mailbox import Wakeup
from actors.network import InputGate, ResultSubpartition
from actors.operator import ChainedOutput, DiscardingOutput, OperatorContext, StreamOperator
from actors.protocol import AddSplits, TaskReport
from actors.task import StreamTask
from connectors import CollectionSource, CollectSink
from runtime import (
    Collector,
    ExecutionConfig,
    JobFailedError,
    KeyedProcessContext,
    KeyedProcessFunction,
    WatermarkStrategy,
    run_job,
)
from runtime.api.sources import SourceOperator
from runtime.testing import ManualClock
from state.keygroups import KeyGroupRange

STRATEGY = (
    WatermarkStrategy.for_bounded_out_of_orderness(500)
    .with_timestamp_assigner(lambda value, _record_ts: value[1])
    .with_idleness("1s")
)
"""Event time from the record's second field, 500 ms out of order at most, idle after 1 s."""

# ------------------------------------------------------------------------------------------------
# strategies and generators


class RecordingOutput:
    """A WatermarkOutput that records every call, in order."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def emit_watermark(self, timestamp: int) -> None:
        self.calls.append(timestamp)

    def mark_idle(self) -> None:
        self.calls.append("idle")

    def mark_active(self) -> None:
        self.calls.append("active")

    def take(self) -> list[Any]:
        calls, self.calls = self.calls, []
        return calls


def test_bounded_out_of_orderness_trails_the_highest_timestamp_by_the_bound() -> None:
    generator = WatermarkStrategy.for_bounded_out_of_orderness("2s").create_watermark_generator(
        ManualClock()
    )
    out = RecordingOutput()
    generator.on_periodic_emit(out)
    assert out.take() == [MIN_TIMESTAMP]  # nothing seen: the lowest watermark
    generator.on_events(["a", "b", "c"], [5000, 3000, 7000], out)
    generator.on_periodic_emit(out)
    assert out.take() == [7000 - 2000 - 1]
    generator.on_event("d", 6000, out)  # out of order, within the bound: no change
    generator.on_periodic_emit(out)
    assert out.take() == [4999]


def test_monotonous_timestamps_watermark_is_the_highest_timestamp_minus_one() -> None:
    generator = WatermarkStrategy.for_monotonous_timestamps().create_watermark_generator(
        ManualClock()
    )
    out = RecordingOutput()
    generator.on_events([1, 2], [10, 20], out)
    generator.on_periodic_emit(out)
    assert out.take() == [19]


def test_durations_are_milliseconds_or_duration_strings_and_nonsense_is_refused() -> None:
    strategy = WatermarkStrategy.for_monotonous_timestamps()
    assert strategy.with_idleness(1500).idle_timeout_ms == 1500
    assert strategy.with_idleness("1.5s").idle_timeout_ms == 1500
    assert strategy.with_idleness("250ms").idle_timeout_ms == 250
    generator = WatermarkStrategy.for_bounded_out_of_orderness("1min").create_watermark_generator(
        ManualClock()
    )
    out = RecordingOutput()
    generator.on_event(None, 60_001, out)
    generator.on_periodic_emit(out)
    assert out.take() == [0]
    with pytest.raises(ValueError, match="idle timeout must be positive"):
        strategy.with_idleness(0)
    with pytest.raises(ValueError, match="invalid duration 'soon'"):
        strategy.with_idleness("soon")
    with pytest.raises(ValueError, match="max out-of-orderness: must not be negative"):
        WatermarkStrategy.for_bounded_out_of_orderness(-1)


def test_idleness_follows_processing_time_of_the_clock() -> None:
    """Idle after the timeout without records; while idle the watermark follows processing time
    from the last record; the next record makes the stream active again."""
    clock = ManualClock(start_ms=50_000)
    strategy = WatermarkStrategy.for_bounded_out_of_orderness(100).with_idleness("1s")
    generator = strategy.create_watermark_generator(clock)
    out = RecordingOutput()
    generator.on_events(["x"], [1000], out)
    generator.on_periodic_emit(out)
    assert out.take() == [899]
    clock.advance(999)
    generator.on_periodic_emit(out)
    assert out.take() == [899]
    clock.advance(1)
    generator.on_periodic_emit(out)
    # Idle: 1000 ms of processing time passed since the record at 1000.
    assert out.take() == ["idle", 1000 + 1000 - 100 - 1]
    clock.advance(500)
    generator.on_periodic_emit(out)
    assert out.take() == [2399]
    generator.on_events(["y"], [1200], out)
    generator.on_periodic_emit(out)
    assert out.take() == ["active", 1099]


def test_an_idle_stream_that_never_had_a_record_gets_no_watermark() -> None:
    clock = ManualClock()
    generator = (
        WatermarkStrategy.for_monotonous_timestamps()
        .with_idleness(100)
        .create_watermark_generator(clock)
    )
    out = RecordingOutput()
    clock.advance(100)
    generator.on_periodic_emit(out)
    assert out.take() == ["idle"]


def test_the_timestamp_assigner_gets_the_value_and_the_record_timestamp() -> None:
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource([("a", 5), ("b", 7)]))
            .assign_timestamps_and_watermarks(lambda r: r[1])  # the older form
            .assign_timestamps_and_watermarks(
                WatermarkStrategy.for_monotonous_timestamps().with_timestamp_assigner(
                    lambda value, record_ts: record_ts * 100 + len(value[0])
                )
            )
            .key_by(lambda r: r[0])
            .process(Timestamps())
            .sink_to(sink)
        )

    run_job(build)
    assert sorted(sink.results) == [("a", 501), ("b", 701)]


class Timestamps(KeyedProcessFunction[Any, Any, Any]):
    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        out.collect((value[0], ctx.timestamp))


def test_a_strategy_without_assigner_on_records_without_timestamps_fails_naming_the_fix() -> None:
    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource([1, 2]))
            .assign_timestamps_and_watermarks(WatermarkStrategy.for_monotonous_timestamps())
            .name("event time")
            .print()
        )

    with pytest.raises(JobFailedError) as failed:
        run_job(build)
    message = str(failed.value.cause)
    assert "'event time' (subtask 1/1)" in message
    assert "records carry no timestamp" in message
    assert "with_timestamp_assigner" in message


# ------------------------------------------------------------------------------------------------
# the watermark valve of a task, as scripted sequences of events per input channel


@dataclass(frozen=True)
class Step:
    channel: int
    event: Event
    forwarded: tuple[Any, ...] = ()
    """What the task handed its head operator after this event (watermarks and statuses)."""


def idle(channel: int, *forwarded: Any) -> Step:
    return Step(channel, WATERMARK_IDLE, forwarded)


def active(channel: int, *forwarded: Any) -> Step:
    return Step(channel, WATERMARK_ACTIVE, forwarded)


def wm(channel: int, timestamp: int, *forwarded: Any) -> Step:
    return Step(channel, Watermark(timestamp), forwarded)


def end(channel: int, *forwarded: Any) -> Step:
    return Step(channel, EndOfData(drain=True), forwarded)


W = Watermark
IDLE = WATERMARK_IDLE
ACTIVE = WATERMARK_ACTIVE


class RecordingHead(StreamOperator):
    """Records the watermarks and statuses it is handed (and the records, if ``records``)."""

    def __init__(self, records: bool = False) -> None:
        super().__init__("recorder", "recorder")
        self.forwarded: list[Any] = []
        self.records = records

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        if self.records:
            self.forwarded.append(list(zip(values, timestamps or [], strict=True)))

    async def process_watermark(self, watermark: Watermark) -> None:
        self.forwarded.append(watermark)

    async def process_watermark_status(self, status: WatermarkStatus) -> None:
        self.forwarded.append(status)


class _Reports:
    def report(self, message: TaskReport) -> None:
        return None


async def run_valve_script(channels: int, steps: list[Step]) -> None:
    """Feed each step's event into its channel of a running task and check what the task
    forwarded to its head because of it."""
    wakeup = Wakeup()
    gate = InputGate("valve (1/1)", wakeup, floating_buffers=0)
    senders = [ResultSubpartition(f"sender ({i + 1}/{channels})") for i in range(channels)]
    for sender in senders:
        gate.add_channel(sender, exclusive_credits=1)
    head = RecordingHead()
    clock = ManualClock()
    head.setup(operator_context("recorder", clock), DiscardingOutput(head))
    task = StreamTask(
        "valve (1/1)", "valve", 0, 1, [head], gate, [], _Reports(), wakeup, clock=clock
    )
    runner = asyncio.create_task(task.run())
    try:
        for index, step in enumerate(steps):
            before = len(head.forwarded)
            senders[step.channel].add_event(step.event)
            await wait_until(
                lambda: not any(c.has_data() for c in gate.channels), f"step {index}", runner
            )
            assert tuple(head.forwarded[before:]) == step.forwarded, f"step {index}: {step}"
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


def operator_context(name: str, clock: ManualClock, scheduler: Any = None) -> OperatorContext:
    return OperatorContext(
        name, name, "task", 0, 1, 128, 0, {}, clock, KeyGroupRange(0, 127), scheduler=scheduler
    )


@pytest.mark.asyncio
async def test_an_idle_input_is_left_out_of_the_combined_watermark() -> None:
    await run_valve_script(
        2,
        [
            wm(0, 10),  # 0: input 1 has none yet
            wm(1, 5, W(5)),  # 1
            idle(1, W(10)),  # 2: input 1 no longer holds input 0 back
            wm(0, 20, W(20)),  # 3
            wm(1, 15),  # 4: a watermark of the idle input does not count while 0 is active
            wm(0, 30, W(30)),  # 5
        ],
    )


@pytest.mark.asyncio
async def test_all_inputs_idle_forwards_the_highest_watermark_then_idle() -> None:
    await run_valve_script(
        3,
        [
            wm(0, 10),  # 0
            wm(1, 30),  # 1
            wm(2, 20, W(10)),  # 2
            idle(1),  # 3: 0 and 2 still active: min 10
            idle(0, W(20)),  # 4
            idle(2, W(30), IDLE),  # 5: all idle: flush to the highest, then IDLE
            wm(2, 40, W(40)),  # 6: idle inputs' watermarks still flow when all are idle
            active(0, ACTIVE),  # 7: input 0 (at 10) is behind 40: no watermark
            wm(0, 35),  # 8: never backwards
            wm(0, 41, W(41)),  # 9: caught up
            idle(0, IDLE),  # 10
        ],
    )


@pytest.mark.asyncio
async def test_an_input_resuming_behind_the_watermark_does_not_pull_it_back() -> None:
    await run_valve_script(
        2,
        [
            wm(0, 100),  # 0
            wm(1, 50, W(50)),  # 1
            idle(1, W(100)),  # 2
            wm(0, 200, W(200)),  # 3
            active(1),  # 4: the task stayed active; input 1 is at 50
            wm(1, 150),  # 5: the minimum (150) is behind 200: nothing
            wm(1, 250),  # 6: 200 again: nothing new
            wm(0, 300, W(250)),  # 7
        ],
    )


@pytest.mark.asyncio
async def test_the_end_of_an_idle_input_does_not_end_event_time_for_the_others() -> None:
    await run_valve_script(
        2,
        [
            idle(0),  # 0
            idle(1, IDLE),  # 1
            wm(0, MAX_TIMESTAMP),  # 2: input 0 ends while idle; input 1 may still resume
            end(0),  # 3
            active(1, ACTIVE),  # 4
            wm(1, 7, W(7)),  # 5
        ],
    )


@pytest.mark.asyncio
async def test_the_end_of_the_only_active_input_makes_the_task_idle() -> None:
    await run_valve_script(
        2,
        [
            idle(1),  # 0
            wm(0, 10, W(10)),  # 1
            end(0, IDLE),  # 2: the only live input left is idle
            active(1, ACTIVE),  # 3
        ],
    )


@pytest.mark.asyncio
async def test_a_source_subtask_announces_idle_without_splits_and_active_before_records() -> None:
    """A source task's output, in order: IDLE at once (no split), ACTIVE before the first records
    of a split, their watermark after them, and IDLE after the watermark that follows processing
    time once the split went silent."""
    clock = ManualClock()
    source = FedSplitsSource(1)
    recorder = RecordingHead(records=True)
    head = SourceOperator("source", "source", source, [], STRATEGY)
    wakeup = Wakeup()
    task = StreamTask(
        "source (1/1)", "source", 0, 1, [head, recorder], None, [], _Reports(), wakeup, clock=clock
    )
    head.setup(operator_context("source", clock, task), ChainedOutput(head, recorder))
    recorder.setup(operator_context("recorder", clock, task), DiscardingOutput(recorder))
    runner = asyncio.create_task(task.run())
    try:
        await wait_until(lambda: recorder.forwarded == [IDLE], "the idle announcement", runner)
        assert task.handle_command(AddSplits(tuple(source.create_splits(1))))
        source.feed(0, [("a", 1000), ("a", 900)])
        await wait_until(lambda: len(recorder.forwarded) == 4, "the records", runner)
        assert recorder.forwarded[1:] == [ACTIVE, [(("a", 1000), 1000), (("a", 900), 900)], W(499)]
        clock.advance(1000)  # silent for the idle timeout: the periodic emission notices it
        await wait_until(lambda: len(recorder.forwarded) == 6, "idleness", runner)
        assert recorder.forwarded[4:] == [W(1000 + 1000 - 500 - 1), IDLE]
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


# ------------------------------------------------------------------------------------------------
# jobs: idle splits, source subtasks without splits, all traffic stopped


async def settle(job: asyncio.Task[Any]) -> None:
    """Let every task handle what is in flight (nothing may happen without the clock)."""
    for _ in range(300):
        await asyncio.sleep(0)
    if job.done():
        job.result()


@pytest.mark.asyncio
async def test_a_timer_fires_at_parallelism_2_when_a_source_subtask_has_no_split() -> None:
    """One split, two source subtasks: the second reads nothing. It announces itself idle, so
    event time downstream follows the first (it stalled at the minimum before)."""
    source = FedSplitsSource(1)
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .assign_timestamps_and_watermarks(lambda r: r[1])
            .key_by(lambda r: r[0])
            .process(EventTimeTimers(delay=5))
            .sink_to(sink)
        )

    async with running_job(build, 2, ExecutionConfig(clock=ManualClock())) as (_, job):
        source.feed(0, [("a", 100), ("a", 200)])
        await wait_until(lambda: fired(sink) == [("timer", "a", 105, 199)], "the timer", job)


@pytest.mark.asyncio
@pytest.mark.parametrize("parallelism", [1, 2])
async def test_idle_split_no_longer_holds_event_time_and_all_traffic_stopping_still_fires(
    parallelism: int,
) -> None:
    """Two splits, data on split 0 only. Until split 1 is idle (1 s of processing time without
    records) nothing fires; then event time follows split 0. When split 0 stops too, its watermark
    follows processing time, so the bounded-lateness timer fires; when split 1 resumes behind
    that watermark, event time does not go back."""
    clock = ManualClock()
    source = FedSplitsSource(2)
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(source, watermark_strategy=STRATEGY)
            .key_by(lambda r: r[0])
            .process(EventTimeTimers(delay=10))
            .sink_to(sink)
        )

    async with running_job(build, parallelism, ExecutionConfig(clock=clock)) as (_, job):
        source.feed(0, [("a", 1000)])
        await wait_until(lambda: len(records(sink)) == 1, "the first record", job)
        clock.advance(600)
        source.feed(0, [("a", 2000)])
        await wait_until(lambda: len(records(sink)) == 2, "the second record", job)
        await settle(job)
        assert fired(sink) == []  # split 1 holds event time at its start
        clock.advance(400)  # split 1 silent for 1 s: idle; split 0 only 400 ms
        await wait_until(lambda: fired(sink) != [], "the first timer", job)
        await settle(job)
        assert fired(sink) == [("timer", "a", 1010, 2000 - 500 - 1)]
        clock.advance(1000)  # split 0 silent for 1.4 s: idle too, its watermark follows time
        following = 2000 + 1400 - 500 - 1
        await wait_until(lambda: len(fired(sink)) == 2, "the second timer", job)
        assert fired(sink)[1] == ("timer", "a", 2010, following)
        source.feed(1, [("b", 1500)])  # split 1 resumes behind the watermark
        await wait_until(lambda: len(records(sink)) == 3, "the resumed split's record", job)
        source.feed(1, [("b", 4600)])
        await wait_until(lambda: len(fired(sink)) == 3, "the resumed split's timer", job)
        await settle(job)
    assert records(sink)[2] == ("record", "b", 1500, following)  # late, not pulled back
    assert fired(sink)[2] == ("timer", "b", 1510, 4600 - 500 - 1)
    for key in ("a", "b"):  # in order per key (subtasks write to the sink side by side)
        seen = [r[3] for r in sink.results if r[1] == key]
        assert seen == sorted(seen), f"event time went backwards at key {key}: {seen}"


# ------------------------------------------------------------------------------------------------
# processing time on the injected clock


class ProcessingTimeTimer(KeyedProcessFunction[Any, Any, Any]):
    """A processing-time timer 1 s after each record, by the context's clock."""

    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        now = ctx.timer_service().current_processing_time()
        ctx.timer_service().register_processing_time_timer(now + 1000)
        out.collect(("record", value, now))

    def on_timer(self, timestamp: int, ctx: KeyedProcessContext[Any], out: Collector[Any]) -> None:
        out.collect(("timer", ctx.current_key, timestamp))


@pytest.mark.asyncio
async def test_processing_time_timers_fire_when_the_injected_clock_reaches_them() -> None:
    clock = ManualClock(start_ms=1_000_000)
    source = FedSplitsSource(1)
    sink = CollectSink()

    def build(job: Any) -> None:
        job.from_source(source).key_by(lambda v: v).process(ProcessingTimeTimer()).sink_to(sink)

    async with running_job(build, 1, ExecutionConfig(clock=clock)) as (_, job):
        source.feed(0, ["k"])
        await wait_until(lambda: sink.results == [("record", "k", 1_000_000)], "the record", job)
        clock.advance(999)
        await settle(job)
        assert sink.results == [("record", "k", 1_000_000)]  # the wall clock plays no part
        clock.advance(1)
        await wait_until(lambda: len(sink.results) == 2, "the timer", job)
    assert sink.results[1] == ("timer", "k", 1_001_000)


def test_manual_clock_runs_due_callbacks_in_order_and_never_goes_back() -> None:
    clock = ManualClock(start_ms=10)
    ran: list[int] = []
    clock.call_at(30, lambda: ran.append(30))
    clock.call_at(20, lambda: ran.append(20))
    cancelled = clock.call_at(25, lambda: ran.append(25))
    cancelled.cancel()
    clock.advance(5)
    assert ran == []
    clock.set(30)
    assert ran == [20, 30]
    assert clock.pending == 0
    with pytest.raises(ValueError, match="does not go backwards"):
        clock.set(29)


# ------------------------------------------------------------------------------------------------
# GET /status


@pytest.mark.asyncio
async def test_status_shows_each_operators_and_subtasks_watermark_and_idleness() -> None:
    source = FedSplitsSource(1)
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(source, watermark_strategy=STRATEGY)
            .uid("source")
            .key_by(lambda r: r[0])
            .process(EventTimeTimers(delay=10))
            .uid("timers")
            .sink_to(sink)
        )

    async with running_job(build, 2, ExecutionConfig(clock=ManualClock())) as (master, job):
        source.feed(0, [("a", 1000)])
        await wait_until(lambda: len(records(sink)) == 1, "the record", job)
        await settle(job)
        status = await control_status(master)
    operators = {o["uid"]: o for o in status["operators"]}
    # The source subtask without a split is idle; the other's watermark is the operator's.
    assert operators["source"]["watermark"] == 499
    assert operators["source"]["idle"] is False
    assert [
        {key: s[key] for key in ("subtask", "watermark", "idle")}
        for s in operators["source"]["subtasks"]
    ] == [
        {"subtask": 0, "watermark": 499, "idle": False},
        {"subtask": 1, "watermark": None, "idle": True},
    ]
    assert operators["timers"]["watermark"] == 499
    assert [s["watermark"] for s in operators["timers"]["subtasks"]] == [499, 499]
