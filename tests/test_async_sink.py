"""Async sinks (``AsyncSink`` of ``AsyncSinkWriter``\\ s) against a fake service that counts the
requests in flight: batches hold at most ``max_batch_size`` records, at most ``max_in_flight``
requests run at once (and a held service holds the input back), a batch not full goes out after
``max_batch_time``, a checkpoint completes only once everything before its barrier was written,
a failed write fails the job naming the sink, and across a failure and restore every record is
written at least once.
"""

from __future__ import annotations

import asyncio
import random
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

from actors.writer import DEFAULT_BUFFER_SIZE
from runtime import (
    AsyncSink,
    AsyncSinkWriter,
    ExecutionConfig,
    JobFailedError,
    RuntimeContext,
    run_job,
)
from runtime.master.jobmaster import JobMaster
from runtime.master.restart import FixedDelayRestart
from runtime.plan.jobfile import build_graph


class FakeService:
    """Takes batches like a remote service. Each request waits for a random few event-loop
    turns (``latency``), or until the test releases it (``held``); ``fail_next`` makes the next
    request raise. Counts the requests in flight and the most there ever were."""

    def __init__(self, seed: int = 0, latency: int = 5) -> None:
        self.rng = random.Random(seed)
        self.latency = latency
        self.in_flight = 0
        self.most_in_flight = 0
        self.batches: list[list[Any]] = []
        self.held: asyncio.Event | None = None
        self.fail_next = False

    @property
    def written(self) -> list[Any]:
        return [record for batch in self.batches for record in batch]

    async def call(self, batch: list[Any]) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.fail_next:
                self.fail_next = False
                msg = "the service refused the request"
                raise ConnectionError(msg)
            if self.held is not None:
                await self.held.wait()
            for _ in range(self.rng.randrange(self.latency + 1)):
                await asyncio.sleep(0)
            self.batches.append(list(batch))
        finally:
            self.in_flight -= 1


def writer_of(service: FakeService) -> Any:
    class ServiceWriter(AsyncSinkWriter):
        def __init__(self, context: RuntimeContext) -> None:
            self.subtask = context.subtask_index

        async def write(self, batch: list[Any]) -> None:
            await service.call(batch)

    return ServiceWriter


def sink_job(source: Any, sink: AsyncSink, parallelism: int = 1) -> Any:
    def build(job: Any) -> None:
        job.from_source(source).uid("source").set_parallelism(1).rebalance().sink_to(
            sink
        ).set_parallelism(parallelism).uid("sink")

    return build


@pytest.mark.parametrize(("max_in_flight", "parallelism"), [(1, 1), (4, 1), (3, 2)])
def test_batches_are_bounded_and_at_most_max_in_flight_run_at_once(
    max_in_flight: int, parallelism: int
) -> None:
    records = list(range(2000))
    service = FakeService(seed=max_in_flight)
    sink = AsyncSink(writer_of(service), max_batch_size=7, max_in_flight=max_in_flight)
    run_job(sink_job(ended_source("numbers", records), sink, parallelism))
    assert sorted(service.written) == records
    assert max(len(batch) for batch in service.batches) == 7
    # Requests did overlap, up to the bound of each subtask, never more.
    assert service.most_in_flight == max_in_flight * parallelism


@pytest.mark.asyncio
async def test_a_held_service_holds_the_input_back() -> None:
    """With every request held, the sink takes no more input than its bound allows; the source
    waits (backpressure), and everything goes out once the service answers."""
    service = FakeService()
    service.held = asyncio.Event()
    source = ControlledSource("numbers")
    sink = AsyncSink(writer_of(service), max_batch_size=10, max_in_flight=2, max_batch_time="1h")
    records = list(range(50_000))
    async with running_job(sink_job(source, sink)) as (master, job):
        source.push(*records)
        await wait_until(lambda: service.in_flight == 2, "two requests in flight", job)
        for _ in range(200):
            await asyncio.sleep(0)
        # The sink waits inside the one buffer it took: the rest waits in the channel and the
        # source (which has credit for a few buffers only).
        assert service.in_flight == 2
        assert operator_metric(master, "sink", "records_in") == DEFAULT_BUFFER_SIZE
        assert operator_metric(master, "source", "records_out") < len(records) // 4
        service.held.set()
        source.end()
        await job
    assert sorted(service.written) == records


@pytest.mark.asyncio
async def test_a_batch_that_is_not_full_goes_out_after_max_batch_time() -> None:
    from runtime.testing import ManualClock

    clock = ManualClock(1_000)
    service = FakeService()
    source = ControlledSource("numbers")
    sink = AsyncSink(writer_of(service), max_batch_size=100, max_batch_time="500ms")
    async with running_job(sink_job(source, sink), config=ExecutionConfig(clock=clock)) as (
        master,
        job,
    ):
        source.push(1, 2, 3)
        await wait_until(lambda: operator_metric(master, "sink", "records_in") == 3, "3", job)
        clock.advance(499)
        for _ in range(100):
            await asyncio.sleep(0)
        assert service.batches == []
        clock.advance(1)
        await wait_until(lambda: service.batches == [[1, 2, 3]], "the batch sent", job)
        source.end()
        await job


@pytest.mark.asyncio
async def test_a_checkpoint_completes_only_once_everything_before_its_barrier_was_written() -> None:
    service = FakeService()
    service.held = asyncio.Event()
    source = ControlledSource("numbers")
    sink = AsyncSink(writer_of(service), max_batch_size=10, max_in_flight=3, max_batch_time="1h")
    async with running_job(sink_job(source, sink)) as (master, job):
        source.push(*range(25))
        # Two full batches in flight (held), five records buffered.
        await wait_until(lambda: operator_metric(master, "sink", "records_in") == 25, "25", job)
        await wait_until(lambda: service.in_flight == 2, "two requests", job)
        trigger = asyncio.ensure_future(take_checkpoint(master))
        written_at_completion: list[list[Any]] = []
        trigger.add_done_callback(lambda _: written_at_completion.append(service.written))
        # The snapshot flushes: the buffered five go out too, and it waits for all three.
        await wait_until(lambda: service.in_flight == 3, "the flush", job)
        for _ in range(200):
            await asyncio.sleep(0)
        assert not trigger.done()
        service.held.set()
        await trigger
        assert sorted(written_at_completion[0]) == list(range(25))
        source.end()
        await job


def test_a_failed_write_fails_the_job_naming_the_sink_and_the_batch() -> None:
    service = FakeService()
    service.fail_next = True
    sink = AsyncSink(writer_of(service), max_batch_size=4, name="orders-api")
    with pytest.raises(JobFailedError) as failure:
        run_job(sink_job(ended_source("numbers", list(range(10))), sink))
    message = str(failure.value)
    assert "async sink 'orders-api': write() of a batch of 4 records failed" in message
    assert "ConnectionError: the service refused the request" in message
    assert "subtask 1/1" in message


def test_a_writer_factory_that_makes_no_async_writer_is_refused() -> None:
    class Blocking(AsyncSinkWriter):
        def __init__(self, context: RuntimeContext) -> None:
            pass

        def write(self, batch: list[Any]) -> None:  # type: ignore[override]
            pass

    with pytest.raises(TypeError, match=r"Blocking.write must be an async def"):
        AsyncSink(Blocking)
    # A factory function is only called in the subtask: the task fails saying the same.
    with pytest.raises(JobFailedError, match=r"Blocking.write must be an async def"):
        run_job(sink_job(ended_source("numbers", [1]), AsyncSink(lambda ctx: Blocking(ctx))))
    with pytest.raises(JobFailedError, match=r"made a int, not an AsyncSinkWriter"):
        run_job(sink_job(ended_source("numbers", [1]), AsyncSink(lambda ctx: 42)))  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="max_in_flight must be an int >= 1"):
        AsyncSink(writer_of(FakeService()), max_in_flight=0)


@pytest.mark.asyncio
async def test_every_record_is_written_at_least_once_across_a_failure_and_restore() -> None:
    """A checkpoint with records still buffered, then a write fails: the job restarts from the
    checkpoint, which holds no record, so the buffered ones must have been written by then."""
    service = FakeService()
    source = ControlledSource("numbers")
    sink = AsyncSink(writer_of(service), max_batch_size=10, max_in_flight=2, max_batch_time="1h")
    config = ExecutionConfig(restart_strategy=FixedDelayRestart(3, 0))
    graph = build_graph(sink_job(source, sink), None, 1)
    master = JobMaster(graph, config)
    job = asyncio.create_task(master.run())
    try:
        source.push(*range(95))
        await wait_until(lambda: operator_metric(master, "sink", "records_in") == 95, "95", job)
        await take_checkpoint(master)
        assert sorted(service.written) == list(range(95))
        service.fail_next = True
        source.push(*range(95, 200))
        source.end()
        result = await asyncio.wait_for(job, 30)
    finally:
        if not job.done():
            job.cancel()
    assert result.attempts == 2
    # At least once: all of them; those of the failed attempt's batches after the checkpoint
    # may be written twice.
    assert set(service.written) == set(range(200))
    assert len(service.written) >= 200
