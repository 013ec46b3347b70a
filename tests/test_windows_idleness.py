"""Event-time windows over Kafka with an idle partition, written as a user writes the job:
``KafkaSource(watermark_strategy=...with_idleness(...))``, ``key_by(...).window(...)
.aggregate(...)`` and a late-data side output. Each fired window equals a plain Python
computation; an idle partition does not stall the windows, a partition resuming behind the
watermark does not move event time back (its records that are behind it are late), and when all
traffic stops processing-time idleness still fires the last window, once the idle timeout passed.

Processing time is a ``ManualClock``; the broker answers in real time, so waiting for it polls a
condition (``kafka_fixtures.wait_until``), never a fixed sleep.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import kafka_fixtures
import orjson
import pytest
from kafka_fixtures import create_topics, produce, readers_started, unique_name, wait_until
from loop_helpers import advance_clock, operator_metric, running_job, subtask_metrics

from connectors import CollectSink
from connectors.kafka import KafkaSource
from runtime import (
    AggregateFunction,
    Collector,
    EventTimeTrigger,
    ExecutionConfig,
    OutputTag,
    ProcessWindowFunction,
    TumblingEventTimeWindows,
    WatermarkStrategy,
    WindowContext,
)
from runtime.config import DEFAULT_AUTO_WATERMARK_INTERVAL_S
from runtime.master.jobmaster import JobMaster
from runtime.testing import ManualClock

kafka_bootstrap = kafka_fixtures.kafka_bootstrap

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

BOUND_MS = 200
IDLE_MS = 1000
WINDOW_MS = 1000
INTERVAL_MS = int(DEFAULT_AUTO_WATERMARK_INTERVAL_S * 1000)
"""Periodic watermarks (and idleness checks) run every this much of the clock's time."""

STRATEGY = WatermarkStrategy.for_bounded_out_of_orderness(BOUND_MS).with_idleness(IDLE_MS)
"""Event time from the Kafka record timestamps, per partition."""

LATE = OutputTag("late")

Purchase = tuple[int, int, str, int]
"""(id, partition, user, event time ms)."""

WindowResult = tuple[str, int, int, tuple[int, ...]]
"""(user, window start, window end, the ids of its purchases in order)."""

Firing = tuple[str, int, int, tuple[int, ...], int]
"""A window's result and the watermark that fired it."""

# Partition 0 only, while the clock is at 0, then at 600: partition 1 is silent for the idle
# timeout at 1000, partition 0 only for 400 ms (its watermark is 2600 - 200 - 1 then).
EARLY: list[Purchase] = [
    (1, 0, "a", 100),
    (2, 0, "b", 250),
    (3, 0, "a", 900),
    (4, 0, "a", 1200),
    (5, 0, "b", 1450),
    (6, 0, "a", 1800),
    (7, 0, "b", 1700),
]
LATER: list[Purchase] = [(8, 0, "a", 2100), (9, 0, "b", 2600), (10, 0, "a", 2400)]
LAST_PURCHASE_AT_MS = 600
"""The clock's time of ``LATER``."""


class ThroughTimers(EventTimeTrigger):
    """The default trigger's behaviour on the window operator's trigger-driven path (a timer per
    key and window) instead of its panes per window (the path of the default trigger itself)."""


CASES = pytest.mark.parametrize(
    ("parallelism", "trigger"),
    [(p, t) for p in (1, 2) for t in (None, ThroughTimers)],
    ids=[f"p{p}-{path}" for p in (1, 2) for path in ("panes", "timers")],
)


class PurchaseIds(AggregateFunction[dict[str, Any], list[int], tuple[int, ...]]):
    """The ids of a window's purchases, in order."""

    def create_accumulator(self) -> list[int]:
        return []

    def add(self, value: dict[str, Any], accumulator: list[int]) -> list[int]:
        accumulator.append(value["id"])
        return accumulator

    def get_result(self, accumulator: list[int]) -> tuple[int, ...]:
        return tuple(sorted(accumulator))

    def merge(self, a: list[int], b: list[int]) -> list[int]:
        return a + b


class Fired(ProcessWindowFunction[tuple[int, ...], Firing, str]):
    """The window's result with the window and the watermark that fired it."""

    def process(
        self,
        key: str,
        context: WindowContext[str],
        elements: Any,
        out: Collector[Firing],
    ) -> None:
        (ids,) = list(elements)
        window = context.window
        out.collect((key, window.start, window.end, ids, context.current_watermark()))


def window_results(purchases: list[Purchase], watermark: int) -> list[WindowResult]:
    """The plain computation: every tumbling window of ``purchases`` that a watermark of
    ``watermark`` fired (its last millisecond is not after it), with the ids in it."""
    windows: dict[tuple[str, int], list[int]] = {}
    for id_, _, user, ts in purchases:
        windows.setdefault((user, ts - ts % WINDOW_MS), []).append(id_)
    return sorted(
        (user, start, start + WINDOW_MS, tuple(sorted(ids)))
        for (user, start), ids in windows.items()
        if start + WINDOW_MS - 1 <= watermark
    )


def watermark_of(purchases: list[Purchase]) -> int:
    """The bounded-out-of-orderness watermark after ``purchases``."""
    return max(p[3] for p in purchases) - BOUND_MS - 1


def fired_at(results: list[WindowResult], *watermarks: int) -> list[Firing]:
    """``results`` with the watermark that fired each: the first of ``watermarks`` past its last
    millisecond."""
    return sorted((*r, next(w for w in watermarks if r[2] - 1 <= w)) for r in results)


class PurchaseTopic:
    """A topic of two partitions and a job reading it: windows of each user's purchases, late
    purchases to a side output; processing time on :attr:`clock`."""

    def __init__(
        self, bootstrap: str, trigger: type[EventTimeTrigger] | None, lateness_ms: int = 0
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = unique_name("windows-idle")
        self.trigger = trigger
        self.lateness_ms = lateness_ms
        self.clock = ManualClock()
        self.sent: list[Purchase] = []
        self.windows = CollectSink()
        self.late = CollectSink()

    def build(self, job: Any) -> None:
        source = KafkaSource(self.bootstrap, self.topic, watermark_strategy=STRATEGY)
        windowed = (
            job.from_source(source)
            .uid("purchases")
            .key_by(lambda purchase: purchase["user"])
            .window(TumblingEventTimeWindows.of(WINDOW_MS))
        )
        if self.trigger is not None:
            windowed = windowed.trigger(self.trigger())
        windows = (
            windowed.allowed_lateness(self.lateness_ms)
            .side_output_late_data(LATE)
            .aggregate(PurchaseIds(), Fired())
            .uid("windows")
        )
        windows.sink_to(self.windows)
        windows.get_side_output(LATE).sink_to(self.late)

    @contextlib.asynccontextmanager
    async def idle_partition(self, parallelism: int) -> AsyncIterator[tuple[JobMaster, Any, int]]:
        """Runs the job: purchases on partition 0 only, until partition 1 is idle and the windows
        that partition 0's watermark closes fired. Yields the job and that watermark."""
        await create_topics(self.bootstrap, self.topic, partitions=2)
        config = ExecutionConfig(clock=self.clock)
        async with running_job(self.build, parallelism, config) as (master, job):
            await wait_until(lambda: readers_started(master), "the readers", job)
            await self.send(master, job, EARLY)
            await self.advance(LAST_PURCHASE_AT_MS, parallelism, job)
            await self.send(master, job, LATER)
            assert self.firings() == []  # partition 1 holds event time until it is idle
            await self.advance(IDLE_MS - LAST_PURCHASE_AT_MS, parallelism, job)
            watermark = watermark_of(EARLY + LATER)
            expected = window_results(EARLY + LATER, watermark)
            await wait_until(lambda: len(self.firings()) == len(expected), "first windows", job)
            assert self.firings() == fired_at(expected, watermark)
            yield master, job, watermark

    async def advance(self, ms: int, sources: int, job: Any) -> None:
        """Processing time ``ms`` on; the ``sources`` source subtasks emitted what it caused."""
        await advance_clock(self.clock, ms, sources, job)

    async def send(self, master: JobMaster, job: Any, purchases: list[Purchase]) -> None:
        """Produce ``purchases`` (event time as the Kafka timestamp) and wait until the window
        operator has them."""
        await produce(
            self.bootstrap,
            self.topic,
            [
                {
                    "value": orjson.dumps({"id": id_, "user": user}),
                    "partition": partition,
                    "timestamp_ms": ts,
                }
                for id_, partition, user, ts in purchases
            ],
        )
        self.sent += purchases
        await wait_until(
            lambda: operator_metric(master, "windows", "records_in") == len(self.sent),
            f"the window operator to receive purchases {[p[0] for p in purchases]}",
            job,
        )

    def firings(self) -> list[Firing]:
        return sorted(self.windows.results)

    def late_ids(self) -> list[int]:
        return sorted(purchase["id"] for purchase in self.late.results)


@CASES
async def test_windows_fire_with_an_idle_partition_and_its_resumed_records_behind_are_late(
    kafka_bootstrap: str, parallelism: int, trigger: type[EventTimeTrigger] | None
) -> None:
    """Partition 1 idle: the windows fire on partition 0's watermark alone (at parallelism 2 the
    source subtask reading partition 1, or none, is idle as a whole). Partition 1 resumes behind
    that watermark: its purchases in fired windows are late (side output, no window fires
    again), its purchase in an open window counts there, and event time waits for it instead of
    going back or running ahead on partition 0."""
    topic = PurchaseTopic(kafka_bootstrap, trigger)
    async with topic.idle_partition(parallelism) as (master, job, first):
        # Partition 1's own watermark is 1500 - 200 - 1 after its first purchase: were event
        # time to go back there, b's purchase at 1700 would open [1000, 2000) again and fire it
        # with fewer purchases; it is late, as the purchase at 1500 is.
        await topic.send(master, job, [(11, 1, "c", 1500)])
        open_window = (13, 1, "b", 2300)  # b's [2000, 3000) has not fired
        await topic.send(master, job, [(12, 1, "b", 1700), open_window])
        await wait_until(lambda: topic.late_ids() == [11, 12], "the late purchases", job)
        ahead = [(14, 0, "a", 3100), (15, 0, "b", 3900), (16, 0, "a", 4300)]
        await topic.send(master, job, ahead)
        # Partition 1 (at 2300 - 200 - 1) holds event time now; only its next purchase moves it.
        closing = (17, 1, "c", 4250)
        await topic.send(master, job, [closing])
        second = watermark_of([open_window, closing])
        assert first < second < watermark_of(ahead)
        on_time = [*EARLY, *LATER, open_window, *ahead, closing]
        expected = window_results(on_time, second)
        await wait_until(lambda: len(topic.firings()) == len(expected), "the next windows", job)

    # Each window fired once, at the first watermark past its end: none again with fewer
    # purchases, none before partition 1 let event time pass it.
    assert topic.firings() == fired_at(expected, first, second)
    assert topic.late_ids() == [11, 12]
    assert operator_metric(master, "windows", "late_records_dropped") == 0


@CASES
async def test_when_all_traffic_stops_the_last_window_fires_once_the_idle_timeout_passed(
    kafka_bootstrap: str, parallelism: int, trigger: type[EventTimeTrigger] | None
) -> None:
    """Partition 1 idle, then partition 0 stops too: once partition 0 is idle (1 s of the clock
    after its last purchase) its watermark follows processing time from that purchase, so the
    last window fires then, and at no periodic emission before. A purchase that comes afterwards
    within the allowed lateness fires its window again with the updated result, at the same
    watermark (event time does not go back to partition 0's own); one beyond it is late."""
    topic = PurchaseTopic(kafka_bootstrap, trigger, lateness_ms=1000)
    async with topic.idle_partition(parallelism) as (master, job, first):
        fired_first = topic.firings()
        idle_at = LAST_PURCHASE_AT_MS + IDLE_MS
        while topic.clock.now_ms() + INTERVAL_MS < idle_at:
            await topic.advance(INTERVAL_MS, parallelism, job)
            # The periodic emission ran and the source sent nothing new: nothing more can fire.
            assert max(subtask_metrics(master, "purchases", "watermark")) == first
            assert not all(subtask_metrics(master, "purchases", "idle"))
            assert topic.firings() == fired_first
        await topic.advance(INTERVAL_MS, parallelism, job)
        assert topic.clock.now_ms() == idle_at
        following = max(p[3] for p in EARLY + LATER) + IDLE_MS - BOUND_MS - 1
        expected = window_results(EARLY + LATER, following)
        assert len(expected) > len(fired_first)
        await wait_until(lambda: len(topic.firings()) == len(expected), "the last windows", job)
        assert topic.firings() == fired_at(expected, first, following)
        assert all(subtask_metrics(master, "purchases", "idle"))

        # Partition 0's own watermark is 2700 - 200 - 1 after this purchase; event time stays at
        # ``following``, so the purchases after it are judged there too.
        within = [(11, 0, "a", 2700)]  # a's [2000, 3000) fired and is kept 1 s longer
        await topic.send(master, job, within)
        beyond = (12, 0, "b", 1900)  # b's [1000, 2000) is gone: 1999 + 1000 <= following
        within.append((13, 0, "b", 2800))  # fires b's [2000, 3000) again at once
        await topic.send(master, job, [beyond, within[1]])
        await wait_until(lambda: topic.late_ids() == [12], "the purchase beyond lateness", job)
        await wait_until(
            lambda: len(topic.firings()) == len(expected) + 2, "the windows fired again", job
        )

    updated = [r for r in window_results([*EARLY, *LATER, *within], following) if r[1] == 2000]
    assert [r[3] for r in updated] == [(8, 10, 11), (9, 13)]
    assert topic.firings() == fired_at([*expected, *updated], first, following)
