"""Where the subtasks of a job attempt run: the interface between the job master and its backends.

The job master decides everything about an attempt that does not depend on where its subtasks
run (:class:`AttemptDeployment`: the attempt number, each subtask's restored state, the splits of
every source, the restore context) and hands it to a :class:`Deployment`, which runs the subtasks
and gives back one :class:`~runtime.master.coordinator.TaskHandle` per subtask. Two backends exist:

- :class:`~runtime.master.jobmaster.LocalDeployment`: every subtask as a task on this process's
  event loop (the default, ``--taskmanagers 1``);
- ``runtime.cluster.deployment.ClusterDeployment``: the subtasks on TaskManager processes, the job
  process being the JobManager (``--taskmanagers N``). It lives in the cluster layer, above this
  one, which only knows it through this interface.

An attempt's life, as the job master drives it: :meth:`Deployment.deploy`, then
:meth:`Deployment.run` adds what runs or watches the tasks to the attempt's task group (a task
failure, or the loss of a process that runs tasks, raises from there), then, however the attempt
ended (every task finished, a failure, a cancel), :meth:`Deployment.end_attempt`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from actors.operator import RestoreContext
from actors.protocol import TaskId
from actors.task import TaskListener
from runtime.master.coordinator import TaskHandle
from state.snapshot import RestoredState

RestoredSubtasks = Mapping[tuple[str, int], tuple[dict[str, RestoredState], bool]]
"""(vertex id, subtask index) → ({operator uid: its share of the restored state}, whether every
operator of the vertex had finished), as :func:`~runtime.plan.restore.assign_restored_state` gives."""


@dataclass(frozen=True)
class AttemptDeployment:
    """What the job master decided for one attempt, the same wherever its subtasks run."""

    attempt: int
    restored: RestoredSubtasks
    """Subtasks absent here start without restored state."""
    splits: Mapping[str, list[Any]]
    """Every split of each source at job start, by operator uid (each subtask takes its share)."""
    restore_context: RestoreContext


class Deployment(ABC):
    """Runs the subtasks of each attempt of one job (see the module docstring)."""

    @abstractmethod
    async def start(self) -> None:
        """Before the first attempt (start the processes the subtasks will run in)."""

    @abstractmethod
    async def deploy(
        self, attempt: AttemptDeployment, listener: TaskListener
    ) -> Sequence[TaskHandle]:
        """Deploy every subtask of the job for ``attempt``; their reports go to ``listener`` (on
        the job master's loop, each task's in order). Returns the handles by vertex, then subtask
        index, as the job graph lists them."""

    @abstractmethod
    def run(self, group: asyncio.TaskGroup) -> list[asyncio.Task[Any]]:
        """Start in ``group`` what runs or watches the deployed tasks: a task failure raises from
        one of them. Returns those to cancel once every task finished (the others end by
        themselves)."""

    @abstractmethod
    async def end_attempt(self) -> None:
        """The attempt ended, however: once this returns, none of its tasks runs any more (the
        ones still running were cancelled, ``close()`` ran) and what they held is released."""

    @abstractmethod
    async def close(self) -> None:
        """The job ended: stop what :meth:`start` started."""

    def taskmanager_of(self, task: TaskId) -> str | None:
        """The id of the TaskManager that runs ``task``; None in this process."""
        return None

    def taskmanagers(self) -> list[dict[str, Any]]:
        """The TaskManagers for ``GET /status``: id, pid, host, slots, state, subtasks."""
        return []


class DeploymentError(RuntimeError):
    """The subtasks of an attempt cannot be deployed; the message says why and what to do."""
