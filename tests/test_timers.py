"""Event-time timers: fired when the watermark passes them, in order with the records, with the
watermark the minimum over the inputs, and all of them at the end of a bounded job (MAX_WATERMARK).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from loop_helpers import wait_until

from actors.events import MAX_TIMESTAMP
from actors.task import TaskState
from actors.timers import TimerService
from connectors import CollectionSource, CollectSink
from runtime import (
    Collector,
    ExecutionConfig,
    KeyedProcessContext,
    KeyedProcessFunction,
    run_job,
)
from runtime.api.sources import END_OF_INPUT, EndOfInput, Source, SourceReader, SourceReaderContext
from runtime.master.jobmaster import JobMaster, JobResult
from runtime.shell.runner import build_graph
from state.keygroups import key_group_for_key
from state.serde import packb, unpackb

FAR = 10**9

SEEN: list[Any] = []
"""Records seen by process functions (they are deep-copied per subtask, so not an attribute)."""


@pytest.fixture(autouse=True)
def clear_seen() -> Any:
    SEEN.clear()
    yield
    SEEN.clear()


class TrickleSource(Source[Any]):
    """One split; one element per poll. After ``hold_after`` elements it emits nothing until
    :meth:`release`."""

    def __init__(self, elements: list[Any], hold_after: int | None = None) -> None:
        self.elements = list(elements)
        self.hold_after = hold_after
        self.released = False
        self._contexts: list[SourceReaderContext] = []

    def name(self) -> str:
        return "Trickle"

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"split": 0, "next": 0}]

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        self._contexts.append(context)
        return _TrickleReader(self)

    def release(self) -> None:
        self.released = True
        for context in self._contexts:
            context.notify_available()


class _TrickleReader(SourceReader[Any]):
    def __init__(self, source: TrickleSource) -> None:
        self.source = source
        self.splits: list[dict[str, Any]] = []

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> list[Any] | EndOfInput | None:
        source = self.source
        for split in self.splits:
            position = split["next"]
            if position >= len(source.elements):
                continue
            if source.hold_after is not None and position >= source.hold_after:
                if not source.released:
                    return None
            split["next"] = position + 1
            return [source.elements[position]]
        return END_OF_INPUT

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]


class TimerAfter(KeyedProcessFunction[Any, Any, Any]):
    """Passes records through and registers an event-time timer ``delay`` after each one; a
    firing emits ``("timer", key, timestamp, watermark)``."""

    def __init__(self, delay: int) -> None:
        self.delay = delay

    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        SEEN.append(value)
        assert ctx.timestamp is not None and ctx.timestamp == value[1]
        ctx.timer_service().register_event_time_timer(ctx.timestamp + self.delay)
        out.collect(value)

    def on_timer(self, timestamp: int, ctx: KeyedProcessContext[Any], out: Collector[Any]) -> None:
        assert ctx.timestamp == timestamp
        out.collect(("timer", ctx.current_key, timestamp, ctx.current_watermark()))


class OneFarTimerPerKey(KeyedProcessFunction[Any, Any, Any]):
    """Registers one timer far in the future per key (registering it again is a no-op)."""

    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        ctx.timer_service().register_event_time_timer(FAR)
        out.collect(value)

    def on_timer(self, timestamp: int, ctx: KeyedProcessContext[Any], out: Collector[Any]) -> None:
        out.collect(("timer", ctx.current_key, timestamp, ctx.current_watermark()))


async def stop(job: asyncio.Task[Any]) -> None:
    if not job.done():
        job.cancel()
    try:
        await job
    except (asyncio.CancelledError, Exception):
        pass


# ------------------------------------------------------------------------------------------------
# MAX_WATERMARK at the end of a bounded job


@pytest.mark.parametrize("parallelism", [1, 3])
def test_max_watermark_fires_far_future_timers_of_every_key_at_the_end(parallelism: int) -> None:
    records = [(f"key-{i % 37}", 1000 + i) for i in range(500)]
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(records))
            .assign_timestamps_and_watermarks(lambda r: r[1])
            .key_by(lambda r: r[0])
            .process(TimerAfter(FAR), name="timers")
            .sink_to(sink)
        )

    run_job(build, parallelism=parallelism)
    fired = [r for r in sink.results if r[0] == "timer"]
    assert sorted((key, ts) for _, key, ts, _ in fired) == sorted(
        (key, ts + FAR) for key, ts in records
    )
    # Nothing reached them during the run: they all fired on the end-of-input watermark.
    assert {wm for *_, wm in fired} == {MAX_TIMESTAMP}
    assert sorted(r for r in sink.results if r[0] != "timer") == sorted(records)
    if parallelism == 1:
        # The final watermark follows every record.
        first_timer = next(i for i, r in enumerate(sink.results) if r[0] == "timer")
        assert all(r[0] == "timer" for r in sink.results[first_timer:])


def test_one_timer_per_key_fires_once_at_the_end() -> None:
    records = [(f"k{i % 5}", i) for i in range(50)]
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(records))
            .assign_timestamps_and_watermarks(lambda r: r[1])
            .key_by(lambda r: r[0])
            .process(OneFarTimerPerKey())
            .sink_to(sink)
        )

    run_job(build, parallelism=2)
    fired = sorted(r for r in sink.results if r[0] == "timer")
    assert fired == [("timer", f"k{i}", FAR, MAX_TIMESTAMP) for i in range(5)]


# ------------------------------------------------------------------------------------------------
# timers fire during the run, in order with the records


def test_timer_fires_when_the_watermark_passes_it_between_the_right_records() -> None:
    # Watermark after each record = its timestamp - 1 (no out-of-orderness allowed).
    records = [("a", 10), ("b", 12), ("a", 20), ("b", 30)]
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(TrickleSource(records))
            .assign_timestamps_and_watermarks(lambda r: r[1])
            .key_by(lambda r: r[0])
            .process(TimerAfter(5), name="timers")
            .sink_to(sink)
        )

    run_job(build)
    assert sink.results == [
        ("a", 10),
        ("b", 12),
        ("a", 20),  # watermark 19 follows: the timers at 15 and 17 are due
        ("timer", "a", 15, 19),
        ("timer", "b", 17, 19),
        ("b", 30),  # watermark 29: the timer at 25
        ("timer", "a", 25, 29),
        ("timer", "b", 35, MAX_TIMESTAMP),  # only the end of input reaches 35
    ]


def test_out_of_orderness_delays_the_watermark_and_the_timers() -> None:
    records = [("a", 100), ("a", 105), ("a", 111), ("a", 130)]
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(TrickleSource(records))
            .assign_timestamps_and_watermarks(lambda r: r[1], max_out_of_orderness_ms=10)
            .key_by(lambda r: r[0])
            .process(TimerAfter(0), name="timers")
            .sink_to(sink)
        )

    run_job(build)
    # Watermarks: 89, 94, 100, 119. The timer at 100 fires only after the record at 111.
    assert sink.results == [
        ("a", 100),
        ("a", 105),
        ("a", 111),
        ("timer", "a", 100, 100),
        ("a", 130),
        ("timer", "a", 105, 119),
        ("timer", "a", 111, 119),
        ("timer", "a", 130, MAX_TIMESTAMP),
    ]


@pytest.mark.asyncio
async def test_watermark_is_the_minimum_over_inputs() -> None:
    """Input a races ahead (and ends); input b holds at a low watermark: no timer beyond b's
    watermark fires until b advances."""
    early = [("a", 100 + i) for i in range(10)]
    held = TrickleSource([("b", 5), ("b", 200)], hold_after=1)
    sink = CollectSink()

    def build(job: Any) -> None:
        a = (
            job.from_source(TrickleSource(early))
            .uid("a")
            .assign_timestamps_and_watermarks(lambda r: r[1])
        )
        b = job.from_source(held).uid("b").assign_timestamps_and_watermarks(lambda r: r[1])
        (
            a.union(b)
            .key_by(lambda r: r[0])
            .process(TimerAfter(1), name="timers")
            .uid("timers")
            .sink_to(sink)
        )

    master = JobMaster(build_graph(build), ExecutionConfig())
    job: asyncio.Task[JobResult] = asyncio.create_task(master.run())
    try:
        await wait_until(lambda: len(master.tasks) == 3, "deployment", job)
        a_task = next(t for t in master.tasks if t.vertex_id == "a")
        timers_task = next(t for t in master.tasks if t.vertex_id == "timers")
        gate = timers_task.gate
        assert gate is not None
        await wait_until(
            lambda: (
                set(SEEN) == set(early) | {("b", 5)}
                and a_task.state is TaskState.FINISHING
                and not any(c.has_data() for c in gate.channels)
            ),
            "all of a (and its end) and the first record of b to be processed",
            job,
        )
        for _ in range(200):
            await asyncio.sleep(0)
        # a's watermark went to the end of time, b's is 4: nothing may fire yet.
        assert [r for r in sink.results if r[0] == "timer"] == []
        assert timers_task.state is TaskState.RUNNING
        held.release()
        await asyncio.wait_for(job, 10)
    finally:
        await stop(job)
    fired = [r for r in sink.results if r[0] == "timer"]
    # b's record at 200 moved the watermark to 199: every timer up to it fired then, in order.
    assert fired == [
        ("timer", "b", 6, 199),
        *[("timer", "a", ts + 1, 199) for _, ts in early],
        ("timer", "b", 201, MAX_TIMESTAMP),
    ]


# ------------------------------------------------------------------------------------------------
# the timer service itself


class _Clock:
    def __init__(self) -> None:
        self.now = 0

    def now_ms(self) -> int:
        return self.now


def test_timer_service_dedups_deletes_and_pops_in_timestamp_order() -> None:
    key = ["k1"]
    timers = TimerService(lambda: key[0], _Clock(), None)
    timers.register_event_time_timer(30)
    timers.register_event_time_timer(10)
    timers.register_event_time_timer(10)  # same (timestamp, key): one timer
    key[0] = "k2"
    timers.register_event_time_timer(10)
    timers.register_event_time_timer(20)
    timers.delete_event_time_timer(20)
    assert timers.pending_event_timers == 3
    assert timers.due_event_timers(9) == []
    assert timers.due_event_timers(10) == [(10, "k1"), (10, "k2")]
    assert timers.current_watermark == 10
    assert timers.due_event_timers(25) == []  # 20 was deleted
    assert timers.due_event_timers(MAX_TIMESTAMP) == [(30, "k1")]
    assert timers.pending_event_timers == 0
    # A timer deleted and registered again fires once.
    timers.register_event_time_timer(40)
    timers.delete_event_time_timer(40)
    timers.register_event_time_timer(40)
    assert timers.due_event_timers(40) == [(40, "k2")]


def test_timer_service_snapshot_restores_only_owned_key_groups() -> None:
    key: list[Any] = [None]
    timers = TimerService(lambda: key[0], _Clock(), None)
    keys = [f"user-{i}" for i in range(50)]
    for i, k in enumerate(keys):
        key[0] = k
        timers.register_event_time_timer(100 + i)
    snapshot = timers.snapshot(128)
    restored_halves = []
    for owns in (lambda kg: kg < 64, lambda kg: kg >= 64):
        other = TimerService(lambda: None, _Clock(), None)
        other.restore([snapshot], owns)
        restored_halves.append(other.due_event_timers(MAX_TIMESTAMP))
    both = sorted(restored_halves[0] + restored_halves[1])
    assert both == sorted((100 + i, k) for i, k in enumerate(keys))
    assert restored_halves[0] and restored_halves[1]


def test_timers_with_a_namespace_are_distinct_and_survive_a_snapshot_with_old_entries() -> None:
    key = ["k1"]
    timers = TimerService(lambda: key[0], _Clock(), None)
    timers.register_event_time_timer(10)
    timers.register_event_time_timer(10, (0, 11))
    timers.register_event_time_timer(10, (0, 11))  # same (timestamp, key, namespace): one timer
    timers.register_event_time_timer(10, (5, 11))
    timers.delete_event_time_timer(10, (5, 11))
    assert timers.pending_event_timers == 2
    snapshot = timers.snapshot(128)
    # A snapshot taken before namespaces existed holds [kind, timestamp, key] entries only.
    key[0] = "k2"
    old_layout = {"groups": {key_group_for_key("k2", 128): [["e", 7, "k2"]]}}
    restored = TimerService(lambda: None, _Clock(), None)
    restored.restore([unpackb(packb(snapshot)), old_layout], lambda kg: True)
    assert restored.due_event_timer_entries(MAX_TIMESTAMP) == [
        (7, "k2", None),
        (10, "k1", None),
        (10, "k1", (0, 11)),
    ]
    # A timer without namespace keeps the snapshot layout of before.
    assert ["e", 10, "k1"] in snapshot["groups"][key_group_for_key("k1", 128)]
