"""Async I/O (``map_async`` / ``flat_map_async``): order, capacity, backpressure, watermarks,
checkpoints of pending requests, timeouts, retries, the keyed variant and the end of input.

In-process jobs against :class:`runtime.testing.SimulatedService` (seeded random latencies,
calls counted there); the crash-and-restore run through the CLI is at the end."""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_helpers import (
    ROOT,
    checkpoint_list_state,
    checkpointed_run_args,
    committed_output_checkpoints,
    kill_when,
    list_state_in,
    max_completed,
    run_cli,
    set_args,
    start_cli,
)
from loop_helpers import (
    ControlledSource,
    operator_metric,
    running_job,
    start_job_on_master,
    take_checkpoint,
    wait_until,
)

from actors.protocol import TaskState
from connectors.files import committed_files
from runtime import (
    AsyncFunction,
    AsyncRetryStrategy,
    Collector,
    JobFailedError,
    ProcessContext,
    ProcessFunction,
    RuntimeContext,
    WatermarkStrategy,
    testing,
)
from runtime.api.async_io import IN_FLIGHT_STATE
from runtime.api.sources import DEFAULT_SOURCE_BATCH
from runtime.api.streams import JobDefinitionError
from runtime.config import CheckpointConfig, ExecutionConfig
from runtime.master.jobmaster import JobMaster
from runtime.master.restart import FixedDelayRestart
from runtime.plan.jobfile import build_graph
from runtime.testing import SimulatedService
from state.keyed import ValueStateDescriptor
from state.keygroups import (
    DEFAULT_MAX_PARALLELISM,
    key_group_for_key,
    key_group_range_for_subtask,
)

WAIT_S = 30.0
EXAMPLE = ROOT / "examples" / "async_enrichment.py"
EVENTS = ROOT / "examples" / "data" / "events.jsonl"


def enriched(value: Any) -> tuple[Any, str]:
    return (value, f"info-{value}")


def _steps_pass() -> Any:
    """Let the loop run a while (the tasks take what they can) without waiting on time."""

    async def run() -> None:
        for _ in range(200):
            await asyncio.sleep(0)

    return run()


@pytest.mark.asyncio
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("capacity", [1, 50])
async def test_output_equals_the_sequential_result_and_capacity_bounds_calls(
    ordered: bool, capacity: int
) -> None:
    service = SimulatedService(enriched, latency_s=(0.0, 0.002), seed=capacity)
    sink = testing.TestingSink()
    values = list(range(300))

    def build(job: Any) -> None:
        (
            job.from_source(testing.TestingSource(values))
            .map_async(service.call, capacity=capacity, ordered=ordered)
            .sink_to(sink)
        )

    async with running_job(build) as (_, job):
        await asyncio.wait_for(job, WAIT_S)

    sequential = [enriched(v) for v in values]
    if ordered:
        assert sink.written == sequential
    else:
        assert collections.Counter(sink.written) == collections.Counter(sequential)
        if capacity > 1:
            assert sink.written != sequential  # as they completed
    assert service.calls == len(values)
    assert service.max_in_flight <= capacity
    if capacity > 1:
        assert service.max_in_flight > 1  # the requests did overlap


@pytest.mark.asyncio
async def test_chained_async_operators_keep_order_while_each_waits_for_room() -> None:
    """The second operator, full, waits inside a buffer the first one handed it: only its own
    results (and those after it in the chain) may run then, or the first one would hand it more
    records halfway through that buffer."""
    first = SimulatedService(lambda v: v * 10, latency_s=(0.0, 0.001), seed=1)
    second = SimulatedService(lambda v: v + 1, latency_s=(0.0, 0.003), seed=2)
    sink = testing.TestingSink()

    def build(job: Any) -> None:
        (
            job.from_source(testing.TestingSource(list(range(200))))
            .map_async(first.call, capacity=20)
            .map_async(second.call, capacity=3)
            .sink_to(sink)
        )

    async with running_job(build) as (_, job):
        await asyncio.wait_for(job, WAIT_S)
    assert sink.written == [v * 10 + 1 for v in range(200)]
    assert second.max_in_flight <= 3


@pytest.mark.asyncio
async def test_flat_map_async_emits_every_result_of_each_request_in_order() -> None:
    sink = testing.TestingSink()

    async def split(line: str) -> list[str]:
        await asyncio.sleep(0)
        return line.split()

    def build(job: Any) -> None:
        job.from_source(testing.TestingSource(["a b", "", "c d e"])).flat_map_async(split).sink_to(
            sink
        )

    async with running_job(build) as (_, job):
        await asyncio.wait_for(job, WAIT_S)
    assert sink.written == ["a", "b", "c", "d", "e"]


@pytest.mark.asyncio
@pytest.mark.parametrize("chained", [True, False], ids=["chained", "through-a-channel"])
async def test_a_slow_service_holds_the_source_back(chained: bool) -> None:
    """Bounded memory: with every call held, the source emits no more than the capacity, the
    buffer the operator was taking when it filled up, what the channel's credits let through
    (none when chained) and the source batch it was emitting; nothing piles up in between."""
    service = SimulatedService(enriched)
    service.hold()
    sink = testing.TestingSink()
    source = ControlledSource("held")
    capacity = 20
    buffer_size = 16
    config = ExecutionConfig(buffer_size=buffer_size, exclusive_credits=1, floating_buffers=0)

    def build(job: Any) -> None:
        enriching = job.from_source(source).uid("source").map_async(service.call, capacity=capacity)
        if not chained:
            enriching.disable_chaining()
        enriching.sink_to(sink)

    async with running_job(build, config=config) as (master, job):
        source.push(*range(5000))
        await wait_until(lambda: service.in_flight == capacity, "the operator full", job)
        await _steps_pass()
        emitted = operator_metric(master, "source", "records_out")
        in_channel = 0 if chained else 2 * buffer_size  # one credit, and the writer's buffer
        assert emitted <= capacity + buffer_size + in_channel + DEFAULT_SOURCE_BATCH < 5000
        assert service.max_in_flight == capacity
        service.release()
        source.end()
        await asyncio.wait_for(job, WAIT_S)
    assert sink.written == [enriched(v) for v in range(5000)]
    assert service.max_in_flight == capacity


class SeenWatermark(ProcessFunction[Any, Any]):
    """Emits (record, the watermark it arrived after)."""

    def process_element(self, value: Any, ctx: ProcessContext, out: Collector[Any]) -> None:
        out.collect((value, ctx.current_watermark()))


@pytest.mark.asyncio
async def test_unordered_results_never_overtake_a_later_watermark() -> None:
    slow_gate = asyncio.Event()
    service = SimulatedService()

    async def lookup(value: tuple[int, str]) -> str:
        if value[1].startswith("a"):
            await slow_gate.wait()
        result: str = await service.call(value[1])
        return result

    sink = testing.TestingSink()
    source = ControlledSource("events")
    strategy = WatermarkStrategy.for_monotonous_timestamps().with_timestamp_assigner(
        lambda v, _: v[0]
    )

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .assign_timestamps_and_watermarks(strategy)
            .map_async(lookup, ordered=False)
            .process(SeenWatermark())
            .sink_to(sink)
        )

    config = ExecutionConfig(auto_watermark_interval_s=0)
    master = JobMaster(build_graph(build, None, 1), config)
    job = asyncio.create_task(master.run())
    try:
        source.push((1, "a1"), (2, "a2"), (3, "a3"))
        await wait_until(lambda: service.calls == 0 and bool(master.tasks), "job running", job)
        await _steps_pass()
        source.push((10, "b1"), (11, "b2"))
        await wait_until(lambda: service.calls == 2 and service.in_flight == 0, "b done", job)
        await _steps_pass()
        # b1 and b2 came back, but a watermark (2) that followed a1..a3 stands before them.
        assert sink.written == []
        slow_gate.set()
        await wait_until(lambda: len(sink.written) == 5, "every result", job)
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
    before = [seen for (name, seen) in sink.written if name.startswith("a")]
    after = [seen for (name, seen) in sink.written if name.startswith("b")]
    assert all(seen < 2 for seen in before)
    assert all(seen >= 2 for seen in after)
    assert [name for name, _ in sink.written][3:] in (["b1", "b2"], ["b2", "b1"])


def enrich_in_own_task(
    source: ControlledSource, fn: Any, sink: Any, **options: Any
) -> Callable[[Any], None]:
    """source (uid ``source``) → ``map_async(fn, **options)`` (uid ``enrich``, a task of its
    own, so that barriers reach it through a channel) → sink (uid ``sink``)."""

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("source")
            .map_async(fn, **options)
            .uid("enrich")
            .disable_chaining()
            .sink_to(sink)
            .uid("sink")
        )

    return build


ONLY_TRIGGERED_CHECKPOINTS = ExecutionConfig(checkpoint=CheckpointConfig(interval_s=None))


async def checkpoint_then_crash(
    build: Callable[[Any], None],
    prepare: Callable[[asyncio.Task[Any]], Awaitable[None]],
    parallelism: int = 1,
) -> Any:
    """Run ``build``, await ``prepare(job)``, take a checkpoint and cancel the job (a crash)."""
    master, job = await start_job_on_master(build, ONLY_TRIGGERED_CHECKPOINTS, parallelism)
    try:
        await prepare(job)
        return await take_checkpoint(master)
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)


async def run_restored(build: Callable[[Any], None], checkpoint: Any, parallelism: int = 1) -> None:
    """Run ``build`` to its end, restored from ``checkpoint``."""
    graph = build_graph(build, None, parallelism)
    master = JobMaster(graph, ONLY_TRIGGERED_CHECKPOINTS, restored=checkpoint)
    await asyncio.wait_for(master.run(), WAIT_S)


@pytest.mark.asyncio
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_a_checkpoint_does_not_wait_for_requests_and_a_restore_reissues_them(
    ordered: bool,
) -> None:
    """Requests held for as long as the test likes: the checkpoint completes anyway, with the
    pending inputs in its state; a new run restored from it (the first one cancelled, as on a
    crash) re-issues them, and the sink commits every input's result exactly once."""
    service = SimulatedService(enriched)
    source = ControlledSource("events")
    sink = testing.TestingSink()

    build = enrich_in_own_task(source, service.call, sink, capacity=50, ordered=ordered)

    async def hold_twenty(job: asyncio.Task[Any]) -> None:
        source.push(*range(10))
        await wait_until(lambda: len(sink.written) == 10, "the first ten through", job)
        service.hold()
        source.push(*range(10, 30))
        await wait_until(lambda: service.in_flight == 20, "twenty requests held", job)

    checkpoint = await checkpoint_then_crash(build, hold_twenty)
    pending = list_state_in(checkpoint, "enrich", IN_FLIGHT_STATE)
    assert [entry["value"] for entry in pending] == list(range(10, 30))  # none came back for it
    service.release()
    await asyncio.sleep(0)
    assert sink.committed == [enriched(v) for v in range(10)]

    source.push(*range(30, 40))
    source.end()
    await run_restored(build, checkpoint)
    expected = [enriched(v) for v in range(40)]
    if ordered:
        assert sink.committed == expected
    else:
        assert collections.Counter(sink.committed) == collections.Counter(expected)
    # At-least-once calls: the twenty held requests were asked for twice.
    repeated = [v for v, n in collections.Counter(service.requests).items() if n > 1]
    assert sorted(repeated) == list(range(10, 30))


@pytest.mark.asyncio
async def test_ordered_results_waiting_for_their_turn_are_checkpointed_not_asked_again() -> None:
    """Ordered: 10 is held, 11..19 came back and wait behind it. The checkpoint keeps their
    results; the restored run asks the service for 10 only."""
    service = SimulatedService(enriched)
    held = asyncio.Event()

    async def lookup(value: int) -> Any:
        if value == 10:
            await held.wait()
        return await service.call(value)

    source = ControlledSource("events")
    sink = testing.TestingSink()
    build = enrich_in_own_task(source, lookup, sink)

    async def hold_ten(job: asyncio.Task[Any]) -> None:
        source.push(*range(20))
        await wait_until(lambda: service.calls == 19, "all but 10 answered", job)

    checkpoint = await checkpoint_then_crash(build, hold_ten)
    held.set()
    source.end()
    await run_restored(build, checkpoint)
    assert sink.committed == [enriched(v) for v in range(20)]
    assert collections.Counter(service.requests) == {v: 1 for v in range(20)}


CALLED_IN: list[tuple[int, int, int]] = []
"""(value, subtask index, parallelism) of each call of :class:`RecordsSubtask`."""


class RecordsSubtask(AsyncFunction[int, Any]):
    def __init__(self, service: SimulatedService) -> None:
        self.service = service

    def open(self, ctx: RuntimeContext) -> None:
        self.where = (ctx.subtask_index, ctx.parallelism)

    async def invoke(self, value: int) -> Any:
        CALLED_IN.append((value, *self.where))
        return await self.service.call(value)


@pytest.mark.asyncio
async def test_keyed_pending_requests_are_reissued_once_by_their_keys_subtask_after_rescaling() -> (
    None
):
    service = SimulatedService(enriched)
    CALLED_IN.clear()
    source = ControlledSource("events")
    sink = testing.TestingSink()

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("source")
            .set_parallelism(1)
            .key_by(lambda v: v % 7)
            .map_async(RecordsSubtask(service), ordered=False)
            .uid("enrich")
            .sink_to(sink)
            .uid("sink")
        )

    async def hold_all(job: asyncio.Task[Any]) -> None:
        service.hold()
        source.push(*range(40))
        await wait_until(lambda: service.in_flight == 40, "every request held", job)

    checkpoint = await checkpoint_then_crash(build, hold_all, parallelism=2)
    service.release()
    source.end()
    await run_restored(build, checkpoint, parallelism=3)
    assert collections.Counter(sink.committed) == collections.Counter(map(enriched, range(40)))
    assert collections.Counter(service.requests) == {v: 2 for v in range(40)}
    reissued = [(v, subtask) for v, subtask, parallelism in CALLED_IN if parallelism == 3]
    assert sorted(v for v, _ in reissued) == list(range(40))
    for value, subtask in reissued:
        key_group = key_group_for_key(value % 7, DEFAULT_MAX_PARALLELISM)
        assert key_group in key_group_range_for_subtask(DEFAULT_MAX_PARALLELISM, 3, subtask)


@pytest.mark.asyncio
@pytest.mark.parametrize("drain", [False, True], ids=["no-drain", "drain"])
async def test_stop_with_savepoint_snapshots_pending_requests_or_drains_them(
    tmp_path: Path, drain: bool
) -> None:
    """Without drain the pending requests go into the savepoint and their results never leave
    (no record may follow the end of input); with drain the stop waits for them (FLIP-147)."""
    service = SimulatedService(enriched)
    source = ControlledSource("events")
    sink = testing.TestingSink()

    build = enrich_in_own_task(source, service.call, sink)
    master, job = await start_job_on_master(build, ONLY_TRIGGERED_CHECKPOINTS)
    service.hold()
    source.push(*range(12))
    await wait_until(lambda: service.in_flight == 12, "every request held", job)
    stop = asyncio.create_task(master.stop_with_savepoint(str(tmp_path / "sp"), drain=drain))
    if drain:
        await _steps_pass()
        assert not stop.done()  # waiting for the requests
        service.release()
    savepoint = await asyncio.wait_for(stop, WAIT_S)
    await asyncio.wait_for(job, WAIT_S)
    service.release()
    await _steps_pass()
    pending = checkpoint_list_state(Path(savepoint.path), "enrich", IN_FLIGHT_STATE)
    if drain:
        assert pending == []
        assert sink.committed == [enriched(v) for v in range(12)]
    else:
        assert [entry["value"] for entry in pending] == list(range(12))
        assert sink.written == []


class Enricher(AsyncFunction[int, Any]):
    def __init__(self, service: SimulatedService) -> None:
        self.service = service
        self.opened = False

    def open(self, ctx: RuntimeContext) -> None:
        self.opened = True

    async def invoke(self, value: int) -> Any:
        assert self.opened
        return await self.service.call(value)


class WithFallback(Enricher):
    def timeout(self, value: int) -> Any:
        return (value, "fallback")


@pytest.mark.asyncio
async def test_a_timed_out_request_calls_the_timeout_hook() -> None:
    service = SimulatedService(enriched, fail=None)
    sink = testing.TestingSink()
    never = asyncio.Event()

    async def lookup(value: int) -> Any:
        if value == 3:
            await never.wait()
        return await service.call(value)

    class Slow(WithFallback):
        async def invoke(self, value: int) -> Any:
            return await lookup(value)

    def build(job: Any) -> None:
        job.from_source(testing.TestingSource(list(range(6)))).map_async(
            Slow(service), timeout="20ms"
        ).sink_to(sink)

    async with running_job(build) as (_, job):
        await asyncio.wait_for(job, WAIT_S)
    assert sink.written == [*map(enriched, range(3)), (3, "fallback"), *map(enriched, range(4, 6))]


async def failure_of(values: Iterable[Any], fn: Any, **options: Any) -> str:
    """The message the job ``values → map_async(fn, **options) → sink`` fails with."""

    def build(job: Any) -> None:
        source = job.from_source(testing.TestingSource(list(values)))
        source.map_async(fn, **options).sink_to(testing.TestingSink())

    with pytest.raises(JobFailedError) as failure:
        await asyncio.wait_for(JobMaster(build_graph(build, None, 1)).run(), WAIT_S)
    return str(failure.value)


@pytest.mark.asyncio
async def test_a_timeout_without_hook_fails_the_task_naming_operator_subtask_and_record() -> None:
    never = asyncio.Event()

    async def lookup(value: int) -> int:
        if value == 7:
            await never.wait()
        return value

    message = await failure_of(range(10), lookup, timeout="20ms", name="lookup")
    assert "'lookup' (subtask 1/1)" in message
    assert "record 7" in message
    assert "timed out after 20ms" in message
    assert "timeout(value)" in message


@pytest.mark.asyncio
async def test_a_failed_request_fails_the_task_with_the_record_and_the_attempts() -> None:
    service = SimulatedService(fail=lambda v: ValueError("no such user") if v == 4 else None)

    retry = AsyncRetryStrategy.fixed_delay(2, "1ms")
    message = await failure_of(range(8), service.call, name="users", retry=retry)
    assert "'users' (subtask 1/1)" in message
    assert "record 4 failed after 2 attempts: ValueError: no such user" in message
    assert service.requests.count(4) == 2


@pytest.mark.asyncio
async def test_a_failed_request_restarts_the_job_by_its_restart_strategy() -> None:
    failures: list[int] = []

    async def fails_once(value: int) -> Any:
        if value == 5 and not failures:
            failures.append(value)
            raise ConnectionError("service unavailable")
        return enriched(value)

    sink = testing.TestingSink()

    def build(job: Any) -> None:
        job.from_source(testing.TestingSource(list(range(10)))).map_async(fails_once).sink_to(sink)

    config = ExecutionConfig(restart_strategy=FixedDelayRestart(1, 0))
    result = await asyncio.wait_for(JobMaster(build_graph(build, None, 1), config).run(), WAIT_S)
    assert result.attempts == 2
    assert sink.committed == [enriched(v) for v in range(10)]


@pytest.mark.asyncio
async def test_retries_with_exponential_backoff_until_the_service_answers() -> None:
    attempts: collections.Counter[int] = collections.Counter()

    async def flaky(value: int) -> Any:
        attempts[value] += 1
        if attempts[value] < 3:
            raise ConnectionError("try again")
        return enriched(value)

    strategy = AsyncRetryStrategy.exponential_backoff(
        5,
        initial_delay="1ms",
        max_delay="4ms",
        retry_on_exception=lambda e: isinstance(e, ConnectionError),
    )
    sink = testing.TestingSink()

    def build(job: Any) -> None:
        job.from_source(testing.TestingSource(list(range(5)))).map_async(
            flaky, retry=strategy
        ).sink_to(sink)

    async with running_job(build) as (_, job):
        await asyncio.wait_for(job, WAIT_S)
    assert sink.written == [enriched(v) for v in range(5)]
    assert attempts == {v: 3 for v in range(5)}
    assert [strategy.delay_ms(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]


@pytest.mark.asyncio
async def test_retry_on_result_emits_the_last_result_when_attempts_run_out() -> None:
    calls: collections.Counter[int] = collections.Counter()

    async def lookup(value: int) -> Any:
        calls[value] += 1
        return None if value % 2 else value

    strategy = AsyncRetryStrategy.fixed_delay(3, 0, retry_on_result=lambda r: r is None)
    sink = testing.TestingSink()

    def build(job: Any) -> None:
        job.from_source(testing.TestingSource([1, 2])).map_async(lookup, retry=strategy).sink_to(
            sink
        )

    async with running_job(build) as (_, job):
        await asyncio.wait_for(job, WAIT_S)
    assert sink.written == [None, 2]
    assert calls == {1: 3, 2: 1}


KEY_GATES: dict[str, asyncio.Event] = {}
KEY_STARTED: list[tuple[str, int]] = []
"""What :class:`CountPerKey` awaits per key (module-level: each subtask gets a deep copy of a
rich function, and a copy of an event would never be set)."""


class CountPerKey(AsyncFunction[tuple[str, int], Any]):
    """Reads and writes keyed state before and after awaiting, while other keys interleave."""

    def open(self, ctx: RuntimeContext) -> None:
        self.count = ctx.get_state(ValueStateDescriptor("count", default=0))

    async def invoke(self, value: tuple[str, int]) -> Any:
        key, n = value
        before = self.count.value()
        self.count.update(before + 1)
        KEY_STARTED.append(value)
        await KEY_GATES[key].wait()
        after = self.count.value()
        self.count.update(after + 10)
        return (key, n, before, after)


@pytest.mark.asyncio
async def test_keyed_variant_sees_its_own_keys_state_after_the_await() -> None:
    gates = {"x": asyncio.Event(), "y": asyncio.Event()}
    KEY_GATES.clear()
    KEY_GATES.update(gates)
    KEY_STARTED.clear()
    sink = testing.TestingSink()
    source = ControlledSource("keys")

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .key_by(lambda v: v[0])
            .map_async(CountPerKey(), ordered=False)
            .sink_to(sink)
        )

    async with running_job(build) as (_, job):
        source.push(("x", 1), ("y", 1), ("x", 2), ("y", 2))
        await wait_until(lambda: len(KEY_STARTED) == 4, "every request awaiting", job)
        gates["y"].set()
        await wait_until(lambda: len(sink.written) == 2, "y's results", job)
        gates["x"].set()
        source.end()
        await asyncio.wait_for(job, WAIT_S)
    by_key = sorted(sink.written)
    # Both requests of a key ran their first half before either awaited; each saw its key's
    # count only (1 + 1 before, then +10 each after).
    assert by_key == [("x", 1, 0, 2), ("x", 2, 1, 12), ("y", 1, 0, 2), ("y", 2, 1, 12)]


@pytest.mark.asyncio
async def test_end_of_input_waits_for_pending_requests_before_finish() -> None:
    service = SimulatedService(enriched)
    service.hold()
    sink = testing.TestingSink()

    def build(job: Any) -> None:
        (
            job.from_source(testing.TestingSource(list(range(30))))
            .map_async(service.call, capacity=100)
            .disable_chaining()
            .sink_to(sink)
        )

    master = JobMaster(build_graph(build, None, 1), ExecutionConfig())
    job = asyncio.create_task(master.run())
    await wait_until(lambda: service.in_flight == 30, "every request held", job)
    await _steps_pass()
    assert sink.written == []
    assert all(t.state is TaskState.RUNNING for t in master.tasks if not t.is_source)
    service.release()
    await asyncio.wait_for(job, WAIT_S)
    assert sink.committed == [enriched(v) for v in range(30)]


def test_map_async_refuses_what_is_not_async_and_bad_options() -> None:
    from runtime import Job

    job = Job()
    stream = job.from_source(testing.TestingSource([1]))
    with pytest.raises(JobDefinitionError, match=r"not an async def function.*use map\(\)"):
        stream.map_async(lambda v: v)

    class AsyncHook(Enricher):
        async def timeout(self, value: int) -> Any:  # type: ignore[override]
            return value

    with pytest.raises(JobDefinitionError, match=r"AsyncHook.timeout is an async function"):
        stream.map_async(AsyncHook(SimulatedService()))
    with pytest.raises(JobDefinitionError, match="capacity must be an int >= 1"):
        stream.map_async(SimulatedService().call, capacity=0)
    with pytest.raises(JobDefinitionError, match="needs a unit"):
        stream.map_async(SimulatedService().call, timeout="5")
    with pytest.raises(JobDefinitionError, match="AsyncRetryStrategy"):
        stream.map_async(SimulatedService().call, retry=3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# The example, and a crash through the CLI


@pytest.mark.parametrize(
    "where", [[], ["-p", "2", "--taskmanagers", "2"]], ids=["one-process", "two-taskmanagers"]
)
def test_the_async_enrichment_example_enriches_every_event(where: list[str]) -> None:
    proc = run_cli("run", str(EXAMPLE), *where, "--no-progress", "--rest-port", "-1")
    assert proc.returncode == 0, proc.stderr
    lines = [line.partition("{")[1] + line.partition("{")[2] for line in proc.stdout.splitlines()]
    printed = [orjson.loads(line) for line in lines if line]  # without the "N> " of a subtask
    events = [orjson.loads(line) for line in EVENTS.read_bytes().splitlines() if line.strip()]
    inputs = [{k: e[k] for k in events[0]} for e in printed]
    if where:
        assert sorted(inputs, key=lambda e: e["ts"]) == sorted(events, key=lambda e: e["ts"])
    else:
        assert inputs == events  # all, in input order
    assert {e["tier"] for e in printed} <= {"bronze", "silver", "gold"}
    assert len({e["tier"] for e in printed}) == 3


@pytest.mark.slow
def test_sigkill_with_requests_in_flight_then_restore_enriches_every_event_once(
    tmp_path: Path,
) -> None:
    """The job is killed while its latest checkpoint holds requests in flight; the restore
    re-issues them. The committed output holds every event once; the service was asked about
    those events twice (calls are at least once, by design: their answers were lost with the
    process)."""
    out, chk, calls = tmp_path / "out", tmp_path / "chk", tmp_path / "calls.txt"
    args = [
        "run",
        str(EXAMPLE),
        *set_args(output=out, rate=600, latency="50ms", calls=calls),
        *checkpointed_run_args(chk),
    ]
    stderr = tmp_path / "stderr-1.txt"

    def in_flight_in_latest() -> list[Any]:
        latest = max_completed(chk)
        if not latest:
            return []
        pending = checkpoint_list_state(chk / f"chk-{latest}", "profile-lookup", IN_FLIGHT_STATE)
        return pending if committed_output_checkpoints(out) else []

    pending = kill_when(in_flight_in_latest, "a checkpoint with requests in flight",
                        start_cli(stderr, *args), stderr)  # fmt: skip
    final = run_cli(*args)
    assert final.returncode == 0, final.stderr
    assert re.search(r"restoring checkpoint \d+ from ", final.stderr), final.stderr

    events = [orjson.loads(line) for line in EVENTS.read_bytes().splitlines() if line.strip()]
    committed = [orjson.loads(line) for path in committed_files(out)
                 for line in path.read_bytes().splitlines() if line.strip()]  # fmt: skip
    assert collections.Counter(e["ts"] for e in committed) == collections.Counter(
        e["ts"] for e in events
    )
    assert all(e["tier"] in {"bronze", "silver", "gold"} for e in committed)
    asked = collections.Counter(int(line) for line in calls.read_text().split())
    assert all(asked[entry["value"]["ts"]] >= 2 for entry in pending)
