"""Credit-based channels between TaskManager processes: the data plane over TCP.

Inside one process a channel hands Python objects from a :class:`~actors.network.ResultSubpartition`
to an :class:`~actors.network.InputChannel`. When the sending and the receiving subtask run in
different processes, both tasks keep those classes (the sender writes through its
``RecordWriter``, the receiver reads its ``InputGate``) and this module puts a stand-in for the
missing peer on each side:

- on the sender's process an :class:`OutgoingChannel` is the subpartition's consumer: every buffer
  and event the subpartition hands it becomes a frame, and the receiver's credit frames call
  ``ResultSubpartition.add_credit``;
- on the receiver's process a :class:`RemoteSender` is the input channel's sender: ``add_credit``
  writes a credit frame, and its ``credit`` mirrors the remote sender's credit as everything
  announced minus the buffers received, which ``InputChannel`` reads to decide on lending floating
  buffers exactly as it reads a local sender's.

So the protocol of :mod:`actors.network` runs unchanged across processes: exclusive credit
announced when the receiving task opens its gate, one credit per buffer, the backlog carried with
each buffer, floating buffers lent by the receiving gate, events without credit in their place
behind the buffers, ``EndOfPartition`` last. At the receiver the invariant holds with the mirror:
``buffers queued + mirrored credit == exclusive + floating held``; the real sender holds less by
the credit still on the wire.

Connections. Each process runs one :class:`DataPlane`: a server on ``127.0.0.1``, port 0 (the
chosen port is :attr:`DataPlane.port`). Two processes share ONE connection, multiplexed by
:class:`ChannelId`. The process with the lower address ``(host, port)`` dials, when the first
channel to the other is registered; the other waits for it (and fails the peer's channels if it
has not come within ``connect_timeout_s``). Both sides apply the same rule, so a pair never opens
two connections, even when both register channels to each other at the same moment. Peers are
named by the address their plane reports (:attr:`DataPlane.address`).

Frames are :func:`actors.wire.frame` around :func:`state.serde.packb` of a list, kind first; a
channel id travels as ``[attempt, edge, sender, receiver]``:

========== ================== ====================================================================
kind       direction          fields
========== ================== ====================================================================
HELLO  0   dialer → acceptor  host, port of the dialer's plane; the connection's first frame
CREDIT 1   receiver → sender  channel, credit
BUFFER 2   sender → receiver  channel, backlog, ``packb([values, timestamps])``
EVENT  3   sender → receiver  channel, event code, event fields
========== ================== ====================================================================

The first credit of a channel is its request: the outgoing end connects its subpartition only
then, so that nothing (not even an event, which needs no credit) is sent before the receiver has
registered the channel. Credit for a channel the sender has not registered yet is kept until it
does (its task may be deployed later), unless the channel's attempt was released. Frames of a
channel that is not registered (never was, or no longer is: an old attempt) are dropped and
counted, never delivered to another channel. ``EndOfPartition`` unregisters a channel on both ends;
:meth:`DataPlane.release` unregisters the channels of an attempt.

Records are encoded by the sending task, in ``ResultSubpartition.add_buffer`` (the
``prepare_send`` hook), once per buffer: a broadcast writer hands one buffer to all its channels.
A record msgpack cannot hold fails the sending task with :class:`RecordEncodingError`, naming the
subpartition, the receiver and the record's type. Values come back as :func:`state.serde.unpackb`
decodes them: the same types for what it supports (tuples stay tuples), subclasses as their base
type (a ``StrEnum`` member as a ``str``). The connection's reader decodes on the receiving process.

Memory stays bounded by credit: a receiver holds at most the buffers it granted credit for (more is
a protocol error that fails the channel), a sender's queue is bounded as for local channels, and
what the wire holds (the transport's write buffer, the sockets) is at most the credited buffers in
flight plus events; :class:`ConnectionStatistics` reports the peak write buffer.

Failure. A connection that ends (the peer process died or closed its plane while channels were
live) or breaks the protocol fails every channel registered over it: a receiving gate raises
:class:`RemoteChannelError` from ``poll_next`` (its task wakes up and fails, naming the channel and
the peer); an outgoing channel raises it at the sending task's next ``add_buffer``/``add_event``,
and a task waiting for credit is woken by releasing its subpartition. Channels that ended are no
longer registered, so closing planes after a finished job fails nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import msgpack

from actors.events import (
    WATERMARK_ACTIVE,
    WATERMARK_IDLE,
    CancelCheckpointMarker,
    CheckpointBarrier,
    EndOfData,
    EndOfPartition,
    Event,
    Watermark,
    WatermarkStatus,
)
from actors.network import (
    DEFAULT_EXCLUSIVE_CREDITS,
    Buffer,
    ChannelProtocolError,
    InputChannel,
    InputGate,
    ResultSubpartition,
)
from actors.wire import MAX_FRAME_BYTES, WireFormatError, frame, read_frame, wire_message
from state.serde import SUPPORTED_TYPES, describe_unencodable, packb, unpackb
from state.storage import CheckpointKind

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_CONNECT_TIMEOUT_S = 30.0
"""How long the dialing side of a pair tries to connect, and the other side waits for it."""
CLOSE_TIMEOUT_S = 5.0
"""How long :meth:`DataPlane.close` lets a connection send what was written to it."""

HELLO = 0
CREDIT = 1
BUFFER = 2
EVENT = 3

_WATERMARK = 0
_BARRIER = 1
_CANCEL = 2
_END_OF_DATA = 3
_END_OF_PARTITION = 4
_WATERMARK_STATUS = 5

Address = tuple[str, int]

MAX_BUFFER_BYTES = MAX_FRAME_BYTES - 1024
"""The largest encoded buffer a frame carries, with room for the frame's other fields."""

_DECODE_ERRORS = (
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    msgpack.UnpackException,
)
"""What decoding a malformed frame raises (msgpack's own errors are ValueError subclasses)."""

_HANDSHAKE_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, *_DECODE_ERRORS)


@wire_message("data.channel-id")
@dataclass(frozen=True, slots=True)
class ChannelId:
    """One channel of one attempt, the same in every process.

    ``edge`` is the edge's index in ``JobGraph.edges`` (every process builds the same graph),
    ``sender`` and ``receiver`` are the subtask indexes at its two ends; ``attempt`` keeps frames of
    an attempt that was torn down away from the next one's channels.
    """

    attempt: int
    edge: int
    sender: int
    receiver: int

    def __str__(self) -> str:
        return f"attempt {self.attempt}, edge {self.edge}, subtask {self.sender} -> {self.receiver}"


class RemoteChannelError(ConnectionError):
    """A channel to another process can go on no more: its connection was lost or misbehaved."""


class RecordEncodingError(TypeError):
    """A record cannot be sent to another process: msgpack cannot encode it."""


@dataclass(frozen=True)
class ConnectionStatistics:
    peer: Address
    dialed: bool
    """True if this process dialed the connection, False if the peer did."""
    connected: bool
    outgoing_channels: int
    incoming_channels: int
    frames_sent: int
    frames_received: int
    peak_write_buffer_bytes: int


@dataclass(frozen=True)
class DataPlaneStatistics:
    address: Address
    connections: tuple[ConnectionStatistics, ...]
    connections_dialed: int
    connections_accepted: int
    frames_dropped: int
    buffers_encoded: int


class OutgoingChannel:
    """The receiver's stand-in on the sender's process: the consumer of a subpartition whose
    receiver runs in another process. Created by :meth:`DataPlane.outgoing`."""

    def __init__(
        self,
        peer: _Peer,
        channel_id: ChannelId,
        subpartition: ResultSubpartition,
        receiver: str,
    ) -> None:
        self.channel_id = channel_id
        self.subpartition = subpartition
        self.receiver = receiver or f"subtask {channel_id.receiver}"
        self.credit_received = 0
        self.requested = False
        self.failure: RemoteChannelError | None = None
        self._peer = peer
        self._key = _wire_key(channel_id)
        subpartition.prepare_send = self._prepare_send

    def __repr__(self) -> str:
        return f"<OutgoingChannel {self.subpartition.name} -> {self.receiver} ({self.channel_id})>"

    def _prepare_send(self, item: Buffer | Event) -> None:
        # Runs in the sending task (ResultSubpartition.add_buffer/add_event).
        if self.failure is not None:
            raise self.failure
        if type(item) is Buffer and item.encoded is None:
            item.encoded = _encode_buffer(item, self.subpartition.name, self.receiver)
            self._peer.plane.buffers_encoded += 1

    def on_credit(self, credit: int) -> None:
        self.credit_received += credit
        if not self.requested:
            self.requested = True
            self.subpartition.connect(self)
        self.subpartition.add_credit(credit)

    def on_buffer(self, buffer: Buffer, backlog: int) -> None:
        encoded = buffer.encoded
        if encoded is None:
            msg = f"{self!r}: a buffer reached the wire unencoded (queued before the channel?)"
            raise ChannelProtocolError(msg)
        self._peer.send(packb([BUFFER, self._key, backlog, encoded]))

    def on_event(self, event: Event) -> None:
        self._peer.send(packb([EVENT, self._key, *_encode_event(event)]))
        if type(event) is EndOfPartition:
            self._peer.outgoing.pop(self.channel_id, None)

    def fail(self, error: RemoteChannelError) -> None:
        if self.failure is None:
            self.failure = error
        # Wakes a sending task that waits for credit; its next add_buffer/add_event raises.
        self.subpartition.release()


class RemoteSender:
    """The sender's stand-in on the receiver's process: the sender of an input channel whose
    subpartition runs in another process. Created by :meth:`DataPlane.incoming`.

    ``credit`` mirrors the remote sender's credit: announced minus buffers received.
    """

    def __init__(self, peer: _Peer, channel_id: ChannelId, name: str) -> None:
        self.name = name
        self.channel_id = channel_id
        self.credit = 0
        self.credit_announced = 0
        self.buffers_received = 0
        self.channel: InputChannel | None = None
        self._peer = peer
        self._key = _wire_key(channel_id)

    def __repr__(self) -> str:
        return f"<RemoteSender {self.name} ({self.channel_id})>"

    def connect(self, channel: InputChannel) -> None:
        self.channel = channel

    def add_credit(self, credit: int) -> None:
        self.credit += credit
        self.credit_announced += credit
        self._peer.send(packb([CREDIT, self._key, credit]))

    def on_buffer(self, backlog: int, body: bytes) -> None:
        channel = self.channel
        assert channel is not None
        try:
            values, timestamps = unpackb(body)
        except _DECODE_ERRORS as exc:
            msg = f"undecodable buffer on channel {self.channel_id}: {exc}"
            raise WireFormatError(msg) from exc
        self.credit -= 1
        self.buffers_received += 1
        channel.on_buffer(Buffer(values, timestamps), backlog)

    def on_event(self, fields: list[Any]) -> None:
        channel = self.channel
        assert channel is not None
        try:
            event = _decode_event(fields)
        except _DECODE_ERRORS as exc:
            msg = f"undecodable event on channel {self.channel_id}: {exc}"
            raise WireFormatError(msg) from exc
        channel.on_event(event)
        if type(event) is EndOfPartition:
            self._peer.incoming.pop(self.channel_id, None)

    def fail(self, error: RemoteChannelError) -> None:
        if self.channel is not None:
            self.channel.gate.fail(error)

    def describe(self) -> str:
        owner = self.channel.gate.owner if self.channel is not None else "?"
        return f"input channel {self.name} of {owner} ({self.channel_id})"


class _Peer:
    """The connection to one other process's plane and the channels registered over it."""

    def __init__(self, plane: DataPlane, address: Address, dials: bool) -> None:
        self.plane = plane
        self.address = address
        self.dials = dials
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.timeout: asyncio.TimerHandle | None = None
        self.outgoing: dict[ChannelId, OutgoingChannel] = {}
        self.incoming: dict[ChannelId, RemoteSender] = {}
        self.pending_credit: dict[ChannelId, int] = {}
        self.failed = False
        self.frames_sent = 0
        self.frames_received = 0
        self.peak_write_buffer_bytes = 0
        self._unsent: list[bytes] = []

    @property
    def where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def send(self, payload: bytes) -> None:
        if self.failed:
            return  # its channels failed; what their tasks still do goes nowhere
        writer = self.writer
        if writer is None:
            # Not connected yet: only credit announcements, at most one per channel opened.
            self._unsent.append(frame(payload))
            return
        writer.write(frame(payload))
        self.frames_sent += 1
        size = writer.transport.get_write_buffer_size()
        if size > self.peak_write_buffer_bytes:
            self.peak_write_buffer_bytes = size

    def attach(self, writer: asyncio.StreamWriter) -> None:
        """The connection is up: send what waited for it (after HELLO, when dialing)."""
        if self.timeout is not None:
            self.timeout.cancel()
            self.timeout = None
        self.writer = writer
        if self.dials:
            host, port = self.plane.address
            self.send(packb([HELLO, host, port]))
        unsent, self._unsent = self._unsent, []
        for data in unsent:
            writer.write(data)
            self.frames_sent += 1

    async def dial_and_serve(self) -> None:
        host, port = self.address
        timeout = self.plane.connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            self.lose(f"cannot connect to it (no answer within {timeout:g} s)")
            return
        except OSError as exc:
            self.lose(f"cannot connect to it ({exc})")
            return
        self.plane.connections_dialed += 1
        try:
            self.attach(writer)
            await self.serve(reader)
        finally:
            writer.close()

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Read and deliver frames until the connection ends; then fail what is still live."""
        try:
            while True:
                payload = await read_frame(reader)
                if payload is None:
                    self.lose("the peer closed the connection (did its process end?)")
                    return
                self.frames_received += 1
                self.dispatch(payload)
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.lose(f"the connection broke ({type(exc).__name__}: {exc})")
        except WireFormatError as exc:
            self.lose(f"the peer broke the protocol ({exc})")
        except Exception as exc:
            log.exception("data connection to %s: delivering a frame failed", self.where)
            self.lose(f"delivering a frame failed ({type(exc).__name__}: {exc})")

    def dispatch(self, payload: bytes) -> None:
        try:
            message = unpackb(payload)
            kind = message[0]
            channel_id = ChannelId(*message[1])
        except _DECODE_ERRORS as exc:
            msg = f"undecodable frame of {len(payload)} bytes: {exc}"
            raise WireFormatError(msg) from exc
        if kind == CREDIT:
            self.on_credit(channel_id, message[2])
            return
        if kind != BUFFER and kind != EVENT:
            msg = f"unknown frame kind {kind!r}"
            raise WireFormatError(msg)
        sender = self.incoming.get(channel_id)
        if sender is None:
            self.plane.frames_dropped += 1
            return
        try:
            if kind == BUFFER:
                sender.on_buffer(message[2], message[3])
            else:
                sender.on_event(message[2:])
        except ChannelProtocolError as exc:
            self.fail_channel(sender, str(exc))

    def on_credit(self, channel_id: ChannelId, credit: int) -> None:
        outgoing = self.outgoing.get(channel_id)
        if outgoing is not None:
            outgoing.on_credit(credit)
        elif channel_id.attempt in self.plane.released_attempts:
            self.plane.frames_dropped += 1
        else:
            # The receiver opened before this process registered its sender: keep it.
            pending = self.pending_credit
            pending[channel_id] = pending.get(channel_id, 0) + credit

    def fail_channel(self, sender: RemoteSender, reason: str) -> None:
        self.incoming.pop(sender.channel_id, None)
        sender.fail(RemoteChannelError(f"{sender.describe()} from {self.where}: {reason}"))

    def lose(self, reason: str) -> None:
        """The connection is gone (or never came): fail every channel registered over it."""
        if self.failed:
            return
        self.failed = True
        self._unsent.clear()
        if self.timeout is not None:
            self.timeout.cancel()
            self.timeout = None
        incoming, self.incoming = self.incoming, {}
        outgoing, self.outgoing = self.outgoing, {}
        self.pending_credit.clear()
        if self.plane.peers.get(self.address) is self:
            del self.plane.peers[self.address]
        if self.writer is not None:
            self.writer.close()
        live = len(incoming) + len(outgoing)
        if live and not self.plane.closing:
            log.warning(
                "data connection to the TaskManager process at %s: %s; %d channel(s) fail",
                self.where,
                reason,
                live,
            )
        else:
            log.debug("data connection to %s ended: %s", self.where, reason)
        where = f"the data connection to the TaskManager process at {self.where}"
        for sender in incoming.values():
            sender.fail(RemoteChannelError(f"{sender.describe()}: {where} was lost: {reason}"))
        for channel in outgoing.values():
            channel.fail(
                RemoteChannelError(
                    f"output channel {channel.subpartition.name} -> {channel.receiver} "
                    f"({channel.channel_id}): {where} was lost: {reason}"
                )
            )

    def connect_timed_out(self) -> None:
        self.timeout = None
        if self.writer is None:
            self.lose(
                f"it did not connect within {self.plane.connect_timeout_s:g} s (it dials, as "
                "the lower address of the pair; is its process running?)"
            )

    def release(self, attempt: int) -> None:
        for registry in (self.outgoing, self.incoming, self.pending_credit):
            for channel_id in [c for c in registry if c.attempt == attempt]:
                del registry[channel_id]

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            self.address,
            self.dials,
            self.writer is not None and not self.failed,
            len(self.outgoing),
            len(self.incoming),
            self.frames_sent,
            self.frames_received,
            self.peak_write_buffer_bytes,
        )


class DataPlane:
    """One process's end of the channels to subtasks in other processes (see the module docstring).

    Usage, on every TaskManager process: ``await start()``, report :attr:`address` to the job
    master; per deployed channel whose peer runs elsewhere, :meth:`outgoing` (this process sends)
    or :meth:`incoming` (this process receives), before the task runs; :meth:`release` when an
    attempt's tasks are gone; :meth:`close` at the end. Everything runs on the process's loop.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        self.host = host
        self.port = 0
        self.connect_timeout_s = connect_timeout_s
        self.peers: dict[Address, _Peer] = {}
        self.released_attempts: set[int] = set()
        self.closing = False
        self.connections_dialed = 0
        self.connections_accepted = 0
        self.frames_dropped = 0
        self.buffers_encoded = 0
        self._server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        """The tasks serving accepted connections, and their writers."""

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    async def start(self) -> None:
        """Listen on ``host``, on a port the system picks (then in :attr:`port`)."""
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def outgoing(
        self,
        channel_id: ChannelId,
        peer_host: str,
        peer_port: int,
        subpartition: ResultSubpartition,
        receiver: str = "",
    ) -> OutgoingChannel:
        """Bind ``subpartition`` (of a local sending task) to its receiver in the process whose
        plane is at ``peer_host:peer_port``. Call before the sending task adds anything;
        ``receiver`` names the receiving subtask in error messages."""
        if subpartition.prepare_send is not None or subpartition.queued_buffers:
            msg = f"subpartition {subpartition.name} is already bound or has data queued"
            raise ValueError(msg)
        peer = self._peer(channel_id, peer_host, peer_port)
        channel = OutgoingChannel(peer, channel_id, subpartition, receiver)
        peer.outgoing[channel_id] = channel
        credit = peer.pending_credit.pop(channel_id, 0)
        if credit:
            channel.on_credit(credit)
        return channel

    def incoming(
        self,
        channel_id: ChannelId,
        peer_host: str,
        peer_port: int,
        gate: InputGate,
        exclusive_credits: int = DEFAULT_EXCLUSIVE_CREDITS,
        input_index: int = 0,
        description: str = "",
    ) -> InputChannel:
        """Add to ``gate`` (of a local receiving task) the input channel whose sender runs in the
        process whose plane is at ``peer_host:peer_port``; like ``gate.add_channel``, in the
        gate's channel order. ``description`` names the sender (its subpartition's name)."""
        sender = self.remote_sender(channel_id, peer_host, peer_port, description)
        return gate.add_channel(sender, exclusive_credits, input_index, description)

    def remote_sender(
        self, channel_id: ChannelId, peer_host: str, peer_port: int, description: str = ""
    ) -> RemoteSender:
        """The sender of an input channel whose sender runs in the process whose plane is at
        ``peer_host:peer_port``, for a gate that is built later: add it to the gate with
        ``gate.add_channel`` (in the gate's channel order) before the receiving task starts.
        :meth:`incoming` does both at once."""
        peer = self._peer(channel_id, peer_host, peer_port)
        sender = RemoteSender(peer, channel_id, description or f"subtask {channel_id.sender}")
        peer.incoming[channel_id] = sender
        return sender

    def release(self, attempt: int) -> None:
        """Forget the channels of ``attempt`` (its tasks are gone): their frames are dropped."""
        self.released_attempts.add(attempt)
        for peer in self.peers.values():
            peer.release(attempt)

    def statistics(self) -> DataPlaneStatistics:
        return DataPlaneStatistics(
            self.address,
            tuple(peer.statistics() for peer in self.peers.values()),
            self.connections_dialed,
            self.connections_accepted,
            self.frames_dropped,
            self.buffers_encoded,
        )

    async def close(self) -> None:
        """Close the server and every connection, after sending what was written to them;
        channels still live fail (and so do their ends in the peers, which see the connection
        end)."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        peers = list(self.peers.values())
        for peer in peers:
            peer.lose("the data plane of this process was closed")
        writers = [p.writer for p in peers if p.writer is not None]
        writers += self._handlers.values()
        for writer in writers:
            writer.close()
        for writer in writers:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await writer.wait_closed()
            except TimeoutError:
                writer.transport.abort()  # the peer stopped reading: drop what it did not take
            except OSError:
                pass  # the peer reset the connection: it is closed
        tasks = [p.task for p in peers if p.task is not None] + list(self._handlers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _peer(self, channel_id: ChannelId, host: str, port: int) -> _Peer:
        if self._server is None or self.closing:
            msg = f"data plane at {self.host}:{self.port} is not running; cannot add {channel_id}"
            raise RuntimeError(msg)
        address = (host, port)
        if address == self.address:
            msg = f"channel {channel_id} connects this process to itself: use a local channel"
            raise ValueError(msg)
        peer = self.peers.get(address)
        if peer is not None and (channel_id in peer.outgoing or channel_id in peer.incoming):
            msg = f"channel {channel_id} to {host}:{port} is already registered"
            raise ValueError(msg)
        if peer is None:
            peer = _Peer(self, address, dials=self.address < address)
            self.peers[address] = peer
            if peer.dials:
                peer.task = asyncio.create_task(peer.dial_and_serve())
            else:
                loop = asyncio.get_running_loop()
                peer.timeout = loop.call_later(self.connect_timeout_s, peer.connect_timed_out)
        return peer

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that starts a task of our own: asyncio 3.11 logs an error for a
        # cancelled client_connected_cb task, and close() cancels what still reads.
        task = asyncio.create_task(self._serve_accepted(reader, writer))
        self._handlers[task] = writer
        task.add_done_callback(self._handlers.pop)

    async def _serve_accepted(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            peer = await self._handshake(reader, writer)
            if peer is not None:
                await peer.serve(reader)
        finally:
            writer.close()

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Peer | None:
        """The new connection's peer, from its HELLO; ``None`` (after a warning) if invalid."""
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                payload = await read_frame(reader)
            if payload is None:
                return None
            kind, host, port = unpackb(payload)
            if kind != HELLO or type(host) is not str or type(port) is not int:
                msg = f"expected HELLO, got frame kind {kind!r}"
                raise WireFormatError(msg)
        except _HANDSHAKE_ERRORS as exc:
            log.warning("data plane at %s:%d: refused a connection: %r", *self.address, exc)
            return None
        address = (host, port)
        peer = self.peers.get(address)
        problem = None
        if self.closing:
            problem = "this plane is closing"
        elif not address < self.address:
            problem = "it has the higher address and must wait to be dialed"
        elif peer is not None and (peer.writer is not None or peer.failed):
            problem = "the pair already has a connection"
        if problem is not None:
            log.warning(
                "data plane at %s:%d: refused a connection from %s:%d: %s",
                *self.address,
                host,
                port,
                problem,
            )
            return None
        if peer is None:
            peer = _Peer(self, address, dials=False)
            self.peers[address] = peer
        self.connections_accepted += 1
        peer.attach(writer)
        return peer


def _wire_key(channel_id: ChannelId) -> list[int]:
    return [channel_id.attempt, channel_id.edge, channel_id.sender, channel_id.receiver]


def _encode_buffer(buffer: Buffer, sender: str, receiver: str) -> bytes:
    try:
        encoded = packb([buffer.values, buffer.timestamps])
    except (TypeError, ValueError, OverflowError) as exc:
        problem = f"? ({exc})"
        for record in buffer.values:
            try:
                packb(record)
            except (TypeError, ValueError, OverflowError) as record_exc:
                problem = describe_unencodable(record, record_exc)
                break
        msg = (
            f"{sender}: cannot send a record of type {problem} to {receiver}, which runs in "
            f"another TaskManager process: records between processes are encoded with msgpack, "
            f"which holds {SUPPORTED_TYPES}; emit records of those types (for a dataclass: "
            "dataclasses.asdict(record)), or run the job in one TaskManager"
        )
        raise RecordEncodingError(msg) from exc
    if len(encoded) > MAX_BUFFER_BYTES:
        msg = (
            f"{sender}: a buffer of {len(buffer)} records for {receiver} encodes to "
            f"{len(encoded)} bytes, more than a frame between processes holds "
            f"({MAX_BUFFER_BYTES}); lower the buffer size (records per buffer) or the records' size"
        )
        raise RecordEncodingError(msg)
    return encoded


def _encode_event(event: Event) -> list[Any]:
    if isinstance(event, Watermark):
        return [_WATERMARK, event.timestamp]
    if isinstance(event, WatermarkStatus):
        return [_WATERMARK_STATUS, event.idle]
    if isinstance(event, CheckpointBarrier):
        return [_BARRIER, event.checkpoint_id, event.timestamp_ms, event.kind.value]
    if isinstance(event, CancelCheckpointMarker):
        return [_CANCEL, event.checkpoint_id]
    if isinstance(event, EndOfData):
        return [_END_OF_DATA, event.drain]
    if isinstance(event, EndOfPartition):
        return [_END_OF_PARTITION]
    msg = f"{event!r} is not an event a channel carries"
    raise TypeError(msg)


def _decode_event(fields: list[Any]) -> Event:
    code = fields[0]
    if code == _WATERMARK:
        return Watermark(fields[1])
    if code == _WATERMARK_STATUS:
        return WATERMARK_IDLE if fields[1] else WATERMARK_ACTIVE
    if code == _BARRIER:
        return CheckpointBarrier(fields[1], fields[2], CheckpointKind(fields[3]))
    if code == _CANCEL:
        return CancelCheckpointMarker(fields[1])
    if code == _END_OF_DATA:
        return EndOfData(fields[1])
    if code == _END_OF_PARTITION:
        return EndOfPartition()
    msg = f"unknown event code {code!r}"
    raise ValueError(msg)
