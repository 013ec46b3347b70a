"""The task actor: one parallel instance (subtask) of an operator chain.

A :class:`StreamTask` owns its operators, its input gate and its record writers; it is the only
coroutine that touches them. It serves control mail (checkpoint triggers and notices, timers) with
priority between buffers, and otherwise reads its input gate (or, for a source task, polls its
source) and pushes buffers through the chain.

Lifecycle (``TaskState``)::

    CREATED → INITIALIZING → RUNNING → FINISHING → FINISHED
                    │            │          │
                    └────────────┴──────────┴──→ FAILED | CANCELED

The end of a task follows FLIP-147:

1. Input ends: a source runs out of data, every input channel delivered ``EndOfData``, or a stop
   with savepoint reaches the source.
2. With drain (``EndOfData(drain=True)``): ``MAX_WATERMARK`` through the chain (fires event-time
   timers), ``end_input()`` and ``finish()`` on every operator, head to tail. Without drain: none.
3. Flush and send ``EndOfData`` downstream; state FINISHING. The task keeps serving checkpoints.
4. Wait until a checkpoint that this task took *after* step 3 completes (or, on a stop, that very
   savepoint), and, for a task with inputs, until every input channel delivered ``EndOfPartition``.
5. ``close()`` every operator, send ``EndOfPartition``, state FINISHED.

On failure or cancel only ``close()`` runs (never ``finish()``), and the exception propagates to the
job master, which fails over.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from actors.barriers import (
    AbortCheckpoint,
    Action,
    CheckpointBarrierHandler,
    CheckpointingMode,
)
from actors.barriers import TriggerCheckpoint as AlignedCheckpoint
from actors.events import (
    END_OF_PARTITION,
    MAX_TIMESTAMP,
    MAX_WATERMARK,
    MIN_TIMESTAMP,
    CancelCheckpointMarker,
    CheckpointBarrier,
    EndOfData,
    EndOfPartition,
    Event,
    Watermark,
    WatermarkStatus,
)
from actors.faults import InjectedCrash, crash_point
from actors.mailbox import Mailbox, MailboxState, Wakeup
from actors.network import Buffer, InputChannel, InputGate
from actors.operator import StreamOperator, UserFunctionError
from actors.protocol import (
    AcknowledgeCheckpoint,
    AddSplits,
    CancelTask,
    DeclineCheckpoint,
    NotifyCheckpointAborted,
    NotifyCheckpointComplete,
    OperatorRecords,
    TaskCommand,
    TaskFailureInfo,
    TaskId,
    TaskMetrics,
    TaskReport,
    TaskStateChanged,
    TriggerCheckpoint,
    failure_info,
)
from actors.protocol import TaskFailure as TaskFailure
from actors.protocol import TaskState as TaskState
from actors.timers import Cancellable, Clock, SystemClock
from actors.writer import RecordWriter
from state.serde import check_encodable
from state.snapshot import OperatorSnapshot, RestoredState

log = logging.getLogger(__name__)

DEFAULT_BUFFER_TIMEOUT_S = 0.005


class InputStatus(enum.Enum):
    MORE_AVAILABLE = "more-available"
    NOTHING_AVAILABLE = "nothing-available"
    END_OF_INPUT = "end-of-input"


class SourceOperatorBase(StreamOperator):
    """The head of a source task: the task calls :meth:`emit_next` instead of reading a gate.

    ``emit_next`` emits at most one buffer through ``self.output`` and must not block on I/O: when
    nothing is available it returns ``NOTHING_AVAILABLE`` and arranges for ``context.wakeup`` to be
    set when there is (or returns a wake-up time from :meth:`next_poll_delay`).
    """

    async def emit_next(self) -> InputStatus:
        raise NotImplementedError

    def next_poll_delay(self) -> float | None:
        """Seconds until polling again makes sense (e.g. a rate limit), or None to wait for wakeup."""
        return None

    def describe_position(self) -> str | None:
        return None

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        msg = "a source has no input"
        raise TypeError(msg)


@dataclass(frozen=True)
class ProcessingTimerMail:
    """A processing-time timer is due (task-internal: the task schedules it for itself)."""

    timestamp_ms: int


ProcessingCallback = Callable[[int], Awaitable[None]]
"""Called on the task's actor with the processing time it was scheduled for."""


@dataclass(frozen=True)
class ProcessingCallbackMail:
    """An operator's processing-time callback is due (periodic watermarks, idleness)."""

    timestamp_ms: int
    callback: ProcessingCallback


TaskCallback = Callable[[], Awaitable[None]]
"""Work that completed elsewhere (an async request), run on the task's actor."""


class TaskListener(Protocol):
    """Where a task's reports go (the job master, or a TaskManager's control connection).

    Called on the task's actor, in the order the task sends them; must not block."""

    def report(self, message: TaskReport) -> None: ...


class StreamTask:
    """An actor running one subtask of a job vertex. See the module docstring for the lifecycle."""

    def __init__(
        self,
        name: str,
        vertex_id: str,
        subtask_index: int,
        parallelism: int,
        operators: list[StreamOperator],
        gate: InputGate | None,
        writers: list[RecordWriter],
        listener: TaskListener,
        wakeup: Wakeup,
        *,
        restored: dict[str, RestoredState] | None = None,
        restored_finished: bool = False,
        checkpointing_mode: CheckpointingMode = CheckpointingMode.EXACTLY_ONCE,
        buffer_timeout_s: float = DEFAULT_BUFFER_TIMEOUT_S,
        num_inputs: int = 1,
        attempt: int = 0,
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self.task_id = TaskId(vertex_id, subtask_index, attempt)
        self.vertex_id = vertex_id
        self.subtask_index = subtask_index
        self.parallelism = parallelism
        self.operators = operators
        self.head = operators[0]
        self.gate = gate
        self.writers = writers
        self.listener = listener
        self.wakeup = wakeup
        self.mailbox = Mailbox(name, wakeup)
        self.state = TaskState.CREATED
        self._restored = restored or {}
        self._restored_finished = restored_finished
        self._buffer_timeout_s = buffer_timeout_s
        self._last_flush = time.monotonic()
        self._num_inputs = num_inputs
        self._operators_finished = False
        self._finishing_snapshots: list[int] = []
        self._final_checkpoint_done = False
        self._stop_savepoint_id: int | None = None
        self._rpc_trigger: TriggerCheckpoint | None = None
        self.clock: Clock = clock if clock is not None else SystemClock()
        """Processing time of this task's timers and callbacks (see :class:`Clock`)."""
        self._timer_handles: set[Cancellable] = set()
        self._callbacks: deque[tuple[int, TaskCallback]] = deque()
        """What :meth:`run_on_task` queued, with the chain position of the operator it is for."""
        self._callback_queued = asyncio.Event()
        self._chain_positions = {id(op): index for index, op in enumerate(operators)}
        self._started_s: float | None = None
        """When :meth:`run` began (``time.monotonic()``); the busy, idle and backpressured
        times add up to the time since."""
        self._ended_s: float | None = None
        self._idle_s = 0.0
        """Time spent in waits that ended for input, data or the final checkpoint."""
        self._idle_since: float | None = None
        self._last_alignment_ms: float | None = None
        self._last_snapshot_ms: float | None = None
        self._runner: asyncio.Task[Any] | None = None
        self._closed = False
        self.is_source = isinstance(self.head, SourceOperatorBase)
        self.carried_key_inputs: frozenset[int] = frozenset()
        """Inputs whose buffers' keys the head operator takes (``process_keyed_batch``): set by
        whoever builds the task, for inputs partitioned by the head's own key selector."""
        self.source_ended = False
        if gate is not None:
            n = len(gate.channels)
            self._channel_watermark = [MIN_TIMESTAMP] * n
            self._channel_end_of_data: list[bool | None] = [None] * n
            self._channel_idle = [False] * n
            self._inputs_idle = False
            """The last watermark status forwarded: all live inputs are idle."""
            self._current_watermark = MIN_TIMESTAMP
            self.barrier_handler = CheckpointBarrierHandler(
                n, checkpointing_mode, gate.block, gate.unblock_all, _now_ms
            )

    def __repr__(self) -> str:
        return f"<StreamTask {self.name} {self.state.value}>"

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Run the task to its end. Raises on failure; ``CancelledError`` on cancel."""
        self._runner = asyncio.current_task()
        self._started_s = time.monotonic()
        try:
            self._set_state(TaskState.INITIALIZING)
            if self._restored_finished:
                await self._run_restored_finished()
            else:
                await self._initialize()
                self._set_state(TaskState.RUNNING)
                if self.is_source:
                    await self._run_source()
                else:
                    await self._run_input()
                await self._close_operators()
            await self._broadcast(END_OF_PARTITION)
            self.mailbox.close()
            self._set_state(TaskState.FINISHED)
        # The last state is reported even when a cancel cuts the closing short (the attempt is
        # cancelled while this task closes after its failure): a task in another process is
        # known to have ended only by that report.
        except asyncio.CancelledError:
            try:
                await self._close_after_error()
            finally:
                self._set_state(TaskState.CANCELED)
            raise
        except UserFunctionError as exc:
            try:
                await self._close_after_error()
            finally:
                self._set_state(TaskState.FAILED, failure_info(exc, self.name))
            raise
        except Exception as exc:
            msg = f"task {self.name} failed: {type(exc).__name__}: {exc}"
            failure = TaskFailure(msg, self.name)
            failure.__cause__ = exc
            try:
                await self._close_after_error()
            finally:
                self._set_state(TaskState.FAILED, failure_info(failure))
            raise failure from exc

    async def _initialize(self) -> None:
        for op in self.operators:
            op.context.source_position = self._source_position
            await op.initialize_state(self._restored.get(op.uid))
        # Open tail first, so that no operator emits into one that is not open yet.
        for op in reversed(self.operators):
            await op.open()

    async def _run_restored_finished(self) -> None:
        """Every operator of this task had finished in the restored checkpoint (FLIP-147).

        They are not run again: their state is handed to ``initialize_state`` (so a two-phase
        sink can commit what the checkpoint says was pending), and nothing else is called: no
        ``open()``, so no ``close()`` either (``initialize_state`` releases what it acquires).
        The consumers get ``MAX_WATERMARK`` and ``EndOfData`` at once.
        """
        for op in self.operators:
            await op.initialize_state(self._restored.get(op.uid))
        self._closed = True
        self._operators_finished = True
        await self._broadcast(MAX_WATERMARK)
        await self._broadcast(EndOfData(drain=True))

    async def _close_operators(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in self._timer_handles:
            handle.cancel()
        self._timer_handles.clear()
        for op in self.operators:
            await op.close()

    async def _close_after_error(self) -> None:
        self.mailbox.close()
        if self._closed:
            return
        self._closed = True
        for handle in self._timer_handles:
            handle.cancel()
        self._timer_handles.clear()
        # A cancel that arrives while closing (the job is cancelled while this task fails, as on
        # SIGTERM) must not cut close() short: a sink would lose what it buffered. A second
        # cancel (a forced exit) does.
        closing = asyncio.ensure_future(self._close_each_operator())
        try:
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                await closing
                raise
        finally:
            for writer in self.writers:
                writer.release()

    async def _close_each_operator(self) -> None:
        for op in self.operators:
            try:
                await op.close()
            except Exception:
                log.exception("%s: close() of operator %r failed", self.name, op.name)

    def _set_state(self, state: TaskState, failure: TaskFailureInfo | None = None) -> None:
        self.state = state
        if state.is_terminal:
            self._ended_s = time.monotonic()
        self.listener.report(TaskStateChanged(self.task_id, state, failure))

    def _source_position(self) -> str | None:
        if self.is_source:
            head = self.head
            assert isinstance(head, SourceOperatorBase)
            return head.describe_position()
        return None

    # ---------------------------------------------------------------- main loops

    def _waiting_for_end(self) -> bool:
        """Step 4 of the end: true while the task must stay alive."""
        if self.state is not TaskState.FINISHING:
            return True
        if not self._final_checkpoint_done:
            return True
        return self.gate is not None and not all(c.ended for c in self.gate.channels)

    async def _run_source(self) -> None:
        head = self.head
        assert isinstance(head, SourceOperatorBase)
        while self._waiting_for_end():
            self.wakeup.clear()
            await self._drain_mail()
            if not self._waiting_for_end():
                break
            if self.state is TaskState.FINISHING or self.source_ended:
                await self._idle()
                continue
            status = await head.emit_next()
            if status is InputStatus.MORE_AVAILABLE:
                await self._flush_if_timed_out()
                # Awaiting work that never blocks does not yield: let the other actors run.
                await asyncio.sleep(0)
            elif status is InputStatus.NOTHING_AVAILABLE:
                await self._idle(head.next_poll_delay())
            else:
                self.source_ended = True
                await self._end_of_data(drain=True)

    async def _run_input(self) -> None:
        gate = self.gate
        assert gate is not None
        gate.open()
        head = self.head
        while self._waiting_for_end():
            self.wakeup.clear()
            await self._drain_mail()
            if not self._waiting_for_end():
                break
            polled = gate.poll_next()
            if polled is None:
                if self._rpc_trigger is not None and all(c.ended for c in gate.channels):
                    trigger, self._rpc_trigger = self._rpc_trigger, None
                    await self._perform_checkpoint(trigger.barrier, 0.0)
                    continue
                await self._idle()
                continue
            channel, item = polled
            if type(item) is Buffer:
                head.metrics.records_in += len(item.values)
                keys = item.keys
                if keys is not None and channel.input_index in self.carried_key_inputs:
                    await head.process_keyed_batch(
                        item.values, item.timestamps, keys, channel.input_index
                    )
                else:
                    await head.process_batch(item.values, item.timestamps, channel.input_index)
                channel.recycle()
                await self._flush_if_timed_out()
                await asyncio.sleep(0)
            else:
                await self._on_event(channel, item)  # type: ignore[arg-type]

    async def _idle(self, delay: float | None = None) -> None:
        """Sleep until mail or input arrives, flushing partial buffers after the buffer timeout.

        The sleep counts as idle time; the flush, which may wait for credit, does not."""
        if any(w.has_pending for w in self.writers):
            remaining = self._buffer_timeout_s - (time.monotonic() - self._last_flush)
            timeout = remaining if delay is None else min(remaining, delay)
            if timeout <= 0 or not await self._wait_idle(timeout):
                await self._flush_writers()
            return
        await self._wait_idle(delay)

    async def _wait_idle(self, timeout: float | None) -> bool:
        started = self._idle_since = time.monotonic()
        try:
            return await self.wakeup.wait(timeout)
        finally:
            self._idle_since = None
            self._idle_s += time.monotonic() - started

    async def _flush_if_timed_out(self) -> None:
        if time.monotonic() - self._last_flush >= self._buffer_timeout_s:
            await self._flush_writers()

    async def _flush_writers(self) -> None:
        self._last_flush = time.monotonic()
        for writer in self.writers:
            await writer.flush()

    async def _broadcast(self, event: Event) -> None:
        self._last_flush = time.monotonic()
        for writer in self.writers:
            await writer.broadcast_event(event)

    # ---------------------------------------------------------------- events

    async def _on_event(self, channel: InputChannel, event: Event) -> None:
        kind = type(event)
        if kind is Watermark:
            assert isinstance(event, Watermark)
            index = channel.index
            if event.timestamp > self._channel_watermark[index]:
                self._channel_watermark[index] = event.timestamp
                await self._advance_watermark()
        elif kind is WatermarkStatus:
            assert isinstance(event, WatermarkStatus)
            index = channel.index
            if event.idle != self._channel_idle[index]:
                self._channel_idle[index] = event.idle
                await self._update_watermark_status()
        elif kind is CheckpointBarrier:
            assert isinstance(event, CheckpointBarrier)
            await self._run_actions(self.barrier_handler.on_barrier(channel.index, event))
        elif kind is CancelCheckpointMarker:
            assert isinstance(event, CancelCheckpointMarker)
            await self._run_actions(self.barrier_handler.on_cancel_marker(event.checkpoint_id))
        elif kind is EndOfData:
            assert isinstance(event, EndOfData)
            await self._on_end_of_data(channel, event.drain)
        elif kind is EndOfPartition:
            if self._channel_end_of_data[channel.index] is None:
                await self._on_end_of_data(channel, True)
            await self._run_actions(self.barrier_handler.on_end_of_partition(channel.index))

    async def _advance_watermark(self) -> None:
        """Forward the combined watermark if it advanced (Flink's ``StatusWatermarkValve``).

        The minimum over the live (not ended) active inputs; with every live input idle, the
        maximum over them (nothing holds the others back: Flink's flush when all inputs become
        idle, also for watermarks that idle inputs send later), where an idle input's end of
        input (``MAX_WATERMARK``, its ``EndOfData`` follows) counts only if all are there; with
        every input ended, the maximum over all. It never goes backwards: an input that becomes
        active again behind it takes part only once it has caught up.
        """
        active: list[int] = []
        idle: list[int] = []
        idle_at_end = False
        for wm, ended, is_idle in zip(
            self._channel_watermark, self._channel_end_of_data, self._channel_idle, strict=True
        ):
            if ended is None:
                if not is_idle:
                    active.append(wm)
                elif wm < MAX_TIMESTAMP:
                    idle.append(wm)
                else:
                    idle_at_end = True
        if active:
            combined = min(active)
        elif idle:
            combined = max(idle)
        elif idle_at_end:
            combined = MAX_TIMESTAMP
        else:
            combined = max(self._channel_watermark, default=MIN_TIMESTAMP)
        if combined > self._current_watermark:
            self._current_watermark = combined
            await self.head.process_watermark(Watermark(combined))

    async def _update_watermark_status(self) -> None:
        """Forward IDLE when every live input is idle, ACTIVE when one of them is no more; and the
        watermark the change lets through (the flush when they all became idle, first)."""
        live_idle = [
            is_idle
            for is_idle, ended in zip(self._channel_idle, self._channel_end_of_data, strict=True)
            if ended is None
        ]
        idle = bool(live_idle) and all(live_idle)
        if idle:
            await self._advance_watermark()
        if idle != self._inputs_idle:
            self._inputs_idle = idle
            await self.head.process_watermark_status(WatermarkStatus(idle))
        if not idle:
            await self._advance_watermark()

    async def _on_end_of_data(self, channel: InputChannel, drain: bool) -> None:
        assert self.gate is not None
        self._channel_end_of_data[channel.index] = drain
        channels = self.gate.channels
        same_input = [c for c in channels if c.input_index == channel.input_index]
        if all(self._channel_end_of_data[c.index] is not None for c in same_input):
            if all(self._channel_end_of_data[c.index] for c in same_input):
                await self.head.end_input(channel.input_index)
        if all(flag is not None for flag in self._channel_end_of_data):
            await self._end_of_data(drain=all(self._channel_end_of_data))
        else:
            # The ended input no longer counts: the others may now all be idle, or be ahead.
            await self._update_watermark_status()

    async def _end_of_data(self, drain: bool) -> None:
        """Steps 2 and 3 of the end of a task (see the module docstring)."""
        if self.state is not TaskState.RUNNING:
            return
        if drain:
            if self.is_source or self._current_watermark < MAX_TIMESTAMP:
                if not self.is_source:
                    self._current_watermark = MAX_TIMESTAMP
                await self.head.process_watermark(MAX_WATERMARK)
            for index, op in enumerate(self.operators):
                if index > 0 or self.is_source:
                    await op.end_input(0)
                await op.finish()
            self._operators_finished = True
        await self._flush_writers()
        await self._broadcast(EndOfData(drain=drain))
        self._set_state(TaskState.FINISHING)

    # ---------------------------------------------------------------- commands and mail

    def handle_command(self, command: TaskCommand) -> bool:
        """Take a command of the job master; False when the task can take none any more.

        ``CancelTask`` cancels the task's coroutine at once (also while it waits for credit);
        every other command is mail, served between buffers in the order it arrived.
        """
        if type(command) is CancelTask:
            runner = self._runner
            if runner is None or runner.done():
                return False
            runner.cancel(command.reason or None)
            return True
        return self.mailbox.try_put(command)

    def metrics_report(self) -> TaskMetrics:
        """Records in and out per operator so far, a source task's lag per split, and the task's
        cumulative busy, idle and backpressured time, buffers, queues and input watermark.

        Times are measured around the waits only (two clock reads per wait, none per record);
        a wait in progress counts up to now."""
        lag = None
        if self.state in (TaskState.RUNNING, TaskState.FINISHING):
            reader_lag = getattr(getattr(self.head, "reader", None), "lag", None)
            if reader_lag is not None:
                lag = reader_lag()
        now = time.monotonic()
        until = self._ended_s if self._ended_s is not None else now
        subpartitions = [sub for writer in self.writers for sub in writer.subpartitions]
        backpressured_s = sum(sub.backpressured_until(until) for sub in subpartitions)
        idle_s = self._idle_s
        if self._idle_since is not None:
            idle_s += max(0.0, until - self._idle_since)
        age_s = until - self._started_s if self._started_s is not None else 0.0
        channels = self.gate.channels if self.gate is not None else []
        input_watermark = None
        if self.gate is not None and self._current_watermark != MIN_TIMESTAMP:
            input_watermark = self._current_watermark
        return TaskMetrics(
            self.task_id,
            {
                op.uid: OperatorRecords(
                    op.metrics.records_in,
                    op.metrics.records_out,
                    None if op.metrics.watermark == MIN_TIMESTAMP else op.metrics.watermark,
                    op.metrics.idle,
                    late_records_dropped=op.metrics.late_records_dropped,
                )
                for op in self.operators
            },
            lag,
            time_s=now,
            busy_ms=max(0.0, age_s - idle_s - backpressured_s) * 1000.0,
            idle_ms=idle_s * 1000.0,
            backpressured_ms=backpressured_s * 1000.0,
            buffers_in=sum(c.buffers_received for c in channels),
            buffers_out=sum(sub.buffers_sent for sub in subpartitions),
            input_queue=sum(c.queued_buffers for c in channels),
            output_queue=sum(sub.queued_buffers for sub in subpartitions),
            output_credit=sum(sub.credit for sub in subpartitions),
            input_watermark=input_watermark,
            input_idle=self.gate is not None and self._inputs_idle,
            last_alignment_ms=self._last_alignment_ms,
            last_snapshot_ms=self._last_snapshot_ms,
        )

    async def _drain_mail(self) -> None:
        if self._callbacks:
            if self.state is TaskState.RUNNING and not self._closed:
                await self._run_callbacks(0)
            else:
                # Once the input ended no record may leave the task any more (a stop without
                # drain snapshots what is still pending); after close nothing runs.
                self._callbacks.clear()
        mailbox = self.mailbox
        while mailbox.has_mail():
            mail = mailbox.take_nowait()
            if mail is None:
                return
            await self._handle_mail(mail)

    async def _handle_mail(self, mail: Any) -> None:
        kind = type(mail)
        if kind is TriggerCheckpoint:
            await self._on_trigger(mail)
        elif kind is NotifyCheckpointComplete:
            await self._on_checkpoint_complete(mail.checkpoint_id)
        elif kind is NotifyCheckpointAborted:
            await self._on_checkpoint_aborted(mail.checkpoint_id, mail.reason)
        elif kind is ProcessingTimerMail:
            if not self._closed:
                for op in self.operators:
                    await op.fire_processing_timers(mail.timestamp_ms)
        elif kind is ProcessingCallbackMail:
            # Once the input ended (FINISHING) the last watermark was sent: like Flink's quiesced
            # processing-time service, nothing periodic runs any more (no watermark may follow a
            # stop without drain).
            if not self._closed and self.state is TaskState.RUNNING:
                await mail.callback(mail.timestamp_ms)
        elif kind is AddSplits:
            add = getattr(self.head, "add_splits", None)
            if add is None:
                msg = f"{self.name}: head operator {self.head.name!r} takes no splits"
                raise TypeError(msg)
            add(list(mail.splits))
        else:
            msg = f"{self.name}: unknown mail {mail!r}"
            raise TypeError(msg)

    async def _on_trigger(self, trigger: TriggerCheckpoint) -> None:
        if trigger.stop is not None:
            self._stop_savepoint_id = trigger.checkpoint_id
            if self.state is TaskState.RUNNING and self.is_source:
                self.source_ended = True
                await self._end_of_data(drain=trigger.stop.drain)
        if self.gate is not None and not all(c.ended for c in self.gate.channels):
            # Triggered because every upstream task finished: the barrier goes behind the data
            # still queued in the channels, so that no record is left out of the snapshot.
            self._rpc_trigger = trigger
            return
        await self._perform_checkpoint(trigger.barrier, 0.0)

    async def _run_actions(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, AlignedCheckpoint):
                await self._perform_checkpoint(action.barrier, action.alignment_ms)
            elif isinstance(action, AbortCheckpoint):
                await self._broadcast(CancelCheckpointMarker(action.checkpoint_id))

    async def _perform_checkpoint(self, barrier: CheckpointBarrier, alignment_ms: float) -> None:
        checkpoint_id = barrier.checkpoint_id
        crash_point("before-snapshot", f"{self.name}, checkpoint {checkpoint_id}")
        snapshots: dict[str, bytes] = {}
        started_s = time.monotonic()
        try:
            for op in self.operators:
                snapshot = await op.snapshot_state(checkpoint_id)
                if snapshot is not None:
                    snapshots[op.uid] = encode_snapshot(op.name, self.subtask_index, snapshot)
        except (UserFunctionError, InjectedCrash, asyncio.CancelledError):
            raise
        except Exception as exc:
            reason = f"{self.name}: snapshot for checkpoint {checkpoint_id} failed: {exc}"
            log.warning("%s", reason)
            await self._broadcast(CancelCheckpointMarker(checkpoint_id))
            self.listener.report(DeclineCheckpoint(self.task_id, checkpoint_id, reason))
            return
        snapshot_ms = (time.monotonic() - started_s) * 1000.0
        await self._broadcast(barrier)
        self._last_alignment_ms = alignment_ms
        self._last_snapshot_ms = snapshot_ms
        if self.state is TaskState.FINISHING:
            self._finishing_snapshots.append(checkpoint_id)
        self.listener.report(
            AcknowledgeCheckpoint(
                self.task_id,
                checkpoint_id,
                snapshots,
                self._operators_finished,
                alignment_ms,
                snapshot_ms,
            )
        )

    async def _on_checkpoint_complete(self, checkpoint_id: int) -> None:
        if self._closed:
            return
        for op in self.operators:
            await op.notify_checkpoint_complete(checkpoint_id)
        if self.state is not TaskState.FINISHING:
            return
        if self._stop_savepoint_id is not None:
            if checkpoint_id >= self._stop_savepoint_id:
                self._final_checkpoint_done = True
        elif self._finishing_snapshots and checkpoint_id >= self._finishing_snapshots[0]:
            self._final_checkpoint_done = True

    async def _on_checkpoint_aborted(self, checkpoint_id: int, reason: str) -> None:
        if self.gate is not None:
            await self._run_actions(self.barrier_handler.abort_pending(reason))
        if self._closed:
            return
        for op in self.operators:
            await op.notify_checkpoint_aborted(checkpoint_id)
        if self._stop_savepoint_id == checkpoint_id:
            msg = (
                f"{self.name}: the stop-with-savepoint {checkpoint_id} failed ({reason}); "
                "the job fails over to its latest checkpoint"
            )
            raise StopWithSavepointFailed(msg)

    # ---------------------------------------------------------------- timers

    def schedule_processing_timer(self, timestamp_ms: int) -> None:
        """Deliver ``ProcessingTimerMail`` when the task's clock reaches ``timestamp_ms``."""
        self._schedule_mail(timestamp_ms, ProcessingTimerMail(timestamp_ms))

    def schedule_processing_callback(self, timestamp_ms: int, callback: ProcessingCallback) -> None:
        """Run ``callback(timestamp_ms)`` on this task's actor, between buffers, when the task's
        clock reaches ``timestamp_ms``; only while the task is RUNNING (not after its input
        ended)."""
        self._schedule_mail(timestamp_ms, ProcessingCallbackMail(timestamp_ms, callback))

    # ---------------------------------------------------------------- callbacks

    def run_on_task(self, callback: TaskCallback, operator: StreamOperator) -> bool:
        """Run ``callback()`` on this task's actor for ``operator`` (any coroutine or loop callback
        may call this; it must not block): between buffers while the task is RUNNING, or inside a
        :meth:`yield_to_callbacks` of ``operator`` or of an operator before it in the chain.
        Exceptions it raises fail the task. Callbacks still queued when the input ended or the
        task closed are dropped (an operator that needs its work back waits for it in
        ``finish()``, or snapshots it); False once the task takes none any more."""
        if self._closed or self.mailbox.state is not MailboxState.OPEN:
            return False
        self._callbacks.append((self._chain_positions[id(operator)], callback))
        self._callback_queued.set()
        self.wakeup.set()
        return True

    async def yield_to_callbacks(self, operator: StreamOperator) -> None:
        """Called by ``operator`` inside one of its calls (``process_batch``, ``finish``...) that
        cannot go on before work it started elsewhere is back: waits until a callback of it, or
        of an operator after it in the chain, is queued and runs those queued (Flink's mailbox
        ``yield``). Nothing else runs meanwhile: no checkpoint, no timer, and no callback of an
        operator before it, which would hand it records while it is midway through a call."""
        position = self._chain_positions[id(operator)]
        while not any(index >= position for index, _ in self._callbacks):
            self._callback_queued.clear()
            await self._callback_queued.wait()
        await self._run_callbacks(position)

    async def _run_callbacks(self, position: int) -> None:
        """Run the queued callbacks of operators at ``position`` or later in the chain, one at a
        time and each taken off the queue only when it runs: a callback that waits in a
        :meth:`yield_to_callbacks` of its own finds those queued after it."""
        queued = self._callbacks
        while queued:
            if queued[0][0] >= position:
                callback = queued.popleft()[1]
            else:
                found = next((i for i, entry in enumerate(queued) if entry[0] >= position), None)
                if found is None:
                    return
                callback = queued[found][1]
                del queued[found]
            await callback()

    def _schedule_mail(self, timestamp_ms: int, mail: Any) -> None:
        mailbox = self.mailbox
        handles = self._timer_handles
        scheduled: list[Cancellable] = []

        def deliver() -> None:
            if scheduled:
                handles.discard(scheduled[0])
            mailbox.try_put(mail)

        scheduled.append(self.clock.call_at(timestamp_ms, deliver))
        handles.add(scheduled[0])


def encode_snapshot(operator_name: str, subtask_index: int, snapshot: OperatorSnapshot) -> bytes:
    """msgpack-encode an operator snapshot now, so that later changes of state objects cannot
    reach the checkpoint; a value msgpack cannot encode is named by state and type."""
    try:
        return snapshot.encode()
    except (TypeError, ValueError, OverflowError):
        for part, entries in snapshot.parts():
            for name, entry in entries.items():
                check_encodable(
                    entry,
                    f"operator {operator_name!r} subtask {subtask_index}: {part} state {name!r}",
                )
        raise


class StopWithSavepointFailed(RuntimeError):
    """The savepoint of a stop-with-savepoint was aborted after the sources stopped."""


def _now_ms() -> float:
    return time.monotonic() * 1000.0


Notify = Callable[[], None]
