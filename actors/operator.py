"""The operator protocol that a :class:`~actors.task.StreamTask` drives, and operator chains.

Lifecycle of an operator in one subtask, each step called by the task's actor only::

    setup(context, output)                 once, when the task is built
    initialize_state(restored)             once; restored state or None
    open()                                 once
    process_batch(values, timestamps, i)   per buffer of input i (never per record)
    process_watermark(watermark)           when the combined input watermark advances
    process_watermark_status(status)       when the combined input becomes idle or active
    fire_processing_timers(now_ms)         when a processing-time timer is due
    snapshot_state(checkpoint_id)          when the task takes a checkpoint
    notify_checkpoint_complete(id)         after checkpoint ``id`` completed everywhere
    notify_checkpoint_aborted(id)          after checkpoint ``id`` was given up
    end_input(i)                           input i ended (EndOfData with drain)
    finish()                               graceful end only: emit the last results
    close()                                always, also on failure and cancel: release resources

``finish()`` runs only when all inputs ended or on stop-with-savepoint ``--drain``; ``close()``
runs after it on a graceful end, and alone on failure or cancel. Records leave an operator through
its :class:`Output` (also in ``finish()``), never after ``close()``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.events import MIN_TIMESTAMP, Watermark, WatermarkStatus
from actors.timers import Clock
from actors.writer import RecordWriter
from state.keygroups import KeyGroupRange
from state.snapshot import OperatorSnapshot, RestoredState


class OperatorMetrics:
    """Records in and out of one operator in one subtask (read by the progress reporter), and
    the watermark and watermark status it last emitted (set by its :class:`Output`)."""

    __slots__ = (
        "idle",
        "late_records_dropped",
        "records_in",
        "records_out",
        "side_output_dropped",
        "watermark",
    )

    def __init__(self) -> None:
        self.records_in = 0
        self.records_out = 0
        self.late_records_dropped = 0
        """Records a window operator dropped as later than its allowed lateness (no late-data
        side output)."""
        self.side_output_dropped = 0
        """Records emitted to a side output that no stream reads (``get_side_output``)."""
        self.watermark = MIN_TIMESTAMP
        self.idle = False


class NewerOutputPolicy(enum.StrEnum):
    """What a two-phase-commit sink does with output that checkpoints newer than the restored one
    had already committed (a fallback to an older checkpoint, or a restore from an old savepoint).
    """

    MOVE = "move"
    """Move that output aside (where the sink can; a sink that cannot fails the restore)."""
    FAIL = "fail"
    """Fail the restore, naming the checkpoints and the output."""
    KEEP = "keep"
    """Leave it visible and replay on top of it: the user accepts duplicates."""


@dataclass(frozen=True)
class RestoreContext:
    """What one job attempt restores from, and the user's choices for state and output that do
    not fit. The same for every operator of the attempt; set by the job master."""

    checkpoint_id: int | None = None
    """The checkpoint or savepoint this attempt restores; None for a fresh start."""
    checkpoint_timestamp_ms: int | None = None
    """When ``checkpoint_id`` was taken (ids of different checkpoint directories may collide)."""
    newer_completed_checkpoints: tuple[int, ...] = ()
    """Checkpoints in the checkpoint directory that completed after ``checkpoint_id`` (all of
    them on a fresh start), valid or damaged: their side effects may have been committed."""
    allow_non_restored_state: bool = False
    """Restored state that does not fit the job is dropped (with a warning) instead of refused."""
    on_newer_committed_output: NewerOutputPolicy = NewerOutputPolicy.MOVE
    allow_existing_output: bool = False
    """A sink that starts without restored state may write where committed output already is."""
    checkpoint_dir: str | None = None
    """The job's ``--checkpoint-dir``; None when checkpoints stay in memory (nothing to restore)."""


@dataclass
class OperatorContext:
    """What an operator knows about where it runs."""

    operator_name: str
    operator_uid: str
    task_name: str
    subtask_index: int
    parallelism: int
    max_parallelism: int
    attempt: int
    params: dict[str, str]
    clock: Clock
    key_groups: KeyGroupRange
    scheduler: Any = None
    """Schedules processing-time timer mail on the owning task (a ``ProcessingTimeScheduler``)."""
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    checkpoint_interval_s: float | None = None
    source_position: Any = None
    """Set by the task: returns a description of the source position of the current buffer."""
    restore: RestoreContext = field(default_factory=RestoreContext)
    auto_watermark_interval_ms: int = 200
    """How often operators that generate watermarks emit them (0: only after records)."""

    @property
    def subtask_label(self) -> str:
        return f"{self.operator_name!r} (subtask {self.subtask_index + 1}/{self.parallelism})"


class Output(Protocol):
    async def emit(self, values: list[Any], timestamps: list[int] | None) -> None: ...

    async def emit_watermark(self, watermark: Watermark) -> None: ...

    async def emit_watermark_status(self, status: WatermarkStatus) -> None: ...


class UserFunctionError(RuntimeError):
    """User code raised inside an operator; names the operator, subtask and record."""

    def __init__(
        self,
        message: str,
        operator_name: str,
        subtask_index: int,
        cause: BaseException,
    ) -> None:
        super().__init__(message)
        self.operator_name = operator_name
        self.subtask_index = subtask_index
        self.cause = cause


def failing_record(exc: BaseException, values: list[Any]) -> tuple[int, Any] | None:
    """Find which element of ``values`` the user function was processing when ``exc`` was raised.

    Operators run user functions in comprehensions for speed; the comprehension's frame still holds
    its loop variable, so the record can be named without slowing the happy path.
    """
    tb = exc.__traceback__
    candidate: Any = _MISSING
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in {
            "<listcomp>",
            "<genexpr>",
            "process_batch",
            "_process_elements",
            "_process_unkeyed",
            "_map_values",
            "_map_and_filter",
            "_flat_map_values",
            "_run_buffer",
        }:
            for name in ("value", "v", "record"):
                if name in frame.f_locals:
                    candidate = frame.f_locals[name]
        tb = tb.tb_next
    if candidate is _MISSING:
        return None
    for index, value in enumerate(values):
        if value is candidate:
            return index, value
    return None


_MISSING: Any = object()


class StreamOperator:
    """Base class of every operator; subclasses override the hooks they need."""

    chaining_allowed = True

    def __init__(self, name: str, uid: str) -> None:
        self.name = name
        self.uid = uid
        self.context: OperatorContext
        self.output: Output
        self.side_outputs: dict[str, Output] = {}
        self.metrics = OperatorMetrics()

    def setup(
        self,
        context: OperatorContext,
        output: Output,
        side_outputs: dict[str, Output] | None = None,
    ) -> None:
        """``output`` takes the main output; ``side_outputs`` the consumers of each side output
        tag that a stream reads (by tag name). Watermarks go to both."""
        self.context = context
        self.side_outputs = side_outputs or {}
        self.output = WithSideOutputs(output, self.side_outputs) if self.side_outputs else output
        context.metrics = self.metrics

    async def emit_side(self, tag: str, values: list[Any], timestamps: list[int] | None) -> None:
        """Emit ``values`` to the side output ``tag``; dropped (and counted in
        ``metrics.side_output_dropped``) when no stream reads it."""
        if not values:
            return
        output = self.side_outputs.get(tag)
        if output is None:
            self.metrics.side_output_dropped += len(values)
            return
        await output.emit(values, timestamps)

    async def initialize_state(self, restored: RestoredState | None) -> None:
        """Create state, restoring from ``restored`` (this subtask's share) when given."""

    async def open(self) -> None:
        """Acquire resources; called once before the first record."""

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        raise NotImplementedError

    def carried_key_selector(self, input_index: int) -> Callable[[Any], Any] | None:
        """The key selector of input ``input_index`` whose keys this operator takes with a buffer
        (:meth:`process_keyed_batch`) instead of computing them; None when it takes none. The task
        hands it keys only from an edge partitioned by this very selector."""
        return None

    async def process_keyed_batch(
        self, values: list[Any], timestamps: list[int] | None, keys: list[Any], input_index: int
    ) -> None:
        """:meth:`process_batch` with each record's key, computed by the partitioner with the
        operator's :meth:`carried_key_selector` (and the records unchanged since)."""
        await self.process_batch(values, timestamps, input_index)

    async def process_watermark(self, watermark: Watermark) -> None:
        await self.output.emit_watermark(watermark)

    async def process_watermark_status(self, status: WatermarkStatus) -> None:
        """The combined input became idle or active again (see :class:`WatermarkStatus`)."""
        await self.output.emit_watermark_status(status)

    async def fire_processing_timers(self, now_ms: int) -> None:
        """Fire processing-time timers that are due; only keyed operators have any."""

    async def end_input(self, input_index: int) -> None:
        """Input ``input_index`` delivered EndOfData with drain: no more records will come on it."""

    async def finish(self) -> None:
        """Graceful end: emit any last results. Not called on failure, cancel or stop without drain."""

    async def close(self) -> None:
        """Release resources. Always called once, after ``finish()`` if that ran."""

    async def snapshot_state(self, checkpoint_id: int) -> OperatorSnapshot | None:
        """This subtask's state for checkpoint ``checkpoint_id``; ``None`` if stateless."""
        return None

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` completed; two-phase-commit operators commit here."""

    async def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` was aborted."""

    def user_error(
        self,
        exc: BaseException,
        values: list[Any] | None = None,
        failed_at: tuple[int, Any] | None = None,
    ) -> UserFunctionError:
        """Wrap an exception from user code with the operator, subtask and record it failed on:
        ``failed_at`` (index in its buffer, record) when the caller knows it, else the record of
        ``values`` found by :func:`failing_record`."""
        ctx = self.context
        where = f"operator {ctx.subtask_label}"
        detail = ""
        if failed_at is not None or values is not None:
            found = failed_at if failed_at is not None else failing_record(exc, values or [])
            if found is not None:
                index, record = found
                detail = f" on record {_short_repr(record)} (record {index + 1} of its buffer"
                position = ctx.source_position() if ctx.source_position else None
                detail += f"; source position {position})" if position else ")"
        msg = f"{where} failed{detail}: {type(exc).__name__}: {exc}"
        return UserFunctionError(msg, ctx.operator_name, ctx.subtask_index, exc)


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ChainedOutput:
    """Hands records to the next operator of the same chain, in the same task."""

    __slots__ = ("_next", "_owner")

    def __init__(self, owner: StreamOperator, next_operator: StreamOperator) -> None:
        self._owner = owner
        self._next = next_operator

    @property
    def next_operator(self) -> StreamOperator:
        return self._next

    async def emit(self, values: list[Any], timestamps: list[int] | None) -> None:
        if values:
            n = len(values)
            self._owner.metrics.records_out += n
            self._next.metrics.records_in += n
            await self._next.process_batch(values, timestamps, 0)

    async def emit_watermark(self, watermark: Watermark) -> None:
        self._owner.metrics.watermark = watermark.timestamp
        await self._next.process_watermark(watermark)

    async def emit_watermark_status(self, status: WatermarkStatus) -> None:
        self._owner.metrics.idle = status.idle
        await self._next.process_watermark_status(status)


class WriterOutput:
    """Sends records over the network edge(s) leaving the task."""

    __slots__ = ("_owner", "_writers")

    def __init__(self, owner: StreamOperator, writers: list[RecordWriter]) -> None:
        self._owner = owner
        self._writers = writers

    async def emit(self, values: list[Any], timestamps: list[int] | None) -> None:
        if values:
            self._owner.metrics.records_out += len(values)
            for writer in self._writers:
                await writer.emit(values, timestamps)

    async def emit_watermark(self, watermark: Watermark) -> None:
        self._owner.metrics.watermark = watermark.timestamp
        for writer in self._writers:
            await writer.broadcast_event(watermark)

    async def emit_watermark_status(self, status: WatermarkStatus) -> None:
        self._owner.metrics.idle = status.idle
        for writer in self._writers:
            await writer.broadcast_event(status)


class FanOutOutput:
    """Several consumers of one operator: chained ones and/or network edges."""

    __slots__ = ("_outputs",)

    def __init__(self, outputs: list[Output]) -> None:
        self._outputs = outputs

    async def emit(self, values: list[Any], timestamps: list[int] | None) -> None:
        for output in self._outputs:
            await output.emit(values, timestamps)

    async def emit_watermark(self, watermark: Watermark) -> None:
        for output in self._outputs:
            await output.emit_watermark(watermark)

    async def emit_watermark_status(self, status: WatermarkStatus) -> None:
        for output in self._outputs:
            await output.emit_watermark_status(status)


class WithSideOutputs:
    """The output of an operator whose side outputs are read: records go to the main output
    (the same ``emit``, no extra call), watermarks to the main and every side output, as in Flink."""

    __slots__ = ("_main", "_sides", "emit")

    def __init__(self, main: Output, sides: dict[str, Output]) -> None:
        self._main = main
        self._sides = list(sides.values())
        self.emit = main.emit

    async def emit_watermark(self, watermark: Watermark) -> None:
        await self._main.emit_watermark(watermark)
        for side in self._sides:
            await side.emit_watermark(watermark)

    async def emit_watermark_status(self, status: WatermarkStatus) -> None:
        await self._main.emit_watermark_status(status)
        for side in self._sides:
            await side.emit_watermark_status(status)


class DiscardingOutput:
    """The output of a sink: it has no consumers (the sink's watermark is still recorded)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: StreamOperator | None = None) -> None:
        self._owner = owner

    async def emit(self, values: list[Any], timestamps: list[int] | None) -> None:
        return None

    async def emit_watermark(self, watermark: Watermark) -> None:
        if self._owner is not None:
            self._owner.metrics.watermark = watermark.timestamp

    async def emit_watermark_status(self, status: WatermarkStatus) -> None:
        if self._owner is not None:
            self._owner.metrics.idle = status.idle
