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
5. JobManager → TaskManager: task commands (:mod:`actors.protocol`); at the end
   :class:`ShutdownTaskManager`, after which the TaskManager exits. A TaskManager also exits when
   the connection ends: it never outlives its JobManager.

:class:`TaskManagerLost` is the JobManager's record of a TaskManager it lost, with its cause.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from actors.wire import wire_message
from runtime.cluster.jobspec import GraphFingerprint, JobSpec


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
