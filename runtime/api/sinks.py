"""The sink API that connectors implement, the operator that runs it, and the built-in print sink.

A :class:`Sink` creates one :class:`SinkWriter` per subtask. Writers get whole buffers. A
two-phase-commit writer stages data, reports what it staged from ``snapshot_state`` (kept as
operator list state), and makes it visible in ``notify_checkpoint_complete``; on restore it receives
that state in ``restore`` and must commit it again idempotently.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from actors.operator import OperatorContext, StreamOperator
from runtime.api.functions import RuntimeContext
from state.operator import OperatorStateStore
from state.snapshot import OperatorSnapshot, RestoredState

SINK_STATE = "sink"


class SinkWriter:
    """Writes one subtask's records. All methods run on the subtask's actor."""

    async def open(self) -> None:
        """Acquire resources."""

    async def restore(self, state: list[Any]) -> None:
        """Called before ``open`` with this subtask's share of the state from ``snapshot_state``,
        whenever the restored checkpoint contains this sink (also when the share is empty, at any
        parallelism); not called on a start without restored state for this sink."""

    async def write(self, values: list[Any]) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        """Graceful end: flush; the final checkpoint that follows commits the rest."""

    async def snapshot_state(self, checkpoint_id: int) -> list[Any]:
        """Flush and return what must survive a crash (e.g. pending files), as plain data."""
        return []

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Make everything staged up to ``checkpoint_id`` visible."""

    async def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` will never complete."""

    async def close(self) -> None:
        """Release resources; always called."""


class Sink:
    """Base class of sinks."""

    def name(self) -> str:
        return type(self).__name__

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        raise NotImplementedError

    def create_operator(self, name: str, uid: str) -> StreamOperator:
        """The operator that runs this sink in each subtask: the :class:`SinkOperator` around
        ``create_writer``'s writers, unless a kind of sink needs its own (``AsyncSink``)."""
        return SinkOperator(name, uid, self)


def sink_runtime_context(
    context: OperatorContext, operator_state: OperatorStateStore | None
) -> RuntimeContext:
    """What a sink's writer learns of where it runs (no keyed state: sinks are not keyed)."""
    return RuntimeContext(
        context.operator_name,
        context.subtask_index,
        context.parallelism,
        context.params,
        None,
        operator_state,
        context.checkpoint_interval_s,
        context.restore,
    )


class SinkOperator(StreamOperator):
    def __init__(self, name: str, uid: str, sink: Sink) -> None:
        super().__init__(name, uid)
        self.sink = sink
        self.writer: SinkWriter | None = None
        self._state: OperatorStateStore

    async def initialize_state(self, restored: RestoredState | None) -> None:
        ctx = self.context
        self._state = OperatorStateStore(ctx.subtask_label)
        self.writer = self.sink.create_writer(sink_runtime_context(ctx, self._state))
        if restored is not None and restored.operator is not None:
            self._state.restore(restored.operator)
            await self.writer.restore(self._state.get_list_state(SINK_STATE).get())

    async def open(self) -> None:
        assert self.writer is not None
        await self.writer.open()

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        assert self.writer is not None
        try:
            await self.writer.write(values)
        except Exception as exc:
            raise self.user_error(exc) from exc

    async def finish(self) -> None:
        assert self.writer is not None
        await self.writer.finish()

    async def snapshot_state(self, checkpoint_id: int) -> OperatorSnapshot | None:
        assert self.writer is not None
        staged = await self.writer.snapshot_state(checkpoint_id)
        # Recorded also when empty: every subtask of a restored sink then receives ``restore``,
        # which is how a writer tells a restore from a start without state.
        self._state.get_list_state(SINK_STATE).update(staged)
        return OperatorSnapshot(operator=self._state.snapshot())

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        assert self.writer is not None
        await self.writer.notify_checkpoint_complete(checkpoint_id)

    async def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        assert self.writer is not None
        await self.writer.notify_checkpoint_aborted(checkpoint_id)

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.close()


class PrintSink(Sink):
    """Prints each record on its own line (to stdout unless another stream is given).

    With ``prefix``, or at parallelism above 1, lines start with ``prefix`` and the subtask
    (``3> ``), as Flink's print sink does.
    """

    def __init__(self, prefix: str = "", stream: TextIO | None = None, raw: bool = False) -> None:
        self.prefix = prefix
        self.stream = stream
        self.raw = raw

    def name(self) -> str:
        return "Print"

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        tag = ""
        if context.parallelism > 1:
            tag = f"{context.subtask_index + 1}> "
        if self.prefix:
            tag = f"{self.prefix}:{tag}" if tag else f"{self.prefix}> "
        return _PrintWriter(tag, self.stream)


class _PrintWriter(SinkWriter):
    def __init__(self, tag: str, stream: TextIO | None) -> None:
        self.tag = tag
        self.stream = stream

    async def write(self, values: list[Any]) -> None:
        stream = self.stream or sys.stdout
        tag = self.tag
        stream.write("".join(f"{tag}{v}\n" for v in values))

    async def finish(self) -> None:
        (self.stream or sys.stdout).flush()
