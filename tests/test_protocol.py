"""The control protocol: every message round-trips the wire; failures are rebuilt as their kind."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

import actors.protocol as protocol
from actors.infrastructure import InfrastructureError, infrastructure_cause
from actors.operator import UserFunctionError
from actors.protocol import (
    AcknowledgeCheckpoint,
    AddSplits,
    CancelTask,
    CommandForTask,
    DeclineCheckpoint,
    FailureCategory,
    NotifyCheckpointAborted,
    NotifyCheckpointComplete,
    OperatorRecords,
    StopRequest,
    TaskFailure,
    TaskFailureInfo,
    TaskId,
    TaskMetrics,
    TaskState,
    TaskStateChanged,
    TriggerCheckpoint,
    failure_from_info,
    failure_info,
)
from actors.wire import decode_message, encode_message
from runtime.master.jobmaster import describe_failure, root_cause
from state.keyed import IncompatibleStateError
from state.refusal import RestoreRefusedError, restore_refusal
from state.storage import CheckpointKind

TASK = TaskId("map", 2, 3)

SAMPLES: dict[type, Any] = {
    TaskId: TASK,
    TaskFailureInfo: TaskFailureInfo(
        FailureCategory.USER_FUNCTION,
        "operator 'parse' (subtask 1/2) failed: ValueError: bad",
        "parse (1/2)",
        operator_name="parse",
        subtask_index=0,
        cause_type="ValueError",
        cause_message="bad",
        cause_traceback="Traceback (most recent call last):\n...",
    ),
    TaskStateChanged: TaskStateChanged(
        TASK,
        TaskState.FAILED,
        TaskFailureInfo(FailureCategory.TASK_FAILURE, "task x failed: OSError: disk", "x"),
    ),
    AcknowledgeCheckpoint: AcknowledgeCheckpoint(
        TASK, 7, {"map-uid": b"\x81\xa1k\x01", "sink-uid": b""}, True, 12.5, 3.75
    ),
    DeclineCheckpoint: DeclineCheckpoint(TASK, 7, "snapshot failed: disk full", task_ended=True),
    OperatorRecords: OperatorRecords(10, 9, 1_700_000_000_000, idle=True),
    TaskMetrics: TaskMetrics(
        TASK,
        {"src": OperatorRecords(0, 100), "map": OperatorRecords(100, 99)},
        {"events[0]": 5, "events[1]": 0},
        time_s=1234.5,
        busy_ms=100.0,
        idle_ms=20.5,
        backpressured_ms=3.25,
        buffers_in=7,
        buffers_out=6,
        input_queue=2,
        output_queue=1,
        output_credit=4,
        input_watermark=1_700_000_000_000,
        input_idle=True,
        last_alignment_ms=1.5,
        last_snapshot_ms=0.5,
    ),
    StopRequest: StopRequest(drain=True),
    TriggerCheckpoint: TriggerCheckpoint(
        8, 1_700_000_000_123, CheckpointKind.SAVEPOINT, StopRequest(drain=False)
    ),
    NotifyCheckpointComplete: NotifyCheckpointComplete(8),
    NotifyCheckpointAborted: NotifyCheckpointAborted(8, "expired after 10s"),
    AddSplits: AddSplits(({"topic": "events", "partition": 4, "offset": 0}, "file-3.jsonl")),
    CancelTask: CancelTask("the job attempt ended"),
    CommandForTask: CommandForTask(TASK, NotifyCheckpointAborted(9, "subsumed")),
}


def _protocol_dataclasses() -> set[type]:
    return {
        obj
        for _, obj in inspect.getmembers(protocol, inspect.isclass)
        if dataclasses.is_dataclass(obj) and obj.__module__ == protocol.__name__
    }


def test_every_message_class_has_a_sample() -> None:
    """A message added to the protocol must be added here, so that it is round-tripped too."""
    assert _protocol_dataclasses() == set(SAMPLES)


@pytest.mark.parametrize("cls", sorted(SAMPLES, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_message_round_trips_the_wire(cls: type) -> None:
    message = SAMPLES[cls]
    assert type(message) is cls
    back = decode_message(encode_message(message))
    assert back == message
    assert type(back) is cls


def test_enums_come_back_as_members() -> None:
    state = decode_message(encode_message(TaskStateChanged(TASK, TaskState.FINISHING)))
    assert state.state is TaskState.FINISHING
    trigger = decode_message(encode_message(TriggerCheckpoint(1, 2, CheckpointKind.SAVEPOINT)))
    assert trigger.kind is CheckpointKind.SAVEPOINT
    assert trigger.barrier.kind is CheckpointKind.SAVEPOINT
    assert decode_message(encode_message(SAMPLES[TaskFailureInfo])).category is (
        FailureCategory.USER_FUNCTION
    )


def test_task_id_keys_the_subtask_across_attempts() -> None:
    assert TASK.key == "map/2"
    assert TaskId("map", 2, 4).key == TASK.key
    assert TaskId("map", 2, 4) != TASK


# ------------------------------------------------------------------------------------ failures


def _user_failure() -> BaseException:
    def fail() -> None:
        try:
            int("x")
        except ValueError as exc:
            msg = f"operator 'parse' (subtask 1/2) failed: ValueError: {exc}"
            raise UserFunctionError(msg, "parse", 0, exc) from exc

    with pytest.raises(UserFunctionError) as raised:
        fail()
    return raised.value


def _task_failure(cause: BaseException) -> BaseException:
    """As ``StreamTask.run`` wraps what is not user code."""

    def fail() -> None:
        try:
            raise cause
        except Exception as exc:
            msg = f"task sink (1/1) failed: {type(exc).__name__}: {exc}"
            raise TaskFailure(msg, "sink (1/1)") from exc

    with pytest.raises(TaskFailure) as raised:
        fail()
    return raised.value


def _over_the_wire(exc: BaseException, task_name: str = "") -> BaseException:
    info = decode_message(encode_message(failure_info(exc, task_name)))
    return failure_from_info(info)


def test_a_user_function_error_is_rebuilt_as_one() -> None:
    original = _user_failure()
    rebuilt = _over_the_wire(original, "parse (1/2)")
    assert isinstance(rebuilt, UserFunctionError)
    assert rebuilt.operator_name == "parse"
    assert rebuilt.subtask_index == 0
    assert describe_failure(rebuilt) == describe_failure(original)
    assert "ValueError" in str(rebuilt.cause)
    assert 'int("x")' in getattr(rebuilt.cause, "remote_traceback", "")
    assert restore_refusal(rebuilt) is None


def test_a_refused_restore_is_still_refused_after_the_wire() -> None:
    refusal = IncompatibleStateError("operator 'count': keyed state 'n' was a value state")
    original = _task_failure(refusal)
    assert restore_refusal(original) is refusal
    rebuilt = _over_the_wire(original)
    found = restore_refusal(rebuilt)
    assert isinstance(found, RestoreRefusedError)
    assert str(found) == str(refusal)
    assert isinstance(rebuilt, TaskFailure)
    assert rebuilt.task_name == "sink (1/1)"
    assert describe_failure(rebuilt) == describe_failure(original)
    assert failure_info(original).category is FailureCategory.RESTORE_REFUSED


def test_an_infrastructure_error_is_still_one_after_the_wire() -> None:
    """A TaskManager's reader that finds no broker: the CLI prints the same one line."""
    trouble = InfrastructureError("no Kafka broker answers at 127.0.0.1:1 (...)")
    original = _task_failure(trouble)
    rebuilt = _over_the_wire(original)
    found = infrastructure_cause(rebuilt)
    assert isinstance(found, InfrastructureError)
    assert str(found) == str(trouble)
    assert isinstance(rebuilt, TaskFailure)
    assert describe_failure(rebuilt) == describe_failure(original)
    assert restore_refusal(rebuilt) is None
    assert failure_info(original).category is FailureCategory.INFRASTRUCTURE


def test_any_other_failure_is_rebuilt_as_a_task_failure_with_the_same_text() -> None:
    original = _task_failure(OSError("No space left on device"))
    rebuilt = _over_the_wire(original)
    assert isinstance(rebuilt, TaskFailure)
    assert describe_failure(rebuilt) == describe_failure(original)
    assert restore_refusal(rebuilt) is None
    bare = KeyError("k")
    assert describe_failure(_over_the_wire(bare, "x (1/1)")) == describe_failure(bare)


def test_root_cause_prefers_rebuilt_user_errors_as_it_does_local_ones() -> None:
    task_failure = _over_the_wire(_task_failure(RuntimeError("downstream gone")))
    user = _over_the_wire(_user_failure())
    group = BaseExceptionGroup("attempt", [task_failure, user])
    assert root_cause(group) is user
    assert root_cause(BaseExceptionGroup("attempt", [KeyError("k"), task_failure])) is task_failure
