"""Credit-based channels between processes (``actors.remote``): real TCP sockets on 127.0.0.1.

Two kinds of tests: both planes in the test process (one event loop, real sockets between them),
and a child process (``tests/remote_peer.py``, on uvloop) as one end of a channel, for what must
be measured across processes: backpressure, and the death of a peer. Waiting is on conditions: a
consumer sleeps on its gate's wake-up as a task does, the child's state arrives as lines on its
stdout, and every wait has a deadline only to bound a failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import pytest
import pytest_asyncio
from channel_helpers import (
    WAIT_S,
    check_at_every_buffer,
    gate_credit_invariants,
    take,
    take_and_recycle,
)
from cli_helpers import ROOT
from loop_helpers import wait_until
from remote_peer import CHANNEL, LAST_EVENTS, RECEIVER_NAME, SENDER_NAME

from actors.events import (
    END_OF_PARTITION,
    WATERMARK_ACTIVE,
    WATERMARK_IDLE,
    CancelCheckpointMarker,
    CheckpointBarrier,
    EndOfData,
    EndOfPartition,
    Watermark,
)
from actors.mailbox import Wakeup
from actors.network import Buffer, InputChannel, InputGate, ResultSubpartition
from actors.partitioner import BroadcastPartitioner, ForwardPartitioner
from actors.remote import (
    BUFFER,
    EVENT,
    HELLO,
    ChannelId,
    DataPlane,
    OutgoingChannel,
    RecordEncodingError,
    RemoteChannelError,
    RemoteSender,
)
from actors.wire import decode_message, encode_message, frame
from actors.writer import RecordWriter
from state.serde import packb
from state.storage import CheckpointKind

PEER_SCRIPT = ROOT / "tests" / "remote_peer.py"


@pytest_asyncio.fixture
async def planes() -> AsyncIterator[tuple[DataPlane, DataPlane]]:
    """Two started planes in this process; closed at the end."""
    first, second = DataPlane(), DataPlane()
    await first.start()
    await second.start()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


class RemoteChannel(NamedTuple):
    sub: ResultSubpartition
    out: OutgoingChannel
    gate: InputGate
    channel: InputChannel


def remote_channel(
    sender_plane: DataPlane,
    receiver_plane: DataPlane,
    channel_id: ChannelId,
    *,
    exclusive: int = 2,
    floating: int = 2,
    sender_queue: int = 2,
) -> RemoteChannel:
    """A subpartition on ``sender_plane``'s side bound to an input channel on the other side."""
    sub = ResultSubpartition(f"sender ({channel_id.sender + 1}/2)", sender_queue)
    gate = InputGate(f"receiver ({channel_id.receiver + 1}/2)", Wakeup(), floating)
    out = sender_plane.outgoing(channel_id, *receiver_plane.address, sub, gate.owner)
    channel = receiver_plane.incoming(
        channel_id, *sender_plane.address, gate, exclusive, description=sub.name
    )
    return RemoteChannel(sub, out, gate, channel)


def nothing_in_flight(remote: RemoteChannel) -> bool:
    """Every credit announced reached the sender, every buffer sent reached the receiver."""
    sender = mirror(remote.channel)
    return (
        remote.out.credit_received == sender.credit_announced
        and remote.sub.buffers_sent == sender.buffers_received
    )


def mirror(channel: InputChannel) -> RemoteSender:
    sender = channel.sender
    assert isinstance(sender, RemoteSender)
    return sender


async def produce(sub: ResultSubpartition, items: list[Any]) -> None:
    for item in items:
        if type(item) is Buffer:
            await sub.add_buffer(item)
        else:
            sub.add_event(item)


def as_sequence(items: list[Any]) -> list[Any]:
    """Buffers as (values, timestamps), events as themselves: comparable across a connection."""
    return [(i.values, i.timestamps) if type(i) is Buffer else i for i in items]


# ------------------------------------------------------------------------------------------------
# credit and order over TCP, both planes in this process


@pytest.mark.asyncio
async def test_credit_invariant_holds_at_every_buffer_and_floating_buffers_cross_tcp(
    planes: tuple[DataPlane, DataPlane],
) -> None:
    sender_plane, receiver_plane = planes
    exclusive, floating, sender_queue, count = 1, 3, 4, 60
    remote = remote_channel(
        sender_plane,
        receiver_plane,
        ChannelId(0, 0, 0, 0),
        exclusive=exclusive,
        floating=floating,
        sender_queue=sender_queue,
    )
    sub, _, gate, channel = remote
    invariants = gate_credit_invariants(gate)
    most_held = 0

    def check() -> None:
        nonlocal most_held
        invariants()
        most_held = max(most_held, channel.floating_held)

    check_at_every_buffer(channel, check)
    gate.open()
    producer = asyncio.create_task(
        produce(sub, [Buffer([i]) for i in range(count)] + [END_OF_PARTITION])
    )
    consumed: list[int] = []
    try:
        while True:
            # A slow consumer: it takes the next buffer only when the sender got as far as its
            # credit allows (or finished), so that a backlog builds up.
            await wait_until(
                lambda: (nothing_in_flight(remote) and sub.credit == 0) or producer.done(),
                "the sender to use up its credit",
            )
            _, item = await take_and_recycle(gate)
            check()
            assert sub.queued_buffers <= sender_queue
            # The receiver never holds more than it granted; the sender never sent more than the
            # credit that reached it, and that is never more than the receiver announced.
            assert channel.queued_buffers <= channel.credits
            assert sub.buffers_sent <= mirror(channel).credit_announced
            if type(item) is EndOfPartition:
                break
            consumed.extend(item.values)
        await producer
    finally:
        producer.cancel()
    assert consumed == list(range(count))
    # The backlog crossed the connection: the receiver lent every floating buffer it had...
    assert most_held == floating
    assert channel.peak_queued_buffers == exclusive + floating
    # ...and got them all back when the backlog was gone.
    assert channel.floating_held == 0
    assert gate.floating_available == floating
    assert channel.queued_buffers == 0
    assert sub.buffers_sent == mirror(channel).buffers_received == count
    assert mirror(channel).credit == exclusive


@pytest.mark.asyncio
async def test_events_keep_their_place_between_buffers_and_end_of_partition_comes_last(
    planes: tuple[DataPlane, DataPlane],
) -> None:
    sender_plane, receiver_plane = planes
    # One credit and no floating buffer: every buffer after the first waits for credit, and the
    # events behind it must wait too, also on the wire.
    sub, _, gate, channel = remote_channel(
        sender_plane, receiver_plane, ChannelId(0, 2, 1, 0), exclusive=1, floating=0
    )
    sent: list[Any] = []
    events = [
        Watermark(5),
        CheckpointBarrier(7, 1_700_000_000_000),
        CancelCheckpointMarker(7),
        CheckpointBarrier(8, 1_700_000_000_001, CheckpointKind.SAVEPOINT),
        EndOfData(drain=False),
        WATERMARK_IDLE,
        WATERMARK_ACTIVE,
    ]
    for i in range(2 * len(events)):
        sent.append(Buffer([i, f"r{i}", (i, "t")], [100 + i, 200 + i, 300 + i]))
        if i % 2 == 1:
            sent.append(events[i // 2])
    sent.append(END_OF_PARTITION)
    gate.open()
    producer = asyncio.create_task(produce(sub, sent))
    received: list[Any] = []
    try:
        while not received or type(received[-1]) is not EndOfPartition:
            _, item = await take_and_recycle(gate)
            received.append(item)
        await producer
    finally:
        producer.cancel()
    assert as_sequence(received) == as_sequence(sent)
    barrier = received[received.index(events[3])]
    assert type(barrier.kind) is CheckpointKind
    assert channel.ended
    assert gate.poll_next() is None


# ------------------------------------------------------------------------------------------------
# across two processes: a slow receiver here, a fast sender in a child process


class PeerProcess:
    """``tests/remote_peer.py`` in a child process; its JSON lines read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.port = 0
        self.last: dict[str, Any] = {}
        assert proc.stderr is not None
        # Read all along, so that a chatty child never blocks on a full pipe.
        self._stderr = asyncio.create_task(proc.stderr.read())

    @classmethod
    async def start(cls, role: str, peer_port: int, *args: str) -> PeerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PEER_SCRIPT),
            role,
            "--peer-port",
            str(peer_port),
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        peer = cls(proc)
        peer.port = (await peer.next_report())["port"]
        return peer

    async def stderr(self) -> str:
        """What the child wrote to stderr (all of it once it exited)."""
        if self.proc.returncode is None:
            return "(still running)"
        return (await self._stderr).decode(errors="replace")

    async def next_report(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), WAIT_S)
        except TimeoutError:
            msg = f"the peer process reported nothing for {WAIT_S:g} s"
            raise AssertionError(msg) from None
        if not line:
            await self.proc.wait()
            msg = f"the peer process exited ({self.proc.returncode}): {await self.stderr()}"
            raise AssertionError(msg)
        self.last = json.loads(line)
        return self.last

    async def report_where(
        self,
        condition: Callable[[dict[str, Any]], bool],
        each: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any]:
        """Read reports, passing each to ``each``, until one meets ``condition``."""
        while True:
            report = await self.next_report()
            each(report)
            if condition(report):
                return report

    async def finish(self) -> None:
        """Close its stdin (it closes its plane and exits) and expect a clean exit."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        await asyncio.wait_for(self.proc.stdout.read(), WAIT_S)
        code = await asyncio.wait_for(self.proc.wait(), WAIT_S)
        stderr = await self.stderr()
        assert code == 0, stderr
        assert stderr == ""

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        await self._stderr


@pytest_asyncio.fixture
async def plane() -> AsyncIterator[DataPlane]:
    plane = DataPlane()
    await plane.start()
    try:
        yield plane
    finally:
        await plane.close()


@pytest_asyncio.fixture
async def peers() -> AsyncIterator[list[PeerProcess]]:
    """Peer processes a test started; killed at the end if the test did not finish them."""
    started: list[PeerProcess] = []
    try:
        yield started
    finally:
        for peer in started:
            await peer.kill()


@pytest.mark.asyncio
async def test_slow_receiver_holds_back_a_fast_sender_in_another_process(
    plane: DataPlane, peers: list[PeerProcess]
) -> None:
    exclusive, floating, sender_queue, count = 2, 3, 2, 120
    sender = await PeerProcess.start(
        "send", plane.port, "--buffers", str(count), "--sender-queue", str(sender_queue)
    )
    peers.append(sender)
    gate = InputGate(RECEIVER_NAME, Wakeup(), floating_buffers=floating)
    channel = plane.incoming(
        CHANNEL, "127.0.0.1", sender.port, gate, exclusive, description=SENDER_NAME
    )
    check = gate_credit_invariants(gate)
    check_at_every_buffer(channel, check)
    announced = mirror(channel)

    def within_credit(report: dict[str, Any]) -> None:
        # What the sender sent never exceeds the credit that reached it, which never exceeds what
        # this receiver announced; what it produced exceeds that by at most its own queue.
        assert report["sent"] <= report["credit_received"] <= announced.credit_announced, report
        assert report["produced"] <= report["credit_received"] + sender_queue, report
        assert report["queued"] <= sender_queue, report

    gate.open()
    # Nobody consumes: the sender gets as far as the credit (exclusive, plus the floating buffers
    # lent for the backlog it announced) and its own queue allow, and stops.
    while True:
        blocked = await sender.report_where(
            lambda r: r["blocked"] and r["credit"] == 0, within_credit
        )
        while announced.buffers_received < blocked["sent"]:
            gate.wakeup.clear()
            if not await gate.wakeup.wait(WAIT_S):
                msg = f"{blocked['sent']} buffers sent, {announced.buffers_received} arrived"
                raise AssertionError(msg)
        if announced.credit_announced == blocked["credit_received"]:
            break  # no credit on its way to the sender: it is blocked for good
    check()
    held = blocked["sent"]
    assert channel.queued_buffers == held == announced.credit_announced
    assert exclusive <= held <= exclusive + floating
    assert announced.credit == 0  # every credit spent: the sender cannot send anything more
    assert blocked["produced"] == held + sender_queue
    assert blocked["waits"] >= 1

    # Now take one buffer at a time, and only once the sender is blocked again: each buffer
    # taken frees one credit (or a floating buffer and its credit) and lets that much through.
    consumed: list[Any] = []
    events: list[Any] = []
    while True:
        channel_taken, item = await take(gate)
        check()
        if type(item) is EndOfPartition:
            break
        if type(item) is not Buffer:
            events.append(item)
            continue
        consumed.extend(item.values)
        waits = sender.last["waits"]
        channel_taken.recycle()
        check()
        if not sender.last.get("done"):
            report = await sender.report_where(
                lambda r, before=waits: r.get("done") or (r["blocked"] and r["waits"] > before),
                within_credit,
            )
            assert report["sent"] <= len(consumed) + exclusive + floating, report
    done = sender.last
    assert done.get("done"), done
    assert consumed == list(range(count))
    # Watermarks and their status cross the process boundary in place (no credit needed).
    assert tuple(events) == LAST_EVENTS
    # The sender blocked again after every buffer taken while it had more to produce.
    assert done["waits"] >= count - (exclusive + floating + sender_queue)
    assert channel.peak_queued_buffers <= exclusive + floating
    await sender.finish()
    assert plane.statistics().frames_dropped == 0
    assert gate.failure is None


# ------------------------------------------------------------------------------------------------
# the death of a peer process


async def failure_when_killed(peer: PeerProcess, task: asyncio.Task[None]) -> BaseException:
    """SIGKILL ``peer``; ``task`` (a task using a channel to it) must fail with
    ``RemoteChannelError`` within the wait, which this returns."""
    try:
        await peer.kill()
        with pytest.raises(RemoteChannelError) as failure:
            await asyncio.wait_for(task, WAIT_S)
    finally:
        task.cancel()
    return failure.value


@pytest.mark.asyncio
async def test_receiving_task_wakes_and_fails_when_the_sender_process_dies(
    plane: DataPlane, peers: list[PeerProcess]
) -> None:
    sender = await PeerProcess.start("send", plane.port, "--buffers", "1000")
    peers.append(sender)
    gate = InputGate(RECEIVER_NAME, Wakeup(), floating_buffers=2)
    plane.incoming(CHANNEL, "127.0.0.1", sender.port, gate, 2, description=SENDER_NAME)
    held: list[Any] = []

    async def slow_task() -> None:
        # A task that holds every buffer: it sleeps on its wake-up like StreamTask._idle.
        while True:
            gate.wakeup.clear()
            polled = gate.poll_next()
            if polled is None:
                await gate.wakeup.wait()
            else:
                held.append(polled[1])

    gate.open()
    _, first = await take(gate)  # the channel is live: a buffer arrived (and is held)
    assert type(first) is Buffer
    failure = await failure_when_killed(sender, asyncio.create_task(slow_task()))
    message = str(failure)
    assert f"input channel {SENDER_NAME} of {RECEIVER_NAME}" in message
    assert f"127.0.0.1:{sender.port}" in message
    assert str(CHANNEL) in message
    assert "lost" in message
    assert gate.failure is failure


@pytest.mark.asyncio
async def test_sending_task_fails_at_its_next_write_when_the_receiver_process_dies(
    plane: DataPlane, peers: list[PeerProcess]
) -> None:
    receiver = await PeerProcess.start("receive", plane.port, "--floating", "0")
    peers.append(receiver)
    sub = ResultSubpartition(SENDER_NAME, max_queued_buffers=2)
    out = plane.outgoing(CHANNEL, "127.0.0.1", receiver.port, sub, RECEIVER_NAME)
    produced = 0

    async def fast_task() -> None:
        nonlocal produced
        while True:
            await sub.add_buffer(Buffer([produced]))
            produced += 1

    task = asyncio.create_task(fast_task())
    try:
        # The receiver holds everything: its 2 credits are spent and the sender's queue is full.
        await wait_until(
            lambda: out.credit_received == 2 == sub.buffers_sent and sub.backpressure_waits > 0,
            "the sender to wait for credit",
            task,
        )
    except BaseException:
        task.cancel()
        raise
    failure = await failure_when_killed(receiver, task)
    message = str(failure)
    assert f"output channel {SENDER_NAME} -> {RECEIVER_NAME}" in message
    assert f"127.0.0.1:{receiver.port}" in message
    assert produced <= 2 + 2 + 1  # sent, queued, and the one add that woke up to the failure


# ------------------------------------------------------------------------------------------------
# channel ids: old attempts, unknown channels, one connection per pair


@pytest.mark.asyncio
async def test_frames_of_a_released_attempt_or_an_unknown_channel_are_dropped(
    planes: tuple[DataPlane, DataPlane],
) -> None:
    sender_plane, receiver_plane = planes
    old = ChannelId(attempt=1, edge=0, sender=0, receiver=0)
    new = dataclasses.replace(old, attempt=2)
    old_sub, _, old_gate, old_channel = remote_channel(sender_plane, receiver_plane, old)
    old_gate.open()
    await old_sub.add_buffer(Buffer(["old-0"]))
    _, item = await take_and_recycle(old_gate)
    assert item.values == ["old-0"]
    await wait_until(lambda: old_sub.credit == 2, "the recycled credit to come back")

    # The receiving side tears attempt 1 down and deploys attempt 2 first (its credit reaches the
    # sender before the sender has registered attempt 2: it is kept, not lost).
    receiver_plane.release(1)
    new_gate = InputGate("receiver (1/2)", Wakeup(), 2)
    new_channel = receiver_plane.incoming(
        new, *sender_plane.address, new_gate, 2, description="sender (1/2)"
    )
    new_gate.open()
    # The old sender still holds credit and sends into the void.
    await old_sub.add_buffer(Buffer(["old-1"]))
    await old_sub.add_buffer(Buffer(["old-2"]))
    old_sub.add_event(Watermark(9))
    await wait_until(
        lambda: receiver_plane.frames_dropped == 3, "the old attempt's frames to be dropped"
    )
    sender_plane.release(1)
    new_sub = ResultSubpartition("sender (1/2)")
    sender_plane.outgoing(new, *receiver_plane.address, new_sub, new_gate.owner)
    await produce(new_sub, [Buffer(["new-0"]), Buffer(["new-1"]), END_OF_PARTITION])
    received = [(await take_and_recycle(new_gate))[1] for _ in range(3)]
    assert as_sequence(received) == [(["new-0"], None), (["new-1"], None), END_OF_PARTITION]
    assert old_channel.buffers_received == 1
    assert old_gate.poll_next() is None
    assert new_channel.buffers_received == 2

    # Frames for a channel nobody registered: dropped, and the connection carries on.
    _, writer = await asyncio.open_connection(*receiver_plane.address)
    try:
        stranger = ["127.0.0.1", 1]  # lower than any plane's address: it may dial
        unknown = [9, 9, 9, 9]
        writer.write(frame(packb([HELLO, *stranger])))
        writer.write(frame(packb([BUFFER, unknown, 0, packb([["x"], None])])))
        writer.write(frame(packb([EVENT, unknown, 0, 5])))
        await wait_until(
            lambda: receiver_plane.frames_dropped == 5, "the unknown channel's frames to be dropped"
        )
        assert ("127.0.0.1", 1) in {c.peer for c in receiver_plane.statistics().connections}
    finally:
        writer.close()
        await writer.wait_closed()
    assert new_gate.failure is None and old_gate.failure is None


@pytest.mark.asyncio
async def test_one_connection_per_pair_when_both_open_channels_to_each_other_at_once(
    planes: tuple[DataPlane, DataPlane],
) -> None:
    first, second = planes
    # In one step of the loop, each side registers a channel to the other in both directions:
    # both need the connection at the same moment.
    sub_a, _, gate_a, _ = remote_channel(first, second, ChannelId(0, 0, 0, 1))
    sub_b, _, gate_b, _ = remote_channel(second, first, ChannelId(0, 1, 1, 0))
    gate_a.open()
    gate_b.open()
    await asyncio.gather(
        produce(sub_a, [Buffer(["a"]), END_OF_PARTITION]),
        produce(sub_b, [Buffer(["b"]), END_OF_PARTITION]),
    )
    assert (await take_and_recycle(gate_a))[1].values == ["a"]
    assert (await take_and_recycle(gate_b))[1].values == ["b"]
    for this, other in ((first, second), (second, first)):
        stats = this.statistics()
        assert [c.peer for c in stats.connections] == [other.address]
    lower, higher = sorted(planes, key=lambda p: p.address)
    assert (lower.connections_dialed, lower.connections_accepted) == (1, 0)
    assert (higher.connections_dialed, higher.connections_accepted) == (0, 1)


# ------------------------------------------------------------------------------------------------
# records


@dataclasses.dataclass
class Click:
    user: str
    at: int


@pytest.mark.asyncio
async def test_a_record_msgpack_cannot_hold_fails_the_sending_task_with_what_to_do(
    planes: tuple[DataPlane, DataPlane],
) -> None:
    sender_plane, receiver_plane = planes
    sub, _, gate, _ = remote_channel(sender_plane, receiver_plane, ChannelId(0, 0, 0, 0))
    writer = RecordWriter([sub], ForwardPartitioner(), buffer_size=2)
    gate.open()
    with pytest.raises(RecordEncodingError) as failure:
        await writer.emit([{"user": "u1", "at": 1}, Click("u2", 2)], None)
    message = str(failure.value)
    assert message.startswith("sender (1/2): ")
    assert "test_remote_channels.Click (a dataclass)" in message
    assert "receiver (1/2)" in message
    assert "dataclasses.asdict(record)" in message
    # Nothing of the failed buffer left the sending task.
    assert sub.queued_buffers == 0 and sub.buffers_sent == 0
    # Converted as the message says, the same records cross.
    await writer.emit([{"user": "u1", "at": 1}, dataclasses.asdict(Click("u2", 2))], None)
    _, item = await take_and_recycle(gate)
    assert item.values == [{"user": "u1", "at": 1}, {"user": "u2", "at": 2}]


@pytest.mark.asyncio
async def test_a_buffer_too_large_for_a_frame_fails_the_sending_task(
    planes: tuple[DataPlane, DataPlane], monkeypatch: pytest.MonkeyPatch
) -> None:
    sender_plane, receiver_plane = planes
    monkeypatch.setattr("actors.remote.MAX_BUFFER_BYTES", 64)
    sub, _, gate, _ = remote_channel(sender_plane, receiver_plane, ChannelId(0, 0, 0, 0))
    gate.open()
    await sub.add_buffer(Buffer(["small"]))
    with pytest.raises(RecordEncodingError, match=r"sender \(1/2\): a buffer of 2 records for "):
        await sub.add_buffer(Buffer(["x" * 40, "y" * 40]))
    _, item = await take_and_recycle(gate)
    assert item.values == ["small"]
    assert sub.buffers_sent == 1


def test_a_channel_id_is_a_wire_message() -> None:
    channel_id = ChannelId(attempt=4, edge=2, sender=1, receiver=3)
    assert decode_message(encode_message(channel_id)) == channel_id


@pytest.mark.asyncio
async def test_a_broadcast_buffer_is_encoded_once_for_all_its_channels(
    planes: tuple[DataPlane, DataPlane],
) -> None:
    sender_plane, receiver_plane = planes
    channels = [
        remote_channel(sender_plane, receiver_plane, ChannelId(0, 0, 0, r)) for r in range(3)
    ]
    writer = RecordWriter([c.sub for c in channels], BroadcastPartitioner(), buffer_size=4)
    for remote in channels:
        remote.gate.open()
    await writer.emit(list(range(8)), [10 * i for i in range(8)])
    await writer.emit([8], [80])
    await writer.flush()
    for remote in channels:
        received = [(await take_and_recycle(remote.gate))[1] for _ in range(3)]
        assert as_sequence(received) == [
            ([0, 1, 2, 3], [0, 10, 20, 30]),
            ([4, 5, 6, 7], [40, 50, 60, 70]),
            ([8], [80]),
        ]
    assert sender_plane.statistics().buffers_encoded == 3


# ------------------------------------------------------------------------------------------------
# connecting and closing


@pytest.mark.asyncio
async def test_closing_planes_after_the_channels_ended_fails_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="actors.remote")
    first, second = DataPlane(), DataPlane()
    await first.start()
    await second.start()
    sub, _, gate, channel = remote_channel(first, second, ChannelId(0, 0, 0, 0))
    gate.open()
    await produce(sub, [Buffer([1]), EndOfData(drain=True), END_OF_PARTITION])
    while not channel.ended:
        await take_and_recycle(gate)
    await first.close()
    await second.close()
    assert gate.failure is None
    assert caplog.records == []


@pytest.mark.asyncio
async def test_closing_a_plane_fails_the_live_channels_on_both_sides(
    planes: tuple[DataPlane, DataPlane],
) -> None:
    first, second = planes
    sub, _, gate, _ = remote_channel(first, second, ChannelId(0, 0, 0, 0))
    local_gate = remote_channel(second, first, ChannelId(0, 1, 0, 0)).gate
    gate.open()
    local_gate.open()
    await sub.add_buffer(Buffer([1]))
    await take_and_recycle(gate)
    await first.close()
    with pytest.raises(RemoteChannelError, match=r"127\.0\.0\.1:\d+ was lost"):
        await take(gate)
    with pytest.raises(RemoteChannelError, match="data plane of this process was closed"):
        await take(local_gate)


@pytest.mark.asyncio
async def test_a_peer_that_never_connects_fails_the_waiting_side_after_the_timeout() -> None:
    plane = DataPlane(connect_timeout_s=0.2)
    await plane.start()
    try:
        gate = InputGate(RECEIVER_NAME, Wakeup())
        # A lower address dials; this plane waits for it, and it never comes.
        plane.incoming(CHANNEL, "127.0.0.1", 1, gate, description=SENDER_NAME)
        gate.open()
        with pytest.raises(RemoteChannelError, match=r"did not connect within 0\.2 s"):
            await take(gate)
    finally:
        await plane.close()


@pytest.mark.asyncio
async def test_a_peer_that_cannot_be_reached_fails_the_dialing_side() -> None:
    first, second = DataPlane(), DataPlane()
    await first.start()
    await second.start()
    lower, higher = sorted([first, second], key=lambda p: p.address)
    await higher.close()
    try:
        gate = InputGate(RECEIVER_NAME, Wakeup())
        lower.incoming(CHANNEL, *higher.address, gate, description=SENDER_NAME)
        gate.open()
        with pytest.raises(RemoteChannelError, match="cannot connect to it"):
            await take(gate)
    finally:
        await lower.close()
