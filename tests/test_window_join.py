"""Window join and co-group: over out-of-order input on two streams, the output of tumbling,
sliding and session windows equals a plain Python computation of the same windows (written
here), at parallelism 1 and 3; a window's state is restored from a checkpoint.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from loop_helpers import (
    ControlledSource,
    ended_source,
    operator_metric,
    running_job,
    take_checkpoint,
    wait_until,
)
from test_windows import sliding, tumbling

from connectors import CollectSink
from runtime import (
    CoGroupFunction,
    Collector,
    EventTimeSessionWindows,
    ExecutionConfig,
    JobDefinitionError,
    JoinFunction,
    SlidingEventTimeWindows,
    TumblingEventTimeWindows,
    run_job,
)
from runtime.master.jobmaster import JobMaster
from runtime.shell.runner import build_graph, run_coroutine

Event = tuple[str, int, str]
"""(key, event timestamp ms, id); the two inputs' keys are in other places (see ``as_right``)."""
Window = tuple[int, int]

BOUND = 60


def make_events(n: int, keys: int, seed: int, prefix: str) -> list[Event]:
    """``n`` events about 13 ms apart, out of order within ``BOUND`` (never late)."""
    rng = random.Random(seed)
    return [
        (f"k{rng.randrange(keys)}", i * 13 + rng.randrange(BOUND + 1), f"{prefix}{i}")
        for i in range(n)
    ]


LEFTS = make_events(200, keys=4, seed=21, prefix="a")
RIGHTS = make_events(200, keys=4, seed=22, prefix="b")


def as_right(event: Event) -> dict[str, Any]:
    """The second input is of another shape, with its key under another name."""
    return {"id": event[2], "ts": event[1], "user": event[0]}


def sessions(events: list[tuple[str, int, int, str]], gap: int) -> dict[Any, list[Any]]:
    """(key, side, id) grouped into each key's sessions: merged while ``gap`` apart."""
    by_key: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for key, ts, side, ident in events:
        by_key[key].append((ts, side, ident))
    grouped: dict[Any, list[Any]] = {}
    for key, items in by_key.items():
        items.sort()
        start, end, members = items[0][0], items[0][0] + gap, []
        for ts, side, ident in items:
            if ts > end:  # Flink merges windows that touch
                grouped[(key, start, end)] = members
                start, members = ts, []
            end = max(end, ts + gap)
            members.append((side, ident))
        grouped[(key, start, end)] = members
    return grouped


def reference_groups(assign: Callable[[int], list[Window]] | None, gap: int = 0) -> dict[Any, Any]:
    """``{(key, start, end): ([first ids], [second ids])}`` of the windows (or sessions)."""
    tagged = [(k, ts, 0, i) for k, ts, i in LEFTS] + [(k, ts, 1, i) for k, ts, i in RIGHTS]
    members: dict[Any, list[Any]] = defaultdict(list)
    if assign is None:
        members.update(sessions(tagged, gap))
    else:
        for key, ts, side, ident in tagged:
            for start, end in assign(ts):
                members[(key, start, end)].append((side, ident))
    return {
        window: (
            sorted(i for s, i in items if s == 0),
            sorted(i for s, i in items if s == 1),
        )
        for window, items in members.items()
    }


def reference_join(groups: dict[Any, Any]) -> list[tuple[str, str]]:
    return sorted((a, b) for firsts, seconds in groups.values() for a in firsts for b in seconds)


def reference_co_group(groups: dict[Any, Any]) -> list[Any]:
    return sorted((window[0], firsts, seconds) for window, (firsts, seconds) in groups.items())


class Pair(JoinFunction[Event, dict[str, Any], tuple[str, str]]):
    def join(self, first: Event, second: dict[str, Any]) -> tuple[str, str]:
        assert first[0] == second["user"]
        return (first[2], second["id"])


class Groups(CoGroupFunction[Event, dict[str, Any], Any]):
    def co_group(
        self, first: list[Event], second: list[dict[str, Any]], out: Collector[Any]
    ) -> None:
        key = first[0][0] if first else second[0]["user"]
        out.collect((key, sorted(e[2] for e in first), sorted(e["id"] for e in second)))


def two_inputs(job: Any, lefts: Any, rights: Any) -> tuple[Any, Any]:
    """Both inputs with timestamps and watermarks ``BOUND`` behind, one subtask each."""
    first = (
        job.from_source(lefts)
        .uid("lefts")
        .set_parallelism(1)
        .assign_timestamps_and_watermarks(lambda e: e[1], BOUND)
        .set_parallelism(1)
    )
    second = (
        job.from_source(rights)
        .uid("rights")
        .set_parallelism(1)
        .map(as_right)
        .set_parallelism(1)
        .assign_timestamps_and_watermarks(lambda e: e["ts"], BOUND)
        .set_parallelism(1)
    )
    return first, second


def window_job(
    kind: str, assigner: Any, fn: Any, sink: CollectSink, lefts: Any = None, rights: Any = None
) -> Callable[[Any], None]:
    def build(job: Any) -> None:
        first, second = two_inputs(
            job, lefts or ended_source("a", LEFTS), rights or ended_source("b", RIGHTS)
        )
        start = first.join(second) if kind == "join" else first.co_group(second)
        joined = start.where(lambda e: e[0]).equal_to(lambda e: e["user"]).window(assigner)
        joined.apply(fn).uid("window-join").sink_to(sink).uid("sink")

    return build


CASES: dict[str, tuple[Callable[[], Any], Callable[[], dict[Any, Any]]]] = {
    # name: (the assigner, the reference's windows)
    "tumbling": (
        lambda: TumblingEventTimeWindows.of("100ms"),
        lambda: reference_groups(tumbling(100)),
    ),
    "sliding": (
        lambda: SlidingEventTimeWindows.of(150, "50ms"),
        lambda: reference_groups(sliding(150, 50)),
    ),
    "sessions": (
        lambda: EventTimeSessionWindows.with_gap(40),
        lambda: reference_groups(None, gap=40),
    ),
}


@pytest.mark.parametrize("parallelism", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_window_join_equals_the_reference(case: str, parallelism: int) -> None:
    assigner, groups = CASES[case]
    expected = reference_join(groups())
    assert len(expected) > 100
    if case == "sessions":
        assert any(end - start > 200 for _, start, end in groups()), "no session merged"
    sink = CollectSink()
    master = JobMaster(
        build_graph(window_job("join", assigner(), Pair(), sink), parallelism=parallelism),
        ExecutionConfig(),
    )
    run_coroutine(master.run())
    assert sorted(sink.results) == expected
    assert operator_metric(master, "window-join", "late_records_dropped") == 0


@pytest.mark.parametrize("parallelism", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_window_co_group_equals_the_reference(case: str, parallelism: int) -> None:
    assigner, groups = CASES[case]
    expected = reference_co_group(groups())
    # Windows with records of one input only are co-grouped too (with an empty list).
    assert any(not firsts or not seconds for _, firsts, seconds in expected)
    sink = CollectSink()
    run_job(window_job("co_group", assigner(), Groups(), sink), parallelism=parallelism)
    assert sorted(sink.results) == expected


def test_a_plain_function_joins_pairs() -> None:
    sink = CollectSink()
    run_job(
        window_job("join", TumblingEventTimeWindows.of(100), lambda a, b: (a[2], b["id"]), sink),
        parallelism=2,
    )
    assert sorted(sink.results) == reference_join(reference_groups(tumbling(100)))


@pytest.mark.asyncio
async def test_window_contents_restore_from_a_checkpoint_at_another_parallelism() -> None:
    """Half of each input, a checkpoint, cancel; the restored job at another parallelism reads
    the rest: the windows open at the checkpoint join records from both runs."""
    hold = 100
    sink = CollectSink()
    lefts, rights = ControlledSource("a"), ControlledSource("b")
    assigner = TumblingEventTimeWindows.of(100)
    async with running_job(window_job("join", assigner, Pair(), sink, lefts, rights), 2) as (
        first,
        job,
    ):
        lefts.push(*LEFTS[:hold])
        rights.push(*RIGHTS[:hold])
        await wait_until(
            lambda: operator_metric(first, "window-join", "records_in") == 2 * hold, "input", job
        )
        checkpoint = await take_checkpoint(first)
    second = JobMaster(
        build_graph(window_job("join", assigner, Pair(), sink), parallelism=3),
        ExecutionConfig(),
        restored=checkpoint,
    )
    await second.run()
    assert sorted(sink.results) == reference_join(reference_groups(tumbling(100)))


def test_join_definition_errors_name_what_to_change() -> None:
    def build_with(fn: Any, kind: str = "join") -> Callable[[Any], None]:
        def build(job: Any) -> None:
            first, second = two_inputs(job, ended_source("a", []), ended_source("b", []))
            start = first.join(second) if kind == "join" else first.co_group(second)
            start.where(lambda e: e[0]).equal_to(lambda e: e["user"]).window(
                TumblingEventTimeWindows.of(10)
            ).apply(fn)

        return build

    with pytest.raises(JobDefinitionError, match="needs a JoinFunction or a function"):
        run_job(build_with(42))
    with pytest.raises(JobDefinitionError, match="needs a CoGroupFunction or a function"):
        run_job(build_with(object(), "co_group"))

    async def joined(a: Any, b: Any) -> Any:
        return a

    with pytest.raises(JobDefinitionError, match="async function"):
        run_job(build_with(joined))


@pytest.mark.asyncio
async def test_a_late_record_within_the_allowed_lateness_fires_the_window_join_again() -> None:
    """As for windows: the window fires at its end, and again with every pair for a record
    that comes later but within the allowed lateness; a record later than that is dropped."""
    lefts, rights = ControlledSource("a"), ControlledSource("b")
    sink = CollectSink()

    def build(job: Any) -> None:
        first, second = two_inputs(job, lefts, rights)
        (
            first.join(second)
            .where(lambda e: e[0])
            .equal_to(lambda e: e["user"])
            .window(TumblingEventTimeWindows.of(100))
            .allowed_lateness(300)
            .apply(Pair())
            .uid("window-join")
            .sink_to(sink)
        )

    async with running_job(build) as (master, job):
        lefts.push(("k", 10, "a10"), ("k", 250, "a250"))
        rights.push((("k", 20, "b20")), (("k", 250, "b250")))
        # The watermark (250 - BOUND - 1) passed the window [0, 100): it fired once.
        await wait_until(lambda: sink.results == [("a10", "b20")], "the window fired", job)
        rights.push(("k", 30, "b30"))  # late, within the lateness
        await wait_until(lambda: len(sink.results) == 3, "the window fired again", job)
        lefts.push(("k", 900, "a900"))
        rights.push(("k", 900, "b900"))
        await wait_until(
            lambda: operator_metric(master, "window-join", "watermark") == 900 - BOUND - 1,
            "the watermark past the lateness",
            job,
        )
        rights.push(("k", 40, "b40"))  # later than the lateness: dropped
        await wait_until(
            lambda: operator_metric(master, "window-join", "late_records_dropped") == 1,
            "the late record dropped",
            job,
        )
        lefts.end()
        rights.end()
        await job
    assert sorted(sink.results[1:3]) == [("a10", "b20"), ("a10", "b30")]
    assert sorted(sink.results[3:]) == [("a250", "b250"), ("a900", "b900")]
