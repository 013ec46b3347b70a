"""The control protocol: every message between tasks, the job master and the checkpoint coordinator.

Each message is a frozen dataclass registered with :func:`actors.wire.wire_message`, so the same
objects are handed over inside one process and encoded (msgpack, no pickle) between processes.
Messages carry ids (:class:`TaskId`: vertex id, subtask index, attempt), never object references.
Enum fields (:class:`TaskState`, :class:`~state.storage.CheckpointKind`) cross the wire as their
str value and are turned back into the enum by ``__post_init__``, so a decoded message compares
equal to the one sent and call sites keep comparing members (``report.state is TaskState.FINISHED``).

Reports (task → master): :class:`TaskStateChanged` (with a :class:`TaskFailureInfo` when FAILED),
:class:`AcknowledgeCheckpoint`, :class:`DeclineCheckpoint`, :class:`TaskMetrics`.

Commands (master → task): :class:`TriggerCheckpoint` (optionally a :class:`StopRequest`),
:class:`NotifyCheckpointComplete`, :class:`NotifyCheckpointAborted`, :class:`AddSplits`,
:class:`CancelTask`; :class:`CommandForTask` addresses one to a task over a connection that
serves several.

A task failure crosses as :class:`TaskFailureInfo` (:func:`failure_info`) and is rebuilt by
:func:`failure_from_info` as subclasses of the original classes (:class:`TaskFailure`,
``UserFunctionError``, ``RestoreRefusedError``), so that the job master's decisions (no restart
for a refused restore, the root cause, the text it prints) are the same as for a local failure.
"""

from __future__ import annotations

import enum
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.events import CheckpointBarrier
from actors.infrastructure import InfrastructureError, infrastructure_cause
from actors.operator import UserFunctionError
from actors.wire import wire_message
from state.refusal import RestoreRefusedError, restore_refusal
from state.storage import CheckpointKind


class TaskState(enum.StrEnum):
    CREATED = "created"
    INITIALIZING = "initializing"
    RUNNING = "running"
    FINISHING = "finishing"
    """Data ended and EndOfData was sent; waiting for the final checkpoint (FLIP-147)."""
    FINISHED = "finished"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in (TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELED)


@wire_message("control.task-id")
@dataclass(frozen=True, slots=True)
class TaskId:
    """One deployment of one subtask: attempts of the same subtask have different ids."""

    vertex_id: str
    subtask_index: int
    attempt: int

    @property
    def key(self) -> str:
        """``vertex/index``: the subtask across attempts (the key of checkpoint statistics)."""
        return f"{self.vertex_id}/{self.subtask_index}"

    def __str__(self) -> str:
        return f"{self.key} (attempt {self.attempt})"


# ------------------------------------------------------------------------------------ failures


class TaskFailure(RuntimeError):
    """A task failed for a reason other than user code (which raises ``UserFunctionError``)."""

    def __init__(self, message: str, task_name: str) -> None:
        super().__init__(message)
        self.task_name = task_name


class FailureCategory(enum.StrEnum):
    USER_FUNCTION = "user-function"
    """User code raised (``UserFunctionError``): the message names operator, subtask and record."""
    RESTORE_REFUSED = "restore-refused"
    """An operator refused its restore (``RestoreRefusedError`` along the causes): no restart."""
    INFRASTRUCTURE = "infrastructure"
    """Trouble outside the job's code (``InfrastructureError`` along the causes): the restart
    strategy decides; the CLI prints its one line."""
    TASK_FAILURE = "task-failure"
    """Anything else (``TaskFailure``): the restart strategy decides."""


@wire_message("control.task-failure")
@dataclass(frozen=True, slots=True)
class TaskFailureInfo:
    """A task failure as data; :func:`failure_from_info` rebuilds an equivalent exception."""

    category: FailureCategory
    message: str
    """``str()`` of the failure as the job master describes it (``describe_failure``)."""
    task_name: str
    operator_name: str = ""
    subtask_index: int = -1
    cause_type: str = ""
    """Class name of the underlying exception (the user's, or the refusal for a refused restore)."""
    cause_message: str = ""
    cause_traceback: str = ""
    """The formatted traceback of the underlying exception in the process where it was raised."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "category", FailureCategory(self.category))


class RemoteFailureCause(Exception):
    """The exception under a failure rebuilt from the wire: its type name, text and traceback."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class RemoteUserFunctionError(UserFunctionError):
    """A ``UserFunctionError`` raised in another process."""


class RemoteTaskFailure(TaskFailure):
    """A ``TaskFailure`` raised in another process."""


class RemoteRestoreRefusedError(RestoreRefusedError):
    """A ``RestoreRefusedError`` raised in another process (its text is the original's)."""


class RemoteInfrastructureError(InfrastructureError):
    """An ``InfrastructureError`` raised in another process (its text is the original's)."""


_KNOWN_CAUSES: tuple[tuple[FailureCategory, Callable[[BaseException], Exception | None]], ...] = (
    (FailureCategory.RESTORE_REFUSED, restore_refusal),
    (FailureCategory.INFRASTRUCTURE, infrastructure_cause),
)
"""Causes the job master and the CLI recognise along a failure's causes, first match wins; each
is rebuilt on the other side of the wire as the class of :data:`_REMOTE_KNOWN_CAUSES`."""

_REMOTE_KNOWN_CAUSES: dict[FailureCategory, Callable[[str], Exception]] = {
    FailureCategory.RESTORE_REFUSED: RemoteRestoreRefusedError,
    FailureCategory.INFRASTRUCTURE: RemoteInfrastructureError,
}


def failure_info(exc: BaseException, task_name: str = "") -> TaskFailureInfo:
    """``exc`` (what a task's ``run()`` raised) as data; ``task_name`` names the task when
    ``exc`` does not (a ``TaskFailure`` does)."""
    if isinstance(exc, TaskFailure):
        task_name = exc.task_name
    for category, find in _KNOWN_CAUSES:
        known = find(exc)
        if known is not None:
            return TaskFailureInfo(
                category,
                _describe(exc),
                task_name,
                cause_type=type(known).__name__,
                cause_message=str(known),
                cause_traceback=_format(known),
            )
    if isinstance(exc, UserFunctionError):
        return TaskFailureInfo(
            FailureCategory.USER_FUNCTION,
            str(exc),
            task_name,
            operator_name=exc.operator_name,
            subtask_index=exc.subtask_index,
            cause_type=type(exc.cause).__name__,
            cause_message=str(exc.cause),
            cause_traceback=_format(exc.cause),
        )
    cause = exc.__cause__ if isinstance(exc, TaskFailure) and exc.__cause__ is not None else exc
    return TaskFailureInfo(
        FailureCategory.TASK_FAILURE,
        _describe(exc),
        task_name,
        cause_type=type(cause).__name__,
        cause_message=str(cause),
        cause_traceback=_format(cause),
    )


def failure_from_info(info: TaskFailureInfo) -> UserFunctionError | TaskFailure:
    """The exception :func:`failure_info` described: same class family, same text."""
    known_cause = _REMOTE_KNOWN_CAUSES.get(info.category)
    if known_cause is not None:
        failure: UserFunctionError | TaskFailure = RemoteTaskFailure(info.message, info.task_name)
        failure.__cause__ = known_cause(info.cause_message)
        return failure
    cause = RemoteFailureCause(info.cause_type, info.cause_message, info.cause_traceback)
    if info.category is FailureCategory.USER_FUNCTION:
        failure = RemoteUserFunctionError(
            info.message, info.operator_name, info.subtask_index, cause
        )
    else:
        failure = RemoteTaskFailure(info.message, info.task_name)
    failure.__cause__ = cause
    return failure


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UserFunctionError | TaskFailure):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


# ------------------------------------------------------------------------------------ reports


@wire_message("control.task-state-changed")
@dataclass(frozen=True, slots=True)
class TaskStateChanged:
    task: TaskId
    state: TaskState
    failure: TaskFailureInfo | None = None
    """Set when ``state`` is FAILED."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", TaskState(self.state))


@wire_message("control.acknowledge-checkpoint")
@dataclass(frozen=True, slots=True)
class AcknowledgeCheckpoint:
    task: TaskId
    checkpoint_id: int
    snapshots: dict[str, bytes]
    """Operator uid → its encoded ``OperatorSnapshot`` (stateless operators are absent)."""
    finished: bool
    """Every operator of the task had finished (FLIP-147) when it took the snapshot."""
    alignment_ms: float
    snapshot_ms: float
    """How long the task took and encoded its operators' snapshots (Flink's synchronous part):
    it processed no record meanwhile."""


@wire_message("control.decline-checkpoint")
@dataclass(frozen=True, slots=True)
class DeclineCheckpoint:
    task: TaskId
    checkpoint_id: int
    reason: str
    task_ended: bool = False
    """The trigger reached a task that had already ended: the checkpoint must be retried with the
    new set of tasks, which is no checkpoint failure."""


@wire_message("control.operator-records")
@dataclass(frozen=True, slots=True)
class OperatorRecords:
    records_in: int
    records_out: int
    watermark: int | None = None
    """The watermark the operator last emitted in this subtask; None before the first."""
    idle: bool = False
    """Whether the watermark status it last emitted is idle."""
    late_records_dropped: int = 0


@wire_message("control.task-metrics")
@dataclass(frozen=True, slots=True)
class TaskMetrics:
    task: TaskId
    records: dict[str, OperatorRecords]
    """Operator uid → records in and out, in chain order."""
    source_lag: dict[str, int] | None = None
    """A source task's records behind the end of each split (Kafka: per ``topic[partition]``),
    when its reader can tell."""
    time_s: float = 0.0
    """The task's ``time.monotonic()`` when it made the report: rates come from two reports of
    the same task (one process, one clock)."""
    busy_ms: float = 0.0
    """Time since the task started that it was neither idle nor backpressured (Flink's busy
    time); the three add up to the task's age."""
    idle_ms: float = 0.0
    """Time it waited for input (a source: for data), or for its final checkpoint."""
    backpressured_ms: float = 0.0
    """Time it waited for room (credit) on an output channel."""
    buffers_in: int = 0
    buffers_out: int = 0
    """Buffers its input channels received, and its output channels sent."""
    input_queue: int = 0
    """Buffers queued at its input gate, not processed yet."""
    output_queue: int = 0
    """Buffers queued on its output channels, waiting for credit."""
    output_credit: int = 0
    """Credit its output channels hold: buffers the receivers can take at once."""
    input_watermark: int | None = None
    """The combined watermark of its inputs (None before the first, and for a source task)."""
    input_idle: bool = False
    """Every live input is idle."""
    last_alignment_ms: float | None = None
    """Barrier alignment of the last checkpoint it took (None before the first)."""
    last_snapshot_ms: float | None = None
    """How long it took the snapshot of its last checkpoint (None before the first)."""


# ------------------------------------------------------------------------------------ commands


@wire_message("control.stop-request")
@dataclass(frozen=True, slots=True)
class StopRequest:
    """Stop with savepoint: end the sources (draining or not) before taking the savepoint."""

    drain: bool


@wire_message("control.trigger-checkpoint")
@dataclass(frozen=True, slots=True)
class TriggerCheckpoint:
    checkpoint_id: int
    timestamp_ms: int
    kind: CheckpointKind = CheckpointKind.CHECKPOINT
    stop: StopRequest | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", CheckpointKind(self.kind))

    @property
    def barrier(self) -> CheckpointBarrier:
        return CheckpointBarrier(self.checkpoint_id, self.timestamp_ms, self.kind)


@wire_message("control.notify-checkpoint-complete")
@dataclass(frozen=True, slots=True)
class NotifyCheckpointComplete:
    checkpoint_id: int


@wire_message("control.notify-checkpoint-aborted")
@dataclass(frozen=True, slots=True)
class NotifyCheckpointAborted:
    checkpoint_id: int
    reason: str = ""


@wire_message("control.add-splits")
@dataclass(frozen=True, slots=True)
class AddSplits:
    """Splits that appeared while running (new partitions), for the head of a source task."""

    splits: tuple[Any, ...] = field(default=())


@wire_message("control.cancel-task")
@dataclass(frozen=True, slots=True)
class CancelTask:
    """Cancel the task: ``close()`` runs, ``finish()`` does not; it reports CANCELED."""

    reason: str = ""


TaskReport = TaskStateChanged | AcknowledgeCheckpoint | DeclineCheckpoint | TaskMetrics
TaskCommand = (
    TriggerCheckpoint | NotifyCheckpointComplete | NotifyCheckpointAborted | AddSplits | CancelTask
)


@wire_message("control.command-for-task")
@dataclass(frozen=True, slots=True)
class CommandForTask:
    """A command addressed to one task, for a connection that serves several tasks."""

    task: TaskId
    command: TaskCommand
