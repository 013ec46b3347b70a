"""Sinks that talk to services (Flink's ``AsyncSinkWriter``, FLIP-171), at least once.

The user implements :class:`AsyncSinkWriter` with ``async def write(batch)`` (one request to the
service for a list of records) and plugs it in with
``stream.sink_to(AsyncSink(MyWriter, max_batch_size=..., max_in_flight=..., max_batch_time=...))``.
The runtime batches the records of each subtask (a batch goes out when it has ``max_batch_size``
records, or ``max_batch_time`` after its first record came), keeps at most ``max_in_flight``
batches in flight, and while all of them are taken it stops taking input (the task waits, so
its input channels give no credit: backpressure, never an unbounded queue).

Before each checkpoint's snapshot (and at the end of input, FLIP-147's ``finish``) the operator
sends what is buffered and awaits every batch in flight, so a completed checkpoint means every
record before its barrier was written: after a crash, the restored job writes again at most the
records after that checkpoint (at least once). Nothing is kept in state.

The requests run as asyncio tasks of their own; they touch nothing of the operator. When one
ends, it only hands a callback to the task (``StreamTask.run_on_task``), and the task's actor
collects it: a failed write fails the task with an error naming the sink, the subtask and
the size of the batch, and the restart strategy takes over.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from actors.operator import StreamOperator
from runtime.api.durations import duration_ms
from runtime.api.functions import RuntimeContext
from runtime.api.sinks import Sink, sink_runtime_context
from state.snapshot import OperatorSnapshot, RestoredState


class AsyncSinkWriter:
    """Writes batches of one subtask's records to a service. ``write`` is awaited as a request of
    its own, up to ``max_in_flight`` at once, so it must not rely on the order batches complete
    in; ``open`` and ``close`` run on the subtask's actor."""

    async def open(self) -> None:
        """Connect (create a client session, ...)."""

    async def write(self, batch: list[Any]) -> None:
        """Write ``batch`` (at most ``max_batch_size`` records, in input order). Raise to fail
        the task; a batch may be written again after a restore (at least once)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release resources; always called, after every batch in flight ended or was cancelled."""


def _not_async_write(writer_class: type) -> str | None:
    if inspect.iscoroutinefunction(writer_class.write):  # type: ignore[attr-defined]
        return None
    return (
        f"{writer_class.__name__}.write must be an async def (the async sink awaits it per "
        "batch); for a blocking client, subclass SinkWriter instead"
    )


class AsyncSinkWriteError(RuntimeError):
    """A batch's ``write`` raised (its cause is the writer's exception)."""


class AsyncSink(Sink):
    """A sink of :class:`AsyncSinkWriter`\\ s: ``writer_factory(context)`` (a writer class, or a
    function of the :class:`RuntimeContext`) makes each subtask's writer.

    ``max_batch_size`` records per ``write``; at most ``max_in_flight`` batches awaited at once;
    a batch not full goes out ``max_batch_time`` (int ms or a duration like ``"200ms"``) after
    its first record came."""

    def __init__(
        self,
        writer_factory: Callable[[RuntimeContext], AsyncSinkWriter],
        max_batch_size: int = 100,
        max_in_flight: int = 10,
        max_batch_time: int | str = "1s",
        name: str | None = None,
    ) -> None:
        for what, value in (("max_batch_size", max_batch_size), ("max_in_flight", max_in_flight)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"AsyncSink: {what} must be an int >= 1, got {value!r}"
                raise ValueError(msg)
        if not callable(writer_factory):
            msg = (
                "AsyncSink needs a writer factory (an AsyncSinkWriter class, or a function of the "
                f"runtime context returning one), got {type(writer_factory).__name__}"
            )
            raise TypeError(msg)
        if isinstance(writer_factory, type) and issubclass(writer_factory, AsyncSinkWriter):
            problem = _not_async_write(writer_factory)
            if problem:
                raise TypeError(problem)
        self.writer_factory = writer_factory
        self.max_batch_size = max_batch_size
        self.max_in_flight = max_in_flight
        self.max_batch_time_ms = duration_ms(max_batch_time, "AsyncSink max_batch_time")
        self._name = name or str(getattr(writer_factory, "__name__", "AsyncSink"))

    def name(self) -> str:
        return self._name

    def create_operator(self, name: str, uid: str) -> StreamOperator:
        return AsyncSinkOperator(name, uid, self)


class AsyncSinkOperator(StreamOperator):
    """Runs one subtask's :class:`AsyncSinkWriter`: batching, bounded requests, the flush."""

    def __init__(self, name: str, uid: str, sink: AsyncSink) -> None:
        super().__init__(name, uid)
        self.sink = sink
        self.writer: AsyncSinkWriter | None = None
        self._buffer: list[Any] = []
        self._in_flight: dict[asyncio.Task[None], int] = {}
        """Each request still in flight (or ended, not collected yet), with its batch size."""
        self._batch_generation = 0
        """Counts batches begun, so a deadline mail of a batch already sent does nothing."""
        self.batches_written = 0

    async def initialize_state(self, restored: RestoredState | None) -> None:
        try:
            writer = self.sink.writer_factory(sink_runtime_context(self.context, None))
        except Exception as exc:
            raise self.user_error(exc) from exc
        if not isinstance(writer, AsyncSinkWriter):
            msg = (
                f"the writer factory of the async sink made a {type(writer).__name__}, not an "
                "AsyncSinkWriter"
            )
            raise self.user_error(TypeError(msg))
        problem = _not_async_write(type(writer))
        if problem:
            raise self.user_error(TypeError(problem))
        self.writer = writer

    async def open(self) -> None:
        assert self.writer is not None
        await self.writer.open()

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        if not values:
            return
        buffer = self._buffer
        if not buffer:
            self._start_batch()
        buffer.extend(values)
        size = self.sink.max_batch_size
        while len(buffer) >= size:
            batch = buffer[:size]
            del buffer[:size]
            await self._send(batch)
            if buffer:
                self._start_batch()

    def _start_batch(self) -> None:
        """The first record of a batch came: it goes out by ``max_batch_time`` at the latest."""
        self._batch_generation += 1
        generation = self._batch_generation
        clock = self.context.clock

        async def deadline(_now: int) -> None:
            if generation == self._batch_generation and self._buffer:
                batch, self._buffer = self._buffer, []
                await self._send(batch)

        self.context.scheduler.schedule_processing_callback(
            clock.now_ms() + self.sink.max_batch_time_ms, deadline
        )

    async def _send(self, batch: list[Any]) -> None:
        """Start ``batch``'s request once fewer than ``max_in_flight`` are in flight."""
        self._collect_ended()
        in_flight = self._in_flight
        while len(in_flight) >= self.sink.max_in_flight:
            # Backpressure: the task waits here, so its inputs give no credit meanwhile.
            await asyncio.wait(list(in_flight), return_when=asyncio.FIRST_COMPLETED)
            self._collect_ended()
        assert self.writer is not None
        request = asyncio.ensure_future(self.writer.write(batch))
        in_flight[request] = len(batch)
        scheduler = self.context.scheduler

        def ended(_request: asyncio.Task[None]) -> None:
            # On the event loop, not the task: the task's actor collects it.
            scheduler.run_on_task(self._on_request_ended, self)

        request.add_done_callback(ended)

    async def _on_request_ended(self) -> None:
        self._collect_ended()

    def _collect_ended(self) -> None:
        """Forget the requests that ended; the first failed one fails the task."""
        for request in [r for r in self._in_flight if r.done()]:
            size = self._in_flight.pop(request)
            if request.cancelled():
                continue
            exc = request.exception()
            if exc is not None:
                msg = (
                    f"async sink {self.sink.name()!r}: write() of a batch of {size} records "
                    f"failed: {type(exc).__name__}: {exc}"
                )
                raise self.user_error(AsyncSinkWriteError(msg)) from exc
            self.batches_written += 1

    async def flush(self) -> None:
        """Send what is buffered and await every request in flight."""
        if self._buffer:
            batch, self._buffer = self._buffer, []
            self._batch_generation += 1
            await self._send(batch)
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))
        self._collect_ended()

    async def snapshot_state(self, checkpoint_id: int) -> OperatorSnapshot | None:
        # At least once: everything before the barrier is written before the snapshot is acked.
        await self.flush()
        return None

    async def finish(self) -> None:
        await self.flush()

    async def close(self) -> None:
        requests = list(self._in_flight)
        self._in_flight.clear()
        for request in requests:
            request.cancel()
        # Their outcomes no longer matter (the task fails or was cancelled, or all had ended).
        await asyncio.gather(*requests, return_exceptions=True)
        if self.writer is not None:
            await self.writer.close()
