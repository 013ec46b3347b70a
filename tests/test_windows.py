"""Windows: the output of tumbling, sliding and session windows over out-of-order events equals a
plain Python computation of the same windows (written here), at parallelism 1, 2 and 4, with late
records within the allowed lateness (updated results) and beyond it (dropped and counted);
triggers; processing-time windows on an injected clock; window state in checkpoints.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from loop_helpers import control_status, operator_metric, running_job, take_checkpoint, wait_until

from actors.events import MAX_TIMESTAMP, MIN_TIMESTAMP
from connectors import CollectionSource, CollectSink
from runtime import (
    AggregateFunction,
    Collector,
    ContinuousEventTimeTrigger,
    CountTrigger,
    EventTimeSessionWindows,
    EventTimeTrigger,
    ExecutionConfig,
    GlobalWindows,
    Job,
    JobDefinitionError,
    JobFailedError,
    KeyedProcessContext,
    KeyedProcessFunction,
    OutputTag,
    ProcessAllWindowFunction,
    ProcessWindowFunction,
    PurgingTrigger,
    SlidingEventTimeWindows,
    TimeWindow,
    TumblingEventTimeWindows,
    WindowContext,
    run_job,
)
from runtime.api.sources import END_OF_INPUT, EndOfInput, Source, SourceReader, SourceReaderContext
from runtime.master.jobmaster import JobMaster
from runtime.shell.runner import build_graph, run_coroutine
from state import ValueStateDescriptor

Window = tuple[int, int]
Event = tuple[str, int, int]
"""(key, event timestamp ms, amount)."""


class OneByOneSource(Source[Any]):
    """Emits its elements one per poll, from one split, so that the watermark of
    ``assign_timestamps_and_watermarks`` follows every record (late records are deterministic)."""

    def __init__(self, elements: list[Any]) -> None:
        self.elements = list(elements)

    def name(self) -> str:
        return "OneByOne"

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"next": 0}]

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        return _OneByOneReader(self.elements)


class _OneByOneReader(SourceReader[Any]):
    def __init__(self, elements: list[Any]) -> None:
        self.elements = elements
        self.splits: list[dict[str, int]] = []

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> list[Any] | EndOfInput | None:
        for split in self.splits:
            if split["next"] < len(self.elements):
                split["next"] += 1
                return [self.elements[split["next"] - 1]]
        return END_OF_INPUT

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]


def keyed_events(job: Any, source: Source[Any], out_of_orderness: int = 0) -> Any:
    """``source``'s events (key, timestamp, amount) from one source subtask, with timestamps
    and watermarks (``out_of_orderness`` behind the highest timestamp), keyed by key."""
    return (
        job.from_source(source)
        .uid("events")
        .set_parallelism(1)
        .assign_timestamps_and_watermarks(lambda e: e[1], out_of_orderness)
        .set_parallelism(1)
        .key_by(lambda e: e[0])
    )


class CountAndSum(AggregateFunction[Event, list[int], tuple[int, int]]):
    """(count, sum of amounts) per window."""

    def create_accumulator(self) -> list[int]:
        return [0, 0]

    def add(self, value: Event, accumulator: list[int]) -> list[int]:
        accumulator[0] += 1
        accumulator[1] += value[2]
        return accumulator

    def get_result(self, accumulator: list[int]) -> tuple[int, int]:
        return accumulator[0], accumulator[1]

    def merge(self, a: list[int], b: list[int]) -> list[int]:
        return [a[0] + b[0], a[1] + b[1]]


class WithWindow(ProcessWindowFunction[Any, Any, str]):
    """Emits (key, start, end, result) for an aggregated or reduced value."""

    def process(
        self, key: str, context: WindowContext[str], elements: Any, out: Collector[Any]
    ) -> None:
        (result,) = list(elements)
        out.collect((key, context.window.start, context.window.end, result))


class CountAndSumOfElements(ProcessWindowFunction[Any, Any, str]):
    """The same result from all elements of the window."""

    def process(
        self, key: str, context: WindowContext[str], elements: Any, out: Collector[Any]
    ) -> None:
        items = list(elements)
        result = (len(items), sum(e[2] for e in items))
        out.collect((key, context.window.start, context.window.end, result))


def make_events(n: int, keys: int, seed: int, disorder: int, late_every: int) -> list[Event]:
    """Events with timestamps increasing ~50 ms per event, out of order by up to ``disorder``
    ms, and every ``late_every``-th event far in the past (late, some beyond any lateness)."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        ts = 10_000 + i * 50 + rng.randrange(disorder)
        if i % late_every == late_every - 1:
            ts -= rng.randrange(500, 8_000)
        events.append((f"k{rng.randrange(keys)}", ts, rng.randrange(1, 100)))
    return events


class ForwardWithTimestamp(KeyedProcessFunction[Any, Any, Any]):
    """Forwards each record with its timestamp: (timestamp, record)."""

    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        out.collect((ctx.timestamp, value))


# ------------------------------------------------------------------------------ the reference


def reference(
    events: list[Event],
    assign: Callable[[int], list[Window]],
    out_of_orderness: int,
    lateness: int,
    session_gap: int | None = None,
    restart_at: int | None = None,
) -> tuple[list[tuple[str, int, int, tuple[int, int]]], list[Event]]:
    """Flink's event-time window semantics with the default trigger, computed directly: every
    firing as (key, start, end, (count, sum)), and the records later than the lateness. The
    watermark after each record is ``max timestamp - out_of_orderness - 1``; MAX at the end.

    ``restart_at``: the job restarts from a checkpoint taken right before that event, so the
    watermark starts again from nothing (watermarks are not checkpointed, window state is): a
    window that fired already fires again only when it gets a new element."""
    watermark = MIN_TIMESTAMP
    highest = MIN_TIMESTAMP
    contents: dict[tuple[str, Window], list[int]] = {}
    pending: set[tuple[str, Window]] = set()
    """Windows whose trigger timer (at their end) is registered and not fired yet."""
    fired: list[tuple[str, int, int, tuple[int, int]]] = []
    late: list[Event] = []

    def fire(key: str, window: Window) -> None:
        amounts = contents[(key, window)]
        fired.append((key, window[0], window[1], (len(amounts), sum(amounts))))

    def advance(new: int) -> None:
        nonlocal watermark
        for key, window in list(contents):
            if (key, window) in pending and window[1] - 1 <= new:
                pending.discard((key, window))
                fire(key, window)
            if window[1] - 1 + lateness <= new:
                del contents[(key, window)]
        watermark = new

    for index, (key, ts, amount) in enumerate(events):
        if index == restart_at:
            watermark = highest = MIN_TIMESTAMP
        if session_gap is None:
            windows = assign(ts)
        else:
            # Merge first, then check lateness (as Flink's MergingWindowSet does).
            new = (ts, ts + session_gap)
            mine = [w for k, w in contents if k == key and new[0] <= w[1] and new[1] >= w[0]]
            if mine:
                merged = (min(new[0], *(w[0] for w in mine)), max(new[1], *(w[1] for w in mine)))
                amounts = [a for w in sorted(mine) for a in contents.pop((key, w))]
                pending.difference_update((key, w) for w in mine)
                contents[(key, merged)] = amounts
                new = merged
            windows = [new]
        live = [w for w in windows if w[1] - 1 + lateness > watermark]
        if not live:
            late.append((key, ts, amount))
        for window in live:
            contents.setdefault((key, window), []).append(amount)
            if window[1] - 1 <= watermark:
                fire(key, window)
            else:
                pending.add((key, window))
        highest = max(highest, ts)
        if highest - out_of_orderness - 1 > watermark:
            advance(highest - out_of_orderness - 1)
    advance(MAX_TIMESTAMP)
    return fired, late


def tumbling(size: int) -> Callable[[int], list[Window]]:
    return lambda ts: [(ts - ts % size, ts - ts % size + size)]


def sliding(size: int, slide: int) -> Callable[[int], list[Window]]:
    def assign(ts: int) -> list[Window]:
        last = ts - ts % slide
        return [(s, s + size) for s in range(last, ts - size, -slide)]

    return assign


# ------------------------------------------------------------------------------ the job


def run_windows(
    events: list[Event],
    parallelism: int,
    make_windowed: Callable[[Any], Any],
    out_of_orderness: int,
    late_tag: OutputTag | None = None,
) -> tuple[list[Any], list[Any], int]:
    """The window results, the late side output (of ``late_tag``) and the late records dropped,
    for the windows ``make_windowed`` makes of ``events`` keyed by key (from one source subtask,
    so that the watermark follows each record)."""
    sink = CollectSink()
    late_sink = CollectSink()

    def build(job: Any) -> None:
        keyed = keyed_events(job, OneByOneSource(events), out_of_orderness)
        windows = make_windowed(keyed).uid("windows")
        windows.sink_to(sink)
        if late_tag is not None:
            windows.get_side_output(late_tag).sink_to(late_sink)

    master = JobMaster(build_graph(build, parallelism=parallelism), ExecutionConfig())
    run_coroutine(master.run())
    dropped = operator_metric(master, "windows", "late_records_dropped")
    return sorted(sink.results), sorted(late_sink.results), dropped


EVENTS = make_events(600, keys=7, seed=3, disorder=400, late_every=17)


LATE = OutputTag("late")

REFERENCE_CASES: dict[str, tuple[Callable[[], Any], Callable[[Any], Any], bool]] = {
    # name: (the reference, the windows, with a late-data side output)
    "tumbling": (
        lambda: reference(EVENTS, tumbling(1000), out_of_orderness=300, lateness=2000),
        lambda keyed: (
            keyed.window(TumblingEventTimeWindows.of("1s"))
            .allowed_lateness("2s")
            .side_output_late_data(LATE)
            .aggregate(CountAndSum(), WithWindow())
        ),
        True,
    ),
    "sliding": (
        lambda: reference(EVENTS, sliding(1500, 500), out_of_orderness=300, lateness=1000),
        lambda keyed: (
            keyed.window(SlidingEventTimeWindows.of(1500, "500ms"))
            .allowed_lateness(1000)
            .process(CountAndSumOfElements())
        ),
        False,
    ),
    "sessions": (
        lambda: reference(
            EVENTS, tumbling(1), out_of_orderness=300, lateness=1000, session_gap=400
        ),
        lambda keyed: (
            keyed.window(EventTimeSessionWindows.with_gap("400ms"))
            .allowed_lateness("1s")
            .side_output_late_data(LATE)
            .aggregate(CountAndSum(), WithWindow())
        ),
        True,
    ),
}


@pytest.mark.parametrize("parallelism", [1, 2, 4])
@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_windows_with_lateness_equal_the_reference(case: str, parallelism: int) -> None:
    make_reference, windowed, with_tag = REFERENCE_CASES[case]
    expected, late = make_reference()
    # Some windows fired again for late records within the lateness; some records were later.
    assert late and len(expected) > len({(k, s, e) for k, s, e, _ in expected})
    if case == "sessions":
        assert any(e - s > 400 for _, s, e, _ in expected), "no session merged"
    got, got_late, dropped = run_windows(
        EVENTS, parallelism, windowed, out_of_orderness=300, late_tag=LATE if with_tag else None
    )
    assert got == sorted(expected)
    if with_tag:
        assert (got_late, dropped) == (sorted(late), 0)
    else:
        # Without a late-data side output, records later than the lateness are dropped and
        # counted.
        assert (got_late, dropped) == ([], len(late))


@pytest.mark.parametrize("parallelism", [1, 3])
def test_session_windows_with_all_elements_equal_the_reference(parallelism: int) -> None:
    expected, late = reference(
        EVENTS, tumbling(1), out_of_orderness=300, lateness=0, session_gap=400
    )
    got, _, dropped = run_windows(
        EVENTS,
        parallelism,
        lambda keyed: keyed.window(EventTimeSessionWindows.with_gap(400)).process(
            CountAndSumOfElements()
        ),
        out_of_orderness=300,
    )
    assert got == sorted(expected)
    assert dropped == len(late)


def test_reduce_without_window_function_emits_the_reduced_value_at_the_window_end() -> None:
    expected, _ = reference(EVENTS, tumbling(1000), out_of_orderness=300, lateness=0)
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            keyed_events(job, OneByOneSource(EVENTS), 300)
            .window(TumblingEventTimeWindows.of(1000))
            .reduce(lambda a, b: (a[0], max(a[1], b[1]), a[2] + b[2]))
            .map(lambda e: (e[0], e[2]))
            .sink_to(sink)
        )

    run_job(build, parallelism=2)
    assert sorted(sink.results) == sorted((k, total) for k, _, _, (_, total) in expected)


def test_window_results_carry_the_window_max_timestamp() -> None:
    class Stamps(ProcessWindowFunction[Any, Any, str]):
        def process(self, key: str, context: Any, elements: Any, out: Collector[Any]) -> None:
            out.collect((key, context.window, context.current_watermark(), len(list(elements))))

    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource([("a", 5, 1), ("a", 1500, 1), ("b", 2500, 1)]))
            .assign_timestamps_and_watermarks(lambda e: e[1])
            .key_by(lambda e: e[0])
            .window(TumblingEventTimeWindows.of("1s"))
            .process(Stamps())
            .key_by(lambda r: r[0])
            .process(ForwardWithTimestamp())
            .sink_to(sink)
        )

    run_job(build)
    # The one buffer's watermark (2499) fires a's windows; b's fires at the end of the bounded
    # input (MAX_WATERMARK), which fires every pending window.
    assert sorted(sink.results) == [
        (999, ("a", TimeWindow(0, 1000), 2499, 1)),
        (1999, ("a", TimeWindow(1000, 2000), 2499, 1)),
        (2999, ("b", TimeWindow(2000, 3000), MAX_TIMESTAMP, 1)),
    ]


# ------------------------------------------------------------------------------ triggers


class Elements(ProcessWindowFunction[Any, Any, str]):
    """Emits (key, the window's elements' amounts in arrival order)."""

    def process(self, key: str, context: Any, elements: Any, out: Collector[Any]) -> None:
        out.collect((key, [e[2] for e in elements]))


class _NoMerge(CountTrigger):
    def can_merge(self) -> bool:
        return False

    def __init__(self) -> None:
        super().__init__(1)


def per_key(results: list[Any]) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for key, value in results:
        grouped.setdefault(key, []).append(value)
    return grouped


COUNTED = [("a", 0, i) for i in range(1, 8)] + [("b", 0, i) for i in range(1, 5)]


@pytest.mark.parametrize("parallelism", [1, 2])
@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        # Fires every 3 elements, keeping the contents; the global window never ends, so the
        # last elements of a (7) and b (4) never fire.
        (CountTrigger.of(3), {"a": [[1, 2, 3], [1, 2, 3, 4, 5, 6]], "b": [[1, 2, 3]]}),
        # Purged at each firing: each sees only the elements since the previous one.
        (PurgingTrigger.of(CountTrigger.of(3)), {"a": [[1, 2, 3], [4, 5, 6]], "b": [[1, 2, 3]]}),
    ],
    ids=["count", "purging-count"],
)
def test_count_triggers_fire_the_global_window_every_n_elements(
    trigger: Any, expected: dict[str, Any], parallelism: int
) -> None:
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(COUNTED))
            .set_parallelism(1)
            .key_by(lambda e: e[0])
            .window(GlobalWindows.create())
            .trigger(trigger)
            .process(Elements())
            .sink_to(sink)
        )

    run_job(build, parallelism=parallelism)
    assert per_key(sink.results) == expected


def test_count_trigger_state_merges_with_session_windows() -> None:
    # Two sessions of a that merge once the bridging record arrives: their counts add up.
    records = [("a", 0, 1), ("a", 1000, 2), ("a", 500, 3), ("a", 1100, 4)]
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            keyed_events(job, OneByOneSource(records), 5000)
            .window(EventTimeSessionWindows.with_gap(600))
            .trigger(CountTrigger.of(4))
            .process(Elements())
            .sink_to(sink)
        )

    run_job(build)
    # [0,600) and [1000,1600) merge through [500,1100) into [0,1600): their counts (1 + 1) and
    # contents merge, so the 4th element fires it.
    assert sink.results == [("a", [1, 2, 3, 4])]


def test_continuous_event_time_trigger_fires_every_interval_and_at_the_window_end() -> None:
    records = [("a", ts, 1) for ts in range(0, 3000, 100)]
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            keyed_events(job, OneByOneSource(records))
            .window(TumblingEventTimeWindows.of("3s"))
            .trigger(ContinuousEventTimeTrigger.of("1s"))
            .aggregate(CountAndSum(), WithWindow())
            .sink_to(sink)
        )

    run_job(build)
    # The watermark after each record is its timestamp - 1: it passes 1000 after the record at
    # 1100 (12 records so far), 2000 after the one at 2100 (22); the window's end fires at the
    # end of input with all 30.
    assert sink.results == [
        ("a", 0, 3000, (12, 12)),
        ("a", 0, 3000, (22, 22)),
        ("a", 0, 3000, (30, 30)),
    ]


# ------------------------------------------------------------------------------ window_all


class SumAll(ProcessAllWindowFunction[Any, Any]):
    def process(self, context: Any, elements: Any, out: Collector[Any]) -> None:
        out.collect((context.window.start, sum(e[2] for e in elements)))


def test_window_all_evaluates_every_record_in_one_subtask() -> None:
    records = [(f"k{i % 5}", i * 100, i) for i in range(50)]
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(records))
            .assign_timestamps_and_watermarks(lambda e: e[1])
            .window_all(TumblingEventTimeWindows.of("1s"))
            .process(SumAll())
            .uid("all")
            .sink_to(sink)
        )

    result = run_job(build, parallelism=3)
    assert sorted(sink.results) == [(s * 1000, sum(range(s * 10, s * 10 + 10))) for s in range(5)]
    assert next(op for op in result.operators if op.uid == "all").parallelism == 1


def test_window_all_refuses_another_parallelism() -> None:
    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource([1]))
            .window_all(GlobalWindows.create())
            .reduce(lambda a, b: a + b)
            .set_parallelism(2)
        )

    with pytest.raises(JobDefinitionError, match=r"window_all\(\) runs at parallelism 1"):
        run_job(build)


def test_window_definition_errors_name_what_to_change() -> None:
    keyed = Job().from_source(CollectionSource([1])).key_by(lambda v: v)
    with pytest.raises(ValueError, match="window size must be positive"):
        TumblingEventTimeWindows.of(0)
    with pytest.raises(ValueError, match="session gap: invalid duration"):
        EventTimeSessionWindows.with_gap("soon")
    with pytest.raises(JobDefinitionError, match="needs an AggregateFunction"):
        keyed.window(TumblingEventTimeWindows.of(10)).aggregate(lambda v: v)
    with pytest.raises(JobDefinitionError, match="needs a ProcessWindowFunction"):
        keyed.window(TumblingEventTimeWindows.of(10)).process(lambda v: v)
    with pytest.raises(JobDefinitionError, match="window\\(\\) needs a WindowAssigner"):
        keyed.window(10)  # type: ignore[arg-type]
    with pytest.raises(JobDefinitionError, match="does not support merging windows"):
        keyed.window(EventTimeSessionWindows.with_gap(10)).trigger(_NoMerge())


# ------------------------------------------------------------------------------ checkpoints


class HoldingSource(OneByOneSource):
    """One element per poll; the first run holds at ``hold_at`` (nothing more comes), a run
    restored from a checkpoint goes on from the restored position to the end."""

    def __init__(self, elements: list[Any], hold_at: int | None) -> None:
        super().__init__(elements)
        self.hold_at = hold_at

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        return _HoldingReader(self.elements, self.hold_at)


class _HoldingReader(_OneByOneReader):
    def __init__(self, elements: list[Any], hold_at: int | None) -> None:
        super().__init__(elements)
        self.hold_at = hold_at

    def poll(self, max_records: int) -> list[Any] | EndOfInput | None:
        if any(split["next"] == self.hold_at for split in self.splits):
            return None
        return super().poll(max_records)


async def run_restored_at_another_parallelism(
    events: list[Event],
    hold_at: int,
    parallelisms: tuple[int, int],
    make_windowed: Callable[[Any], Any],
    out_of_orderness: int,
    late_tag: OutputTag | None = None,
) -> tuple[list[Any], list[Any]]:
    """Run the windows over ``events[:hold_at]``, take a checkpoint once the window operator
    has all of them, cancel; then restore that checkpoint at the second parallelism and run to
    the end. The window results and late records of both runs together."""
    sink, late_sink = CollectSink(), CollectSink()

    def build_for(hold: int | None) -> Callable[[Any], None]:
        def build(job: Any) -> None:
            keyed = keyed_events(job, HoldingSource(events, hold), out_of_orderness)
            windows = make_windowed(keyed).uid("windows")
            windows.sink_to(sink).uid("sink")
            if late_tag is not None:
                windows.get_side_output(late_tag).sink_to(late_sink).uid("late-sink")

        return build

    async with running_job(build_for(hold_at), parallelism=parallelisms[0]) as (first, job):
        await wait_until(
            lambda: operator_metric(first, "windows", "records_in") == hold_at,
            "the held records",
            job,
        )
        checkpoint = await take_checkpoint(first)
    second = JobMaster(
        build_graph(build_for(None), parallelism=parallelisms[1]),
        ExecutionConfig(),
        restored=checkpoint,
    )
    await second.run()
    return sorted(sink.results), sorted(late_sink.results)


class SameAsDefault(EventTimeTrigger):
    """The default trigger's behaviour through the trigger-driven path (any other trigger)."""


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("parallelisms", "triggers"),
    [((1, 3), (None, None)), ((3, 2), (None, SameAsDefault)), ((2, 1), (SameAsDefault, None))],
)
async def test_tumbling_window_state_restores_at_another_parallelism(
    parallelisms: tuple[int, int], triggers: tuple[Any, Any]
) -> None:
    """Contents and fired windows within their lateness are in the checkpoint, at any
    parallelism, and either path (default trigger, trigger-driven) restores the other's."""
    hold_at = 300
    expected, late = reference(
        EVENTS, tumbling(1000), out_of_orderness=300, lateness=2000, restart_at=hold_at
    )
    tag = OutputTag("late")
    runs = iter(triggers)

    def windowed(keyed: Any) -> Any:
        windows = keyed.window(TumblingEventTimeWindows.of(1000))
        trigger = next(runs)
        if trigger is not None:
            windows = windows.trigger(trigger())
        return (
            windows.allowed_lateness(2000)
            .side_output_late_data(tag)
            .aggregate(CountAndSum(), WithWindow())
        )

    got, got_late = await run_restored_at_another_parallelism(
        EVENTS, hold_at, parallelisms, windowed, 300, tag
    )
    assert got == sorted(expected)
    assert got_late == sorted(late)


@pytest.mark.asyncio
@pytest.mark.parametrize("parallelisms", [(1, 3), (4, 2)])
async def test_session_window_state_restores_at_another_parallelism(
    parallelisms: tuple[int, int],
) -> None:
    hold_at = 250
    expected, late = reference(
        EVENTS,
        tumbling(1),
        out_of_orderness=300,
        lateness=1000,
        session_gap=400,
        restart_at=hold_at,
    )
    tag = OutputTag("late")
    got, got_late = await run_restored_at_another_parallelism(
        EVENTS,
        hold_at,
        parallelisms,
        lambda keyed: (
            keyed.window(EventTimeSessionWindows.with_gap(400))
            .allowed_lateness(1000)
            .side_output_late_data(tag)
            .aggregate(CountAndSum(), WithWindow())
        ),
        300,
        tag,
    )
    assert got == sorted(expected)
    assert got_late == sorted(late)


@pytest.mark.asyncio
async def test_late_records_dropped_are_counted_per_operator_in_status() -> None:
    """Without a late-data side output nothing is dropped silently: /status counts them."""
    _, late = reference(EVENTS, tumbling(1000), out_of_orderness=300, lateness=0)
    assert late
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            # Holds at the end: the job is still running.
            keyed_events(job, HoldingSource(EVENTS, len(EVENTS)), 300)
            .window(TumblingEventTimeWindows.of(1000))
            .aggregate(CountAndSum(), WithWindow())
            .uid("windows")
            .sink_to(sink)
            .uid("sink")
        )

    async with running_job(build, parallelism=2) as (master, job):
        await wait_until(
            lambda: operator_metric(master, "windows", "records_in") == len(EVENTS),
            "every record",
            job,
        )
        status = await control_status(master)
    operators = {op["uid"]: op for op in status["operators"]}
    assert operators["windows"]["late_records_dropped"] == len(late)
    assert operators["sink"]["late_records_dropped"] == 0


class AsyncWindowFunction(ProcessWindowFunction[Any, Any, str]):
    async def process(  # type: ignore[override]
        self, key: str, context: Any, elements: Any, out: Collector[Any]
    ) -> None:
        out.collect(key)


def test_an_async_window_function_is_refused_when_the_job_is_built() -> None:
    keyed = Job().from_source(CollectionSource([1])).key_by(lambda v: v)
    with pytest.raises(JobDefinitionError, match=r"AsyncWindowFunction.process .* is an async"):
        keyed.window(GlobalWindows.create()).process(AsyncWindowFunction())


CLEARED: list[Any] = []


class FiringsPerWindow(ProcessWindowFunction[Any, Any, str]):
    """Counts its firings per window (window state) and per key (global state)."""

    FIRINGS = ValueStateDescriptor("firings", default=0)
    TOTAL = ValueStateDescriptor("total", default=0)

    def process(self, key: str, context: Any, elements: Any, out: Collector[Any]) -> None:
        firings = context.window_state().get_state(self.FIRINGS)
        firings.update(firings.value() + 1)
        total = context.global_state().get_state(self.TOTAL)
        total.update(total.value() + 1)
        out.collect(
            (key, context.window.start, firings.value(), total.value(), len(list(elements)))
        )

    def clear(self, context: Any) -> None:
        state = context.window_state().get_state(self.FIRINGS)
        CLEARED.append((context.window.start, state.value()))
        state.clear()


@pytest.mark.parametrize("trigger", [None, SameAsDefault])
def test_process_window_function_has_per_window_and_per_key_state(trigger: Any) -> None:
    # a: two records in [0, 1000), fired at watermark 1099; one late record within the lateness
    # re-fires it; then [1000, 2000) fires at the end. Watermark = highest timestamp - 1.
    records = [("a", 100, 1), ("a", 200, 1), ("a", 1100, 1), ("a", 500, 1), ("a", 3500, 1)]
    CLEARED.clear()
    sink = CollectSink()

    def build(job: Any) -> None:
        windows = keyed_events(job, OneByOneSource(records)).window(
            TumblingEventTimeWindows.of(1000)
        )
        if trigger is not None:
            windows = windows.trigger(trigger())
        windows.allowed_lateness(2000).process(FiringsPerWindow()).sink_to(sink)

    run_job(build)
    assert sink.results == [
        ("a", 0, 1, 1, 2),
        ("a", 0, 2, 2, 3),
        ("a", 1000, 1, 3, 1),
        ("a", 3000, 1, 4, 1),
    ]
    # Each window's state is cleared when it goes (its end + lateness passed, or at the end).
    assert sorted(CLEARED) == [(0, 2), (1000, 1), (3000, 1)]


@pytest.mark.asyncio
async def test_trigger_state_restores_at_another_parallelism() -> None:
    """CountTrigger's count is keyed state per window: restored, the count goes on."""
    events = [("a", 0, 1), ("b", 0, 2), ("a", 0, 3), ("a", 0, 4), ("b", 0, 5), ("b", 0, 6)]
    got, _ = await run_restored_at_another_parallelism(
        events,
        3,
        (1, 3),
        lambda keyed: (
            keyed.window(GlobalWindows.create()).trigger(CountTrigger.of(3)).process(Elements())
        ),
        0,
    )
    # Two of a's and one of b's before the checkpoint: a's third and b's third fire.
    assert got == [("a", [1, 3, 4]), ("b", [2, 5, 6])]


class WithCleanupRule(ProcessWindowFunction[Any, Any, str]):
    def open(self, ctx: Any) -> None:
        ctx.set_state_cleanup_rule(lambda key, state: True)

    def process(self, key: str, context: Any, elements: Any, out: Collector[Any]) -> None:
        out.collect(key)


def test_a_state_cleanup_rule_in_a_window_function_is_refused() -> None:
    """A rule would clear a key's window state behind the windows' timers and panes."""

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource([("a", 1, 1)]))
            .assign_timestamps_and_watermarks(lambda e: e[1])
            .key_by(lambda e: e[0])
            .window(TumblingEventTimeWindows.of(10))
            .process(WithCleanupRule())
            .sink_to(CollectSink())
        )

    with pytest.raises(JobFailedError, match="state cleanup rules are not supported in windows"):
        run_job(build)


def test_event_time_windows_without_timestamps_fail_saying_what_to_add() -> None:
    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource([("a", 1, 1)]))
            .key_by(lambda e: e[0])
            .window(TumblingEventTimeWindows.of(10))
            .reduce(lambda a, b: a)
            .sink_to(CollectSink())
        )

    with pytest.raises(JobFailedError, match=r"need record timestamps; call assign_timestamps"):
        run_job(build)
