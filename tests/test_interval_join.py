"""Interval join: the output over out-of-order input (seeded random timestamps within the
watermark bound) equals a plain Python computation of the same join (written here), at
parallelism 1 and 3, with inclusive, exclusive and negative bounds; the buffers empty as the
watermark passes; late records are dropped and counted (or go to a side output); a restore from
a checkpoint, also at another parallelism, gives the same output.
"""

from __future__ import annotations

import itertools
import random
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

from connectors import CollectSink
from runtime import (
    Collector,
    ExecutionConfig,
    IntervalJoinContext,
    JobDefinitionError,
    JobFailedError,
    OutputTag,
    ProcessJoinFunction,
    run_job,
)
from runtime.api.joins import IntervalJoinOperator
from runtime.master.jobmaster import JobMaster
from runtime.shell.runner import build_graph, run_coroutine

Event = tuple[str, int, str]
"""(key, event timestamp ms, id)."""

BOUND = 50
"""The watermarks' out-of-orderness: every generated record is within it (none is late)."""


def make_events(n: int, keys: int, seed: int, prefix: str) -> list[Event]:
    """``n`` events about 10 ms apart, each up to ``BOUND`` ms later than its place in the
    sequence: out of order, but never behind the watermark ``max seen - BOUND - 1``."""
    rng = random.Random(seed)
    return [
        (f"k{rng.randrange(keys)}", i * 10 + rng.randrange(BOUND + 1), f"{prefix}{i}")
        for i in range(n)
    ]


def reference(
    lefts: list[Event],
    rights: list[Event],
    lower: int,
    upper: int,
    lower_exclusive: bool = False,
    upper_exclusive: bool = False,
) -> list[tuple[Any, ...]]:
    """Every pair with equal keys and ``l + lower <= r <= l + upper`` (bounds as asked)."""
    out = []
    for lk, lts, lid in lefts:
        for rk, rts, rid in rights:
            if lk != rk:
                continue
            above = rts > lts + lower if lower_exclusive else rts >= lts + lower
            below = rts < lts + upper if upper_exclusive else rts <= lts + upper
            if above and below:
                out.append((lid, rid, lts, rts, max(lts, rts)))
    return sorted(out)


class Pairs(ProcessJoinFunction[Event, Event, tuple[Any, ...]]):
    """(left id, right id, left ts, right ts, result ts), the result ts also from the record's
    own timestamp as the collector stamped it (checked by the sink side)."""

    def process_element(
        self, left: Event, right: Event, ctx: IntervalJoinContext, out: Collector[Any]
    ) -> None:
        assert (ctx.left_timestamp, ctx.right_timestamp) == (left[1], right[1])
        assert ctx.current_key == left[0] == right[0]
        out.collect((left[2], right[2], ctx.left_timestamp, ctx.right_timestamp, ctx.timestamp))


def join_job(
    left_source: Any,
    right_source: Any,
    sink: CollectSink,
    describe: Callable[[Any], Any],
    late_sinks: tuple[CollectSink, CollectSink] | None = None,
    function: ProcessJoinFunction[Any, Any, Any] | None = None,
) -> Callable[[Any], None]:
    """A job joining ``left_source`` and ``right_source`` (each one subtask, timestamps from
    the events, watermarks ``BOUND`` behind) with the interval join ``describe`` sets up on
    ``left.interval_join(right)``."""

    def side(job: Any, source: Any, uid: str) -> Any:
        return (
            job.from_source(source)
            .uid(uid)
            .set_parallelism(1)
            .assign_timestamps_and_watermarks(lambda e: e[1], BOUND)
            .set_parallelism(1)
            .key_by(lambda e: e[0])
        )

    def build(job: Any) -> None:
        joined = describe(
            side(job, left_source, "left").interval_join(side(job, right_source, "right"))
        )
        result = joined.process(function or Pairs()).uid("join")
        result.sink_to(sink).uid("sink")
        if late_sinks is not None:
            result.get_side_output(LEFT_LATE).sink_to(late_sinks[0]).uid("left-late")
            result.get_side_output(RIGHT_LATE).sink_to(late_sinks[1]).uid("right-late")

    return build


LEFT_LATE = OutputTag("left-late")
RIGHT_LATE = OutputTag("right-late")


BOUNDS_CASES: dict[str, tuple[Callable[[Any], Any], tuple[int, int, bool, bool]]] = {
    # name: (the join described, the reference's (lower, upper, lower exclusive, upper exclusive))
    "inclusive": (lambda j: j.between(-30, 40), (-30, 40, False, False)),
    "exclusive": (
        lambda j: j.between("-30ms", "40ms").lower_bound_exclusive().upper_bound_exclusive(),
        (-30, 40, True, True),
    ),
    "negative": (lambda j: j.between("-80ms", -20), (-80, -20, False, False)),
    "positive": (lambda j: j.between(20, "80ms").upper_bound_exclusive(), (20, 80, False, True)),
}

LEFTS = make_events(300, keys=5, seed=11, prefix="l")
RIGHTS = make_events(300, keys=5, seed=12, prefix="r")


def run_join(parallelism: int, describe: Callable[[Any], Any]) -> tuple[list[Any], JobMaster]:
    sink = CollectSink()
    build = join_job(ended_source("lefts", LEFTS), ended_source("rights", RIGHTS), sink, describe)
    master = JobMaster(build_graph(build, parallelism=parallelism), ExecutionConfig())
    run_coroutine(master.run())
    return sorted(sink.results), master


@pytest.mark.parametrize("parallelism", [1, 3])
@pytest.mark.parametrize("case", sorted(BOUNDS_CASES))
def test_interval_join_equals_the_reference(case: str, parallelism: int) -> None:
    describe, bounds = BOUNDS_CASES[case]
    expected = reference(LEFTS, RIGHTS, *bounds)
    # Out of order for real, and the bounds matter (records exactly on a bound exist).
    assert any(b[1] < a[1] for a, b in itertools.pairwise(LEFTS))
    assert any(r[3] - r[2] in bounds[:2] for r in reference(LEFTS, RIGHTS, *bounds[:2]))
    got, master = run_join(parallelism, describe)
    assert len(expected) > 50
    assert got == expected
    assert operator_metric(master, "join", "late_records_dropped") == 0


def buffered(master: JobMaster) -> int:
    """Records in the join's left and right buffers (its keyed state), over its subtasks."""
    total = 0
    for task in master.tasks:
        for op in task.operators:
            if isinstance(op, IntervalJoinOperator) and op.keyed_backend is not None:
                state = op.keyed_backend.snapshot()
                for name in ("left-buffer", "right-buffer"):
                    for per_key in state.get(name, {"values": []})["values"]:
                        total += sum(len(records) for records in per_key.values())
    return total


def pending_timers(master: JobMaster) -> int:
    return sum(
        op.timers.pending_event_timers
        for task in master.tasks
        for op in task.operators
        if isinstance(op, IntervalJoinOperator) and op.timers is not None
    )


@pytest.mark.asyncio
async def test_buffers_are_cleaned_as_the_watermark_passes() -> None:
    """Records leave the keyed state once no record of the other side can join them; with the
    input ended, no state and no timer is left."""
    lefts, rights = ControlledSource("lefts"), ControlledSource("rights")
    sink = CollectSink()
    build = join_job(lefts, rights, sink, lambda j: j.between(-30, 40))
    async with running_job(build, parallelism=2) as (master, job):
        lefts.push(*LEFTS[:100])
        rights.push(*RIGHTS[:100])
        await wait_until(lambda: operator_metric(master, "join", "records_in") == 200, "200", job)
        assert buffered(master) == 200
        # Far ahead on both sides: the watermark passes every earlier record's cleanup time.
        lefts.push(("k0", 100_000, "l-late"))
        rights.push(("k1", 100_000, "r-late"))
        await wait_until(lambda: buffered(master) == 2, "the buffers cleaned", job)
        assert pending_timers(master) == 2
        lefts.end()
        rights.end()
        await job
    assert (buffered(master), pending_timers(master)) == (0, 0)
    assert sorted(sink.results) == reference(LEFTS[:100], RIGHTS[:100], -30, 40)


@pytest.mark.asyncio
@pytest.mark.parametrize("with_side_outputs", [False, True])
async def test_records_behind_the_watermark_are_dropped_and_counted(
    with_side_outputs: bool,
) -> None:
    lefts, rights = ControlledSource("lefts"), ControlledSource("rights")
    sink, left_late, right_late = CollectSink(), CollectSink(), CollectSink()

    def describe(j: Any) -> Any:
        joined = j.between(-100, 100)
        if with_side_outputs:
            joined = joined.side_output_left_late_data(LEFT_LATE)
            joined = joined.side_output_right_late_data(RIGHT_LATE)
        return joined

    build = join_job(
        lefts, rights, sink, describe, (left_late, right_late) if with_side_outputs else None
    )
    async with running_job(build, parallelism=1) as (master, job):
        lefts.push(("k", 1000, "l1"))
        rights.push(("k", 1000, "r1"))
        join_watermark = 1000 - BOUND - 1
        await wait_until(
            lambda: operator_metric(master, "join", "watermark") == join_watermark,
            "the join's watermark",
            job,
        )
        # Both behind the watermark (948): dropped, though a match for the other side is buffered.
        lefts.push(("k", 900, "l-late"))
        rights.push(("k", 940, "r-late"))
        # Just at the watermark: not late (Flink drops only timestamps below it).
        lefts.push(("k", join_watermark, "l-on-time"))
        lefts.end()
        rights.end()
        await job
    assert sorted(sink.results) == [
        ("l-on-time", "r1", join_watermark, 1000, 1000),
        ("l1", "r1", 1000, 1000, 1000),
    ]
    if with_side_outputs:
        assert (left_late.results, right_late.results) == (
            [("k", 900, "l-late")],
            [("k", 940, "r-late")],
        )
        assert operator_metric(master, "join", "late_records_dropped") == 0
    else:
        assert operator_metric(master, "join", "late_records_dropped") == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("parallelisms", [(1, 1), (3, 2)])
async def test_a_restore_from_a_checkpoint_gives_the_same_output(
    parallelisms: tuple[int, int],
) -> None:
    """Half of the input, a checkpoint once the join has it all (buffers and cleanup timers in
    keyed state), cancel; the restored job, at the same or another parallelism, reads the rest:
    together the two runs emit exactly the join of the whole input."""
    hold = 150
    sink = CollectSink()
    first_lefts, first_rights = ControlledSource("lefts"), ControlledSource("rights")
    describe = BOUNDS_CASES["inclusive"][0]
    build = join_job(first_lefts, first_rights, sink, describe)
    async with running_job(build, parallelism=parallelisms[0]) as (first, job):
        first_lefts.push(*LEFTS[:hold])
        first_rights.push(*RIGHTS[:hold])
        await wait_until(
            lambda: operator_metric(first, "join", "records_in") == 2 * hold, "the held input", job
        )
        # Records wait in the buffers for matches that only the rest of the input brings.
        assert buffered(first) > 0
        checkpoint = await take_checkpoint(first)
    before = len(sink.results)
    second = JobMaster(
        build_graph(
            join_job(ended_source("lefts", LEFTS), ended_source("rights", RIGHTS), sink, describe),
            parallelism=parallelisms[1],
        ),
        ExecutionConfig(),
        restored=checkpoint,
    )
    await second.run()
    assert before > 0 and len(sink.results) > before
    assert sorted(sink.results) == reference(LEFTS, RIGHTS, -30, 40)


def test_bounds_and_inputs_are_checked_when_the_job_is_built() -> None:
    def build_with(describe: Callable[[Any], Any], keyed_right: bool = True) -> Callable[..., Any]:
        def build(job: Any) -> None:
            left = job.from_source(ended_source("l", [])).key_by(lambda e: e[0])
            right = job.from_source(ended_source("r", []))
            describe(left.interval_join(right.key_by(lambda e: e[0]) if keyed_right else right))

        return build

    with pytest.raises(JobDefinitionError, match=r"lower bound .* must not be above the upper"):
        run_job(build_with(lambda j: j.between(10, -10)))
    with pytest.raises(JobDefinitionError, match="needs a unit"):
        run_job(build_with(lambda j: j.between("-5", 10)))
    with pytest.raises(JobDefinitionError, match="needs a keyed stream to join with"):
        run_job(build_with(lambda j: j, keyed_right=False))
    with pytest.raises(JobDefinitionError, match="needs a ProcessJoinFunction"):
        run_job(build_with(lambda j: j.between(0, 1).process(lambda a, b: (a, b))))


def test_input_without_timestamps_fails_saying_what_to_add() -> None:
    def build(job: Any) -> None:
        left = job.from_source(ended_source("l", [("k", 1, "l")])).key_by(lambda e: e[0])
        right = job.from_source(ended_source("r", [("k", 1, "r")])).key_by(lambda e: e[0])
        left.interval_join(right).between(0, 1).process(Pairs()).sink_to(CollectSink())

    with pytest.raises(JobFailedError, match="assign_timestamps_and_watermarks"):
        run_job(build)


def test_an_async_join_function_is_refused_and_an_awaitable_result_fails_the_task() -> None:
    class Awaiting(ProcessJoinFunction[Event, Event, Any]):
        async def process_element(  # type: ignore[override]
            self, left: Event, right: Event, ctx: IntervalJoinContext, out: Collector[Any]
        ) -> None:
            out.collect((left, right))

    async def later() -> None:
        pass

    class ReturnsCoroutine(ProcessJoinFunction[Event, Event, Any]):
        def process_element(
            self, left: Event, right: Event, ctx: IntervalJoinContext, out: Collector[Any]
        ) -> Any:
            return later()

    def build_with(fn: Any) -> Callable[[Any], None]:
        return join_job(
            ended_source("l", [("k", 1, "l")]),
            ended_source("r", [("k", 1, "r")]),
            CollectSink(),
            lambda j: j.between(0, 0),
            function=fn,
        )

    with pytest.raises(JobDefinitionError, match="async function"):
        run_job(build_with(Awaiting()))
    with pytest.raises(JobFailedError, match="returned a coroutine"):
        run_job(build_with(ReturnsCoroutine()))
