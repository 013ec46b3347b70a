"""Credit-based flow control: bounded memory per channel, backpressure to the sender, order.

The unit tests drive ``actors.network`` directly: a producer coroutine awaits
``ResultSubpartition.add_buffer`` in a loop, and the test plays a consumer that takes one buffer per
step (``gate.poll_next()`` then ``channel.recycle()``) only when it chooses to. Between steps the
event loop is stepped with ``asyncio.sleep(0)`` a bounded number of times, and the credit invariants
are checked on every iteration.

The end-to-end test runs a real job (collection source -> map -> a sink the test holds) through the
``JobMaster`` and measures how far the source got while the sink was held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from channel_helpers import gate_credit_invariants
from loop_helpers import wait_until

from actors.events import CheckpointBarrier, EndOfData, EndOfPartition, Watermark
from actors.mailbox import Wakeup
from actors.network import Buffer, InputChannel, InputGate, ResultSubpartition
from actors.task import TaskState
from connectors import CollectionSource, CollectSink
from runtime import ExecutionConfig, JobFailedError, Sink, SinkWriter, run_job_async
from runtime.api.functions import RuntimeContext
from runtime.master.jobmaster import JobMaster, JobResult
from runtime.shell.runner import build_graph

STEPS = 200
"""Loop iterations that are plenty for every coroutine to run until it blocks again."""


async def settle(check: Callable[[], None] | None = None, steps: int = STEPS) -> None:
    """Step the event loop ``steps`` times, running ``check`` before every step."""
    for _ in range(steps):
        if check is not None:
            check()
        await asyncio.sleep(0)
    if check is not None:
        check()


class Producer:
    """Adds ``count`` buffers (``Buffer([i])``) to ``sub``; ``produced`` counts returned adds."""

    def __init__(self, sub: ResultSubpartition, count: int, events: dict[int, Any] | None = None):
        self.sub = sub
        self.count = count
        self.events = events or {}
        self.produced = 0
        self.sent_order: list[Any] = []
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Producer:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        for i in range(self.count):
            await self.sub.add_buffer(Buffer([i]))
            self.produced += 1
            self.sent_order.append(i)
            event = self.events.get(i)
            if event is not None:
                self.sub.add_event(event)
                self.sent_order.append(event)

    async def stop(self) -> None:
        assert self.task is not None
        if not self.task.done():
            self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


def one_channel(
    exclusive: int, floating: int, sender_queue: int
) -> tuple[ResultSubpartition, InputGate, InputChannel]:
    sub = ResultSubpartition("sender (1/1)", max_queued_buffers=sender_queue)
    gate = InputGate("receiver (1/1)", Wakeup(), floating_buffers=floating)
    channel = gate.add_channel(sub, exclusive_credits=exclusive)
    gate.open()
    return sub, gate, channel


def credit_invariants(subs: list[ResultSubpartition], gate: InputGate) -> Callable[[], None]:
    """The module docstring's invariants, checked for every channel of ``gate``, and the bound of
    every sender's own queue."""
    gate_check = gate_credit_invariants(gate)

    def check() -> None:
        gate_check()
        for sub in subs:
            assert sub.queued_buffers <= sub.max_queued_buffers, sub.statistics()

    return check


def consume_one(gate: InputGate) -> tuple[InputChannel, Any]:
    """Take the next item; recycle it at once if it is a buffer (the task finished with it)."""
    polled = gate.poll_next()
    assert polled is not None, "the consumer expected an item but the gate had none"
    channel, item = polled
    if type(item) is Buffer:
        channel.recycle()
    return channel, item


# ------------------------------------------------------------------------------------------------
# memory bound and backpressure


@pytest.mark.asyncio
async def test_fast_producer_is_held_back_by_slow_consumer_within_credits() -> None:
    exclusive, floating, sender_queue = 2, 3, 2
    sub, gate, channel = one_channel(exclusive, floating, sender_queue)
    check = credit_invariants([sub], gate)
    producer = Producer(sub, count=1000).start()
    consumed: list[int] = []
    try:
        await settle(check)
        # Nothing consumed yet: the producer got as far as credits plus its own queue allow.
        assert not producer.task.done()  # type: ignore[union-attr]
        assert 0 < producer.produced <= exclusive + floating + sender_queue
        blocked_at = producer.produced
        await settle(check)
        assert producer.produced == blocked_at, "the producer advanced with nobody consuming"
        assert sub.backpressure_waits >= 1

        for step in range(300):
            _, item = consume_one(gate)
            assert type(item) is Buffer
            consumed.extend(item.values)
            await settle(check, steps=20)
            # Every produced buffer is consumed, at the receiver, or in the sender's queue.
            assert producer.produced == len(consumed) + channel.queued_buffers + sub.queued_buffers
            assert producer.produced <= len(consumed) + channel.credits + sender_queue, step
            assert channel.queued_buffers <= channel.credits
        assert channel.peak_queued_buffers <= exclusive + floating
        # The producer is still far from done: it only ever ran ahead by the bound.
        assert producer.produced < 300 + exclusive + floating + sender_queue + 1
        assert consumed == list(range(300))
    finally:
        await producer.stop()


@pytest.mark.asyncio
async def test_floating_buffers_are_lent_on_backlog_and_returned() -> None:
    exclusive, floating, sender_queue = 1, 3, 4
    sub, gate, channel = one_channel(exclusive, floating, sender_queue)
    check = credit_invariants([sub], gate)
    producer = Producer(sub, count=40).start()
    consumed: list[int] = []
    most_held = 0
    await settle(check)
    # Only the exclusive credit was announced; the backlog behind the first buffer was 0.
    assert channel.queued_buffers == exclusive
    assert channel.floating_held == 0
    while len(consumed) < 40:
        _, item = consume_one(gate)
        consumed.extend(item.values)
        await settle(check, steps=20)
        most_held = max(most_held, channel.floating_held)
    await producer.task  # type: ignore[misc]
    assert consumed == list(range(40))
    # The sender's backlog made the receiver borrow floating buffers...
    assert most_held == floating
    assert channel.peak_queued_buffers == exclusive + floating
    # ...and with the backlog gone every borrowed buffer went back to the pool.
    assert channel.floating_held == 0
    assert gate.floating_available == floating
    assert channel.queued_buffers == 0
    assert sub.credit == exclusive


@pytest.mark.asyncio
async def test_floating_buffer_returned_by_one_channel_is_lent_to_another_with_backlog() -> None:
    gate = InputGate("receiver (1/1)", Wakeup(), floating_buffers=1)
    subs = [ResultSubpartition(f"sender ({i + 1}/2)", max_queued_buffers=4) for i in range(2)]
    channels = [gate.add_channel(s, exclusive_credits=1) for s in subs]
    gate.open()
    check = credit_invariants(subs, gate)
    short = Producer(subs[0], count=6).start()
    long = Producer(subs[1], count=30).start()
    held_by: list[set[int]] = []
    per_channel: dict[int, list[int]] = {0: [], 1: []}
    await settle(check)
    while len(per_channel[0]) + len(per_channel[1]) < 36:
        ch, item = consume_one(gate)
        per_channel[ch.index].extend(item.values)
        await settle(check, steps=20)
        held_by.append({c.index for c in channels if c.floating_held})
    await short.task  # type: ignore[misc]
    await long.task  # type: ignore[misc]
    assert per_channel == {0: list(range(6)), 1: list(range(30))}
    first_holder = next(i for i, h in enumerate(held_by) if h)
    assert held_by[first_holder] == {0} or held_by[first_holder] == {1}
    # The single floating buffer served both channels at different times, never both at once.
    assert any(h == {0} for h in held_by) and any(h == {1} for h in held_by), held_by
    assert all(len(h) <= 1 for h in held_by)
    assert gate.floating_available == 1
    assert all(c.floating_held == 0 for c in channels)


# ------------------------------------------------------------------------------------------------
# order


@pytest.mark.asyncio
async def test_events_keep_their_position_between_buffers_when_credit_runs_out() -> None:
    sub, gate, channel = one_channel(exclusive=1, floating=0, sender_queue=100)
    sent: list[Any] = []
    # B0 E0 B1 E1 B2 E2 ... with one credit: B1 waits for credit and E1 must wait behind it.
    for i in range(5):
        await sub.add_buffer(Buffer([i]))
        sent.append(i)
        event = Watermark(i * 10) if i % 2 == 0 else CheckpointBarrier(i, 0)
        sub.add_event(event)
        sent.append(event)
    sub.add_event(EndOfData(drain=True))
    sent.append(EndOfData(drain=True))
    sub.add_event(EndOfPartition())
    sent.append(EndOfPartition())

    # Only B0 had credit; E0 came right behind it and needs none; E1 must not overtake B1.
    first = gate.poll_next()
    assert first is not None and isinstance(first[1], Buffer) and first[1].values == [0]
    second = gate.poll_next()
    assert second is not None and second[1] == Watermark(0)
    assert gate.poll_next() is None, "an event overtook a buffer that was waiting for credit"
    assert sub.queued_buffers == 4

    received: list[Any] = [0, Watermark(0)]
    in_hand: InputChannel | None = first[0]
    while in_hand is not None:
        # The single credit comes back only now: exactly the next buffer follows, then the events
        # that were added behind it, never the buffer after it.
        in_hand.recycle()
        in_hand = None
        while (polled := gate.poll_next()) is not None:
            ch, item = polled
            if type(item) is Buffer:
                assert in_hand is None, "a second buffer arrived without credit"
                received.extend(item.values)
                in_hand = ch
            else:
                received.append(item)
    assert received == sent
    assert channel.ended
    assert channel.queued_buffers == 0


@pytest.mark.asyncio
async def test_per_channel_order_and_event_interleaving_with_concurrent_producers() -> None:
    gate = InputGate("receiver (1/1)", Wakeup(), floating_buffers=2)
    subs = [ResultSubpartition(f"sender ({i + 1}/3)", max_queued_buffers=2) for i in range(3)]
    for sub in subs:
        gate.add_channel(sub, exclusive_credits=1)
    gate.open()
    check = credit_invariants(subs, gate)
    producers = [
        Producer(
            sub,
            count=60 + 20 * n,
            events={i: Watermark(1000 * n + i) for i in range(0, 60 + 20 * n, 7 + n)},
        ).start()
        for n, sub in enumerate(subs)
    ]
    received: dict[int, list[Any]] = {0: [], 1: [], 2: []}
    total = sum(len(p.events) + p.count for p in producers)
    count = 0
    while count < total:
        await settle(check, steps=5)
        polled = gate.poll_next()
        if polled is None:
            continue
        ch, item = polled
        if type(item) is Buffer:
            received[ch.index].extend(item.values)
            ch.recycle()
        else:
            received[ch.index].append(item)
        count += 1
    for producer in producers:
        await producer.task  # type: ignore[misc]
    for index, producer in enumerate(producers):
        assert received[index] == producer.sent_order


# ------------------------------------------------------------------------------------------------
# end to end: a real job with a held sink


class HeldSink(Sink):
    """Each ``write`` waits for a permit the test hands out (or for ``release_all``)."""

    def __init__(self) -> None:
        self.permits = asyncio.Semaphore(0)
        self.unlimited = False
        self.waiting = 0
        self.written: list[Any] = []

    def name(self) -> str:
        return "Held"

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        return _HeldWriter(self)

    def allow(self, writes: int) -> None:
        for _ in range(writes):
            self.permits.release()

    def release_all(self) -> None:
        self.unlimited = True
        self.permits.release()


class _HeldWriter(SinkWriter):
    def __init__(self, sink: HeldSink) -> None:
        self.sink = sink

    async def write(self, values: list[Any]) -> None:
        sink = self.sink
        if not sink.unlimited:
            sink.waiting += 1
            try:
                await sink.permits.acquire()
            finally:
                sink.waiting -= 1
            if sink.unlimited:
                sink.permits.release()  # wake the next waiter too
        sink.written.extend(values)


@pytest.mark.asyncio
async def test_held_sink_bounds_what_the_source_emits_in_a_real_job() -> None:
    n = 50_000
    buffer_size, exclusive, floating = 100, 2, 2
    sender_queue = 2  # DEFAULT_SENDER_QUEUE of every ResultSubpartition the master deploys
    source_batch = 1024  # records per SourceReader.poll
    sink = HeldSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(range(n)))
            .uid("source")
            .map(lambda x: x * 2, name="double")
            .uid("double")
            .sink_to(sink, name="held sink")
            .uid("held-sink")
            .disable_chaining()
        )

    config = ExecutionConfig(
        buffer_size=buffer_size, exclusive_credits=exclusive, floating_buffers=floating
    )
    master = JobMaster(build_graph(build), config)
    job: asyncio.Task[JobResult] = asyncio.create_task(master.run())
    try:
        await wait_until(lambda: len(master.tasks) == 2, "deployment", job)
        source_task = next(t for t in master.tasks if t.vertex_id == "source")
        sink_task = next(t for t in master.tasks if t.vertex_id == "held-sink")
        assert [op.uid for op in source_task.operators] == ["source", "double"]
        source_op = source_task.operators[0]
        assert sink_task.gate is not None
        channel = sink_task.gate.channels[0]
        subpartition = source_task.writers[0].subpartitions[0]
        bound = source_batch + buffer_size + (sender_queue + exclusive + floating) * buffer_size

        def records_in_flight() -> int:
            return source_op.metrics.records_out - len(sink.written)

        await wait_until(
            lambda: sink.waiting == 1 and subpartition.backpressure_waits > 0,
            "the sink to hold a buffer and the source to wait for room",
            job,
        )
        emitted_when_blocked = source_op.metrics.records_out
        await settle(steps=500)
        assert source_op.metrics.records_out == emitted_when_blocked, "source ran on while held"
        assert records_in_flight() <= bound
        assert emitted_when_blocked < n // 10
        assert channel.peak_queued_buffers <= exclusive + floating
        assert source_task.state is TaskState.RUNNING

        # Let the sink take a few buffers at a time; the source follows, never further than bound.
        for _ in range(20):
            sink.allow(3)
            await settle(steps=100)
            assert records_in_flight() <= bound
            assert channel.peak_queued_buffers <= exclusive + floating
            assert channel.queued_buffers <= channel.credits
        assert 0 < len(sink.written) <= 60 * buffer_size
        assert source_op.metrics.records_out < n // 5

        sink.release_all()
        result = await asyncio.wait_for(job, 30)
    finally:
        if not job.done():
            job.cancel()
            try:
                await job
            except (asyncio.CancelledError, Exception):
                pass
    assert sink.written == [2 * x for x in range(n)]
    assert channel.peak_queued_buffers <= exclusive + floating
    summaries = {s.uid: s for s in result.operators}
    assert summaries["source"].records_out == n
    assert summaries["held-sink"].records_in == n


@pytest.mark.asyncio
@pytest.mark.parametrize(("exclusive", "floating"), [(0, 4)])
async def test_channel_without_exclusive_credit_runs_or_is_rejected(
    exclusive: int, floating: int
) -> None:
    """A configuration the protocol cannot serve must be refused up front, not hang the job: with
    no exclusive credit the sender never sends a first buffer, so the receiver never learns of a
    backlog to lend floating buffers for."""
    sink = CollectSink()

    def build(job: Any) -> None:
        job.from_source(CollectionSource(range(100))).rebalance().map(lambda x: x).sink_to(sink)

    config = ExecutionConfig(buffer_size=10, exclusive_credits=exclusive, floating_buffers=floating)
    rejection: BaseException | None = None
    try:
        # A 100-record job takes milliseconds; one second only bounds a deadlock.
        await asyncio.wait_for(run_job_async(build, config=config), 1)
    except (ValueError, JobFailedError) as exc:
        rejection = exc
    except TimeoutError:
        pytest.fail(
            f"exclusive_credits={exclusive}, floating_buffers={floating}: the job deadlocked "
            "instead of running or being rejected"
        )
    if rejection is not None:
        assert "credit" in str(rejection)
    else:
        assert sorted(sink.results) == list(range(100))
