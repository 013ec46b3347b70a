"""The messages of the control connection that concern a TaskManager itself (not its tasks).

One TCP connection per TaskManager, opened by the TaskManager, carries frames of these and of the
task messages of :mod:`actors.protocol` (:mod:`actors.wire` frames and encodes both). In order:

1. TaskManager → JobManager: :class:`RegisterTaskManager`.
2. JobManager → TaskManager: :class:`TaskManagerRegistered` with the :class:`JobSpec`, or
   :class:`RegistrationRefused`, after which the JobManager closes the connection.
3. TaskManager → JobManager: :class:`Heartbeat` every ``heartbeat_interval_s`` from then on, from
   a thread of its own, so a user function that keeps the TaskManager's event loop busy does not
   stop them.
4. TaskManager → JobManager: :class:`JobGraphReady` with the fingerprint of the graph it built,
   or :class:`JobGraphFailed`, or :class:`CheckpointDirectoryUnwritable`.
5. Per job attempt, JobManager → TaskManager: :class:`DeployAttempt` (the subtasks it runs, with
   their restored state, and where every other subtask runs); then task commands, each in a
   :class:`~actors.protocol.CommandForTask`. TaskManager → JobManager: the tasks' reports
   (:mod:`actors.protocol`: state changes, checkpoint acknowledgements and declines, metrics).
   When every task of the attempt ended (cancelled if need be), JobManager → TaskManager:
   :class:`ReleaseAttempt`, which the TaskManager answers with :class:`AttemptReleased`.
6. At the end, JobManager → TaskManager: :class:`ShutdownTaskManager`, after which the
   TaskManager exits. A TaskManager also exits when the connection ends: it never outlives its
   JobManager.

:class:`TaskManagerLost` is the JobManager's record of a TaskManager it lost, with its cause.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from actors.operator import NewerOutputPolicy, RestoreContext
from actors.wire import wire_message
from runtime.cluster.jobspec import GraphFingerprint, JobSpec
from state.snapshot import RestoredState


@wire_message("cluster.register")
@dataclass(frozen=True)
class RegisterTaskManager:
    tm_id: str
    pid: int
    host: str
    """The address this TaskManager reaches the JobManager from: the one its peers reach it at."""
    data_port: int | None
    """Port of its data-plane server for channels from other TaskManagers; None while it runs
    none."""
    slots: int
    """Subtasks of each vertex it can run (Flink's task slots, shared by the vertices)."""


@wire_message("cluster.registered")
@dataclass(frozen=True)
class TaskManagerRegistered:
    job: JobSpec
    heartbeat_interval_s: float


@wire_message("cluster.refused")
@dataclass(frozen=True)
class RegistrationRefused:
    reason: str


@wire_message("cluster.heartbeat")
@dataclass(frozen=True)
class Heartbeat:
    tm_id: str


@wire_message("cluster.checkpoint-dir-unwritable")
@dataclass(frozen=True)
class CheckpointDirectoryUnwritable:
    """Instead of :class:`JobGraphReady`: this TaskManager cannot write into the job's checkpoint
    directory, so the job cannot start."""

    directory: str
    host: str
    error: str

    def describe(self) -> str:
        """Completes "TaskManager tm-1 (pid 42) ..."."""
        return (
            f"on host {self.host} cannot write into the checkpoint directory {self.directory}: "
            f"{self.error}; every TaskManager must reach the checkpoint directory and write "
            "there (on several machines: a shared file system mounted at the same path)"
        )


@wire_message("cluster.graph-ready")
@dataclass(frozen=True)
class JobGraphReady:
    fingerprint: GraphFingerprint


@wire_message("cluster.graph-failed")
@dataclass(frozen=True)
class JobGraphFailed:
    reason: str
    """The error of importing the job file or of ``build(job)``, first line first."""


@wire_message("cluster.shutdown")
@dataclass(frozen=True)
class ShutdownTaskManager:
    reason: str


class LossCause(StrEnum):
    CONNECTION_CLOSED = "connection-closed"
    CONNECTION_BROKEN = "connection-broken"
    HEARTBEAT_TIMEOUT = "heartbeat-timeout"
    PROCESS_EXITED = "process-exited"
    PROTOCOL_ERROR = "protocol-error"


@wire_message("cluster.lost")
@dataclass(frozen=True)
class TaskManagerLost:
    tm_id: str
    pid: int | None
    cause: str
    """A :class:`LossCause` value."""
    detail: str
    """What happened, in words: ``its control connection closed; it was killed by SIGKILL``."""

    def describe(self) -> str:
        pid = f" (pid {self.pid})" if self.pid is not None else ""
        return f"TaskManager {self.tm_id}{pid} lost: {self.detail}"


# ------------------------------------------------------------------------------------ deployment


@wire_message("cluster.restore-context")
@dataclass(frozen=True)
class RestoreContextData:
    """:class:`~actors.operator.RestoreContext` as data (the output policy by its value)."""

    checkpoint_id: int | None
    checkpoint_timestamp_ms: int | None
    newer_completed_checkpoints: tuple[int, ...]
    allow_non_restored_state: bool
    on_newer_committed_output: str
    allow_existing_output: bool
    checkpoint_dir: str | None

    @classmethod
    def of(cls, context: RestoreContext) -> RestoreContextData:
        return cls(
            context.checkpoint_id,
            context.checkpoint_timestamp_ms,
            tuple(context.newer_completed_checkpoints),
            context.allow_non_restored_state,
            context.on_newer_committed_output.value,
            context.allow_existing_output,
            context.checkpoint_dir,
        )

    def to_context(self) -> RestoreContext:
        return RestoreContext(
            checkpoint_id=self.checkpoint_id,
            checkpoint_timestamp_ms=self.checkpoint_timestamp_ms,
            newer_completed_checkpoints=tuple(self.newer_completed_checkpoints),
            allow_non_restored_state=self.allow_non_restored_state,
            on_newer_committed_output=NewerOutputPolicy(self.on_newer_committed_output),
            allow_existing_output=self.allow_existing_output,
            checkpoint_dir=self.checkpoint_dir,
        )


@wire_message("cluster.restored-state")
@dataclass(frozen=True)
class RestoredStateData:
    """:class:`~state.snapshot.RestoredState` (one subtask's share of one operator's state) as
    data: the decoded snapshot parts, which hold only what :mod:`state.serde` encodes."""

    keyed: tuple[dict[str, Any], ...]
    timers: tuple[dict[str, Any], ...]
    operator: dict[str, Any] | None

    @classmethod
    def of(cls, restored: RestoredState) -> RestoredStateData:
        return cls(tuple(restored.keyed), tuple(restored.timers), restored.operator)

    def to_restored(self) -> RestoredState:
        return RestoredState(tuple(self.keyed), tuple(self.timers), self.operator)


@wire_message("cluster.subtask-deployment")
@dataclass(frozen=True)
class SubtaskDeployment:
    """One subtask a TaskManager is to run in an attempt."""

    vertex_id: str
    subtask_index: int
    restored: dict[str, RestoredStateData]
    """Operator uid → this subtask's share of its restored state (absent: starts empty)."""
    restored_finished: bool
    """Every operator of the vertex had finished in the restored checkpoint (FLIP-147)."""


@wire_message("cluster.taskmanager-address")
@dataclass(frozen=True)
class TaskManagerAddress:
    """Where one TaskManager's data plane listens, for channels from the others."""

    tm_id: str
    host: str
    data_port: int


@wire_message("cluster.deploy-attempt")
@dataclass(frozen=True)
class DeployAttempt:
    """The subtasks one TaskManager runs in attempt ``attempt``, and where all the others run.

    The TaskManager builds its subtasks from its own job graph: a channel whose two subtasks it
    both runs hands Python objects over; a channel to a subtask elsewhere goes through its data
    plane to the TaskManager that ``placement`` names (channel id: attempt, edge index in the job
    graph, sending and receiving subtask index). It registers every channel before it starts the
    first task.
    """

    attempt: int
    subtasks: tuple[SubtaskDeployment, ...]
    taskmanagers: tuple[TaskManagerAddress, ...]
    """Every TaskManager that runs a subtask of the attempt (this one included)."""
    placement: dict[str, tuple[int, ...]]
    """Vertex id → for each of its subtasks, the index in ``taskmanagers`` of the one running it."""
    splits: dict[str, list[Any]]
    """Every split of each source at job start, by operator uid (each subtask takes its share)."""
    restore_context: RestoreContextData
    arm_crash_points: bool
    """Arm the crash points the job parameters name (``testing.crash-at``) before building the
    tasks: set on the first deployment to each TaskManager the job started with, never for a
    replacement, so that a crash point that ends its process does not fire again in every fresh
    TaskManager."""


@wire_message("cluster.release-attempt")
@dataclass(frozen=True)
class ReleaseAttempt:
    """Every task of ``attempt`` ended: forget them and the channels of the attempt (frames of
    it that still arrive are dropped)."""

    attempt: int


@wire_message("cluster.attempt-released")
@dataclass(frozen=True)
class AttemptReleased:
    """TaskManager → JobManager: it released ``attempt`` (:class:`ReleaseAttempt`)."""

    attempt: int
