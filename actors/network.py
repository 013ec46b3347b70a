"""Channels between subtasks with credit-based flow control.

A sender subtask writes into a :class:`ResultSubpartition` per receiving channel; the receiver reads
from an :class:`InputChannel` of its :class:`InputGate`. The receiver owns the memory: every
channel has ``exclusive_credits`` buffer slots of its own, and the gate has a pool of
``floating_buffers`` slots that channels borrow when their sender announces a backlog.

Credit protocol (the names follow Flink's ``RemoteInputChannel``):

1. On connect, the channel announces its exclusive slots to the sender as credit.
2. A sender sends a buffer only while it holds credit; each buffer spends one credit and carries
   the sender's ``backlog`` (buffers still queued behind it).
3. A receiver that sees ``backlog > credit`` borrows floating slots from its gate and announces them.
4. When the task has processed a buffer, the slot is recycled: a borrowed slot that its channel no
   longer needs goes back to the pool (and to a channel that waits for one), any other slot is
   announced to the sender again.

Invariant, per channel: ``buffers queued at the receiver + credit held by the sender ==
exclusive_credits + floating slots borrowed``. So a channel never holds more buffers than its
credits, and a sender that outruns its receiver stops: :meth:`ResultSubpartition.add_buffer` waits
while the sender's own small queue is full. That wait is backpressure; it reaches the sources.

Events (watermarks, barriers, end of data/partition) need no credit but queue in order behind the
buffers that were sent before them, so they never overtake data.

Everything here runs on one event loop; methods are called by the sending task (``add_*``), by the
receiving task (``poll_next``, ``recycle``, blocking), and by each other (credit, delivery).

A channel whose two ends run in different processes keeps both classes: :mod:`actors.remote`
puts a stand-in for the missing peer on each side (a :class:`BufferConsumer` behind the
subpartition, a :class:`ChannelSender` in front of the input channel) and sets the subpartition's
``prepare_send`` hook, so that the sending task encodes what it sends.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from actors.events import EndOfPartition, Event
from actors.mailbox import Wakeup

DEFAULT_EXCLUSIVE_CREDITS = 4
DEFAULT_FLOATING_BUFFERS = 16
"""Buffers in flight per channel, and per gate on loan. Flink's 2 and 8 left a keyed shuffle
between two TaskManagers waiting on its round trips: the senders were backpressured a quarter to a
third of the time while their receivers stood idle a fifth to a quarter of it. With 4 and 16,
Kafka ETL at 2 TaskManagers (``bench/scaleout.py``) went from 1.58-1.78x the hand loop to
1.99-2.15x (four runs each)."""
DEFAULT_SENDER_QUEUE = 2


class Buffer:
    """A list of records (and, when the stream has event time, their timestamps).

    Buffers are read-only once emitted: a broadcast hands the same buffer to every channel.
    ``encoded`` is the buffer's wire form, made once by the first channel to another process that
    sends it (see :mod:`actors.remote`); ``None`` while only local channels had it.
    ``keys``: on a key-partitioned edge, each record's key as the partitioner computed it, so
    that the keyed operator receiving it need not call the key selector again; never on the
    wire (a buffer from another process has none, and the receiver computes them).
    """

    __slots__ = ("encoded", "keys", "timestamps", "values")

    def __init__(
        self,
        values: list[Any],
        timestamps: list[int] | None = None,
        keys: list[Any] | None = None,
    ) -> None:
        self.values = values
        self.timestamps = timestamps
        self.keys = keys
        self.encoded: bytes | None = None

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return f"Buffer({self.values!r})"


class ChannelProtocolError(RuntimeError):
    """A channel saw something the credit protocol forbids (a bug, never user error)."""


class BufferConsumer(Protocol):
    """What a :class:`ResultSubpartition` delivers to: an :class:`InputChannel`, or the stand-in
    of a receiver in another process."""

    def on_buffer(self, buffer: Buffer, backlog: int) -> None: ...

    def on_event(self, event: Event) -> None: ...


class ChannelSender(Protocol):
    """What an :class:`InputChannel` needs of its sender: a :class:`ResultSubpartition`, or the
    stand-in of a sender in another process (whose ``credit`` mirrors the remote sender's)."""

    name: str
    credit: int

    def connect(self, channel: InputChannel) -> None: ...

    def add_credit(self, credit: int) -> None: ...


PrepareSend = Callable[[Buffer | Event], None]
"""Called by the sending task with each buffer and event before it is queued; may raise."""


@dataclass(frozen=True)
class SubpartitionStatistics:
    buffers_sent: int
    events_sent: int
    credit: int
    queued_buffers: int
    backpressure_waits: int
    backpressured_seconds: float


class ResultSubpartition:
    """The sending end of one channel; owned by the sending task."""

    def __init__(self, name: str, max_queued_buffers: int = DEFAULT_SENDER_QUEUE) -> None:
        self.name = name
        self.max_queued_buffers = max_queued_buffers
        self.credit = 0
        self._queue: deque[Buffer | Event] = deque()
        self._queued_buffers = 0
        self._channel: BufferConsumer | None = None
        self.prepare_send: PrepareSend | None = None
        """Set by a channel to another process: encodes each buffer in the sending task (so that an
        unencodable record fails that task) and raises once the channel's connection is lost."""
        self._draining = False
        self._space = asyncio.Event()
        self._space.set()
        self.buffers_sent = 0
        self.events_sent = 0
        self.backpressure_waits = 0
        self.backpressured_seconds = 0.0
        """Time the sending task waited for room (credit) in waits that ended."""
        self.backpressured_since: float | None = None
        """When the wait in progress began (``time.monotonic()``), if the task waits now."""
        self.released = False

    def connect(self, channel: BufferConsumer) -> None:
        self._channel = channel

    @property
    def queued_buffers(self) -> int:
        return self._queued_buffers

    def has_room(self) -> bool:
        return self._queued_buffers < self.max_queued_buffers

    async def add_buffer(self, buffer: Buffer) -> None:
        """Queue ``buffer`` for sending; waits while the sender-side queue is full (backpressure)."""
        if self.prepare_send is not None:
            self.prepare_send(buffer)
        if self._queued_buffers >= self.max_queued_buffers:
            self.backpressure_waits += 1
            started = self.backpressured_since = time.monotonic()
            try:
                while self._queued_buffers >= self.max_queued_buffers:
                    self._space.clear()
                    await self._space.wait()
            finally:
                self.backpressured_since = None
                self.backpressured_seconds += time.monotonic() - started
        self._queue.append(buffer)
        self._queued_buffers += 1
        self._drain()

    def add_event(self, event: Event) -> None:
        """Queue ``event`` behind every buffer added before it; events need no credit."""
        if self.prepare_send is not None:
            self.prepare_send(event)
        self._queue.append(event)
        self._drain()

    def add_credit(self, credit: int) -> None:
        """Called by the receiving channel to announce ``credit`` more buffer slots."""
        self.credit += credit
        self._drain()

    def release(self) -> None:
        """Drop everything still queued: the job attempt is being torn down."""
        self.released = True
        self._queue.clear()
        self._queued_buffers = 0
        self._space.set()

    def _drain(self) -> None:
        # Re-entrant calls (credit announced while delivering) leave the work to the outer loop.
        if self._draining or self._channel is None or self.released:
            return
        self._draining = True
        try:
            channel = self._channel
            queue = self._queue
            while queue:
                item = queue[0]
                if type(item) is Buffer:
                    if self.credit <= 0:
                        break
                    queue.popleft()
                    self.credit -= 1
                    self._queued_buffers -= 1
                    self.buffers_sent += 1
                    channel.on_buffer(item, self._queued_buffers)
                else:
                    queue.popleft()
                    self.events_sent += 1
                    channel.on_event(item)  # type: ignore[arg-type]
            if self._queued_buffers < self.max_queued_buffers:
                self._space.set()
        finally:
            self._draining = False

    def backpressured_until(self, now: float) -> float:
        """Seconds the sending task waited for room so far, the wait in progress up to ``now``
        (``time.monotonic()``) included."""
        since = self.backpressured_since
        if since is None:
            return self.backpressured_seconds
        return self.backpressured_seconds + max(0.0, now - since)

    def statistics(self) -> SubpartitionStatistics:
        return SubpartitionStatistics(
            self.buffers_sent,
            self.events_sent,
            self.credit,
            self._queued_buffers,
            self.backpressure_waits,
            self.backpressured_seconds,
        )


@dataclass(frozen=True)
class ChannelStatistics:
    queued_buffers: int
    peak_queued_buffers: int
    credits: int
    floating_held: int
    buffers_received: int


class InputChannel:
    """The receiving end of one channel; owned by the receiving task's :class:`InputGate`."""

    def __init__(
        self,
        gate: InputGate,
        index: int,
        sender: ChannelSender,
        exclusive_credits: int,
        input_index: int = 0,
        description: str = "",
    ) -> None:
        self.gate = gate
        self.index = index
        self.input_index = input_index
        self.description = description or sender.name
        self.exclusive_credits = exclusive_credits
        self.floating_held = 0
        self.sender = sender
        self.sender_backlog = 0
        self._items: deque[Buffer | Event] = deque()
        self.queued_buffers = 0
        self.peak_queued_buffers = 0
        self.buffers_received = 0
        self.ended = False
        sender.connect(self)

    @property
    def credits(self) -> int:
        """Buffer slots this channel currently owns (exclusive plus borrowed)."""
        return self.exclusive_credits + self.floating_held

    def open(self) -> None:
        """Step 1 of the protocol: announce the exclusive slots."""
        self.sender.add_credit(self.exclusive_credits)

    def on_buffer(self, buffer: Buffer, backlog: int) -> None:
        if self.ended:
            msg = f"channel {self.description} received a buffer after EndOfPartition"
            raise ChannelProtocolError(msg)
        self._items.append(buffer)
        self.queued_buffers += 1
        self.buffers_received += 1
        if self.queued_buffers > self.peak_queued_buffers:
            self.peak_queued_buffers = self.queued_buffers
        if self.queued_buffers > self.credits:
            msg = (
                f"channel {self.description} holds {self.queued_buffers} buffers but granted "
                f"only {self.credits} credits"
            )
            raise ChannelProtocolError(msg)
        self.sender_backlog = backlog
        self.gate._on_data(self)
        if backlog > self.sender.credit:
            self.gate._lend_floating(self, backlog - self.sender.credit)

    def on_event(self, event: Event) -> None:
        if self.ended:
            msg = f"channel {self.description} received {event!r} after EndOfPartition"
            raise ChannelProtocolError(msg)
        self._items.append(event)
        self.gate._on_data(self)

    def has_data(self) -> bool:
        return bool(self._items)

    def take(self) -> Buffer | Event:
        item = self._items.popleft()
        if type(item) is EndOfPartition:
            self.ended = True
        return item

    def recycle(self) -> None:
        """Step 4: the task finished with one buffer of this channel; free its slot."""
        self.queued_buffers -= 1
        if self.floating_held > 0 and (self.ended or self.sender_backlog <= self.sender.credit):
            self.floating_held -= 1
            self.gate._return_floating()
        elif not self.ended:
            self.sender.add_credit(1)

    def statistics(self) -> ChannelStatistics:
        return ChannelStatistics(
            self.queued_buffers,
            self.peak_queued_buffers,
            self.credits,
            self.floating_held,
            self.buffers_received,
        )


class InputGate:
    """All input channels of one task, read in round-robin order.

    ``poll_next`` skips blocked channels (barrier alignment blocks a channel that already delivered
    the current barrier). After processing a buffer the task must call ``channel.recycle()``.
    """

    def __init__(
        self,
        owner: str,
        wakeup: Wakeup,
        floating_buffers: int = DEFAULT_FLOATING_BUFFERS,
    ) -> None:
        self.owner = owner
        self.wakeup = wakeup
        self.channels: list[InputChannel] = []
        self.floating_available = floating_buffers
        self.floating_total = floating_buffers
        self._with_data: deque[InputChannel] = deque()
        self._queued: set[int] = set()
        self._blocked: set[int] = set()
        self._failure: BaseException | None = None

    def add_channel(
        self,
        sender: ChannelSender,
        exclusive_credits: int = DEFAULT_EXCLUSIVE_CREDITS,
        input_index: int = 0,
        description: str = "",
    ) -> InputChannel:
        if exclusive_credits < 1:
            msg = (
                f"{self.owner}: every input channel needs at least 1 exclusive credit (got "
                f"{exclusive_credits}): a sender without credit never sends the first buffer "
                "that would announce its backlog"
            )
            raise ValueError(msg)
        channel = InputChannel(
            self, len(self.channels), sender, exclusive_credits, input_index, description
        )
        self.channels.append(channel)
        return channel

    def open(self) -> None:
        for channel in self.channels:
            channel.open()

    def poll_next(self) -> tuple[InputChannel, Buffer | Event] | None:
        """The next item of an unblocked channel that has one, or ``None``.

        Raises the error a channel failed with (see :meth:`fail`)."""
        if self._failure is not None:
            raise self._failure
        with_data = self._with_data
        while with_data:
            channel = with_data.popleft()
            self._queued.discard(channel.index)
            if channel.index in self._blocked or not channel.has_data():
                continue
            item = channel.take()
            if channel.has_data():
                with_data.append(channel)
                self._queued.add(channel.index)
            return channel, item
        return None

    def block(self, channel_index: int) -> None:
        self._blocked.add(channel_index)

    def unblock_all(self) -> None:
        if not self._blocked:
            return
        blocked, self._blocked = self._blocked, set()
        for index in sorted(blocked):
            channel = self.channels[index]
            if channel.has_data() and index not in self._queued:
                self._with_data.append(channel)
                self._queued.add(index)
        self.wakeup.set()

    def fail(self, error: BaseException) -> None:
        """A channel can deliver nothing more (its connection to another process was lost): wake
        the task, whose next :meth:`poll_next` raises ``error`` (the first one, if several)."""
        if self._failure is None:
            self._failure = error
        self.wakeup.set()

    @property
    def failure(self) -> BaseException | None:
        """The error a channel failed with, if one did."""
        return self._failure

    @property
    def blocked_channels(self) -> frozenset[int]:
        return frozenset(self._blocked)

    def _on_data(self, channel: InputChannel) -> None:
        if channel.index not in self._queued and channel.index not in self._blocked:
            self._with_data.append(channel)
            self._queued.add(channel.index)
        self.wakeup.set()

    def _lend_floating(self, channel: InputChannel, wanted: int) -> None:
        granted = min(wanted, self.floating_available)
        if granted <= 0:
            return
        self.floating_available -= granted
        channel.floating_held += granted
        channel.sender.add_credit(granted)

    def _return_floating(self) -> None:
        self.floating_available += 1
        for channel in self.channels:
            if channel.ended:
                continue
            if channel.sender_backlog > channel.sender.credit:
                self._lend_floating(channel, 1)
                return
