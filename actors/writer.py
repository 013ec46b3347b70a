"""The record writer: turns emitted record lists into buffers on the channels of one output edge.

Records are appended to a per-channel partial buffer; a full buffer (``buffer_size`` records) is
sent at once, a partial one when the task flushes: before every event, after the buffer timeout,
and at the end. Sending a buffer waits for room in the channel (credit-based backpressure).

A broadcast edge keeps one partial buffer and hands each buffer to every channel: the buffer is
built (and, for channels to other processes, encoded) once, not once per channel.
"""

from __future__ import annotations

from typing import Any

from actors.events import MIN_TIMESTAMP, Event
from actors.network import Buffer, ResultSubpartition
from actors.partitioner import Partitioner

DEFAULT_BUFFER_SIZE = 1024


class RecordWriter:
    """Writes one task's output for one edge; owned by the sending task."""

    def __init__(
        self,
        subpartitions: list[ResultSubpartition],
        partitioner: Partitioner,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ) -> None:
        self.subpartitions = subpartitions
        self.partitioner = partitioner
        self.buffer_size = buffer_size
        self._broadcast = partitioner.broadcast
        # Per routed channel, the subpartitions its buffers go to: one each, or all for broadcast.
        self._targets = [subpartitions] if self._broadcast else [[s] for s in subpartitions]
        n = len(self._targets)
        self._values: list[list[Any]] = [[] for _ in range(n)]
        self._timestamps: list[list[int] | None] = [None] * n
        # The keys of the pending records, on an edge whose partitioner computes them (one
        # partitioner per writer: every record of such an edge has its key, or none has).
        self._keys: list[list[Any]] = [[] for _ in range(n)]
        self.has_pending = False

    async def emit(self, values: list[Any], timestamps: list[int] | None) -> None:
        size = self.buffer_size
        routed = (
            [(0, values, timestamps, None)]
            if self._broadcast
            else self.partitioner.route_with_keys(values, timestamps, len(self.subpartitions))
        )
        for channel, vals, stamps, keys in routed:
            pending = self._values[channel]
            pending_ts = self._timestamps[channel]
            if not pending and len(vals) >= size and pending_ts is None:
                # Fast path: whole buffers straight from the emitted list, no copy into a partial.
                full = len(vals) - len(vals) % size
                targets = self._targets[channel]
                for start in range(0, full, size):
                    end = start + size
                    buffer = Buffer(
                        vals[start:end],
                        None if stamps is None else stamps[start:end],
                        None if keys is None else keys[start:end],
                    )
                    for sub in targets:
                        await sub.add_buffer(buffer)
                vals = vals[full:]
                stamps = None if stamps is None else stamps[full:]
                keys = None if keys is None else keys[full:]
                if not vals:
                    continue
            if stamps is not None or pending_ts is not None:
                if pending_ts is None:
                    pending_ts = [MIN_TIMESTAMP] * len(pending)
                    self._timestamps[channel] = pending_ts
                pending_ts.extend(stamps if stamps is not None else [MIN_TIMESTAMP] * len(vals))
            pending.extend(vals)
            if keys is not None:
                self._keys[channel].extend(keys)
            self.has_pending = True
            if len(pending) >= size:
                await self._send_full(channel)

    async def _send_full(self, channel: int) -> None:
        pending = self._values[channel]
        pending_ts = self._timestamps[channel]
        pending_keys = self._keys[channel]
        size = self.buffer_size
        targets = self._targets[channel]
        full = len(pending) - len(pending) % size
        for start in range(0, full, size):
            end = start + size
            buffer = Buffer(
                pending[start:end],
                None if pending_ts is None else pending_ts[start:end],
                pending_keys[start:end] if pending_keys else None,
            )
            for sub in targets:
                await sub.add_buffer(buffer)
        self._values[channel] = pending[full:]
        self._timestamps[channel] = None if pending_ts is None else pending_ts[full:]
        self._keys[channel] = pending_keys[full:]
        self._refresh_pending()

    def _refresh_pending(self) -> None:
        self.has_pending = any(self._values)

    async def flush(self) -> None:
        """Send every partial buffer."""
        if not self.has_pending:
            return
        for channel, pending in enumerate(self._values):
            if pending:
                stamps = self._timestamps[channel]
                keys = self._keys[channel]
                self._values[channel] = []
                self._timestamps[channel] = None
                self._keys[channel] = []
                buffer = Buffer(pending, stamps, keys or None)
                for sub in self._targets[channel]:
                    await sub.add_buffer(buffer)
        self.has_pending = False

    async def broadcast_event(self, event: Event) -> None:
        """Flush, then put ``event`` on every channel behind the data sent so far."""
        await self.flush()
        for sub in self.subpartitions:
            sub.add_event(event)

    def release(self) -> None:
        for sub in self.subpartitions:
            sub.release()
