"""The JobManager's side of running a job on TaskManager processes (``--taskmanagers N``).

:class:`ClusterDeployment` is the job master's :class:`~runtime.master.deployment.Deployment`
when the job process is a JobManager: it starts the TaskManagers (a
:class:`~runtime.cluster.jobmanager.TaskManagerPool` over a
:class:`~runtime.cluster.placement.TaskManagerPlacement`) and runs no subtask itself. Per attempt:

1. Lost TaskManagers are replaced by fresh ones.
2. :func:`assign_subtasks` places subtask *i* of every vertex on TaskManager *i mod N*, so the
   subtasks of a vertex spread evenly, and pointwise (forward) channels stay inside one process.
   Keyed operators need nothing more: a subtask's key groups follow its index.
3. Each TaskManager gets one :class:`~runtime.cluster.messages.DeployAttempt`: its subtasks with
   their restored state, every source's splits, the restore context, and where every subtask of
   the attempt runs (to build its channels).
4. The coordinator and the job master see each task through a :class:`RemoteTaskHandle`, whose
   state and metrics are those of the task's latest reports. Commands reach it in a
   :class:`~actors.protocol.CommandForTask` over its TaskManager's control connection.
5. The attempt fails when a task reports FAILED (the failure rebuilt by
   :func:`~actors.protocol.failure_from_info`, so a refused restore and a user-function error
   are decided and printed as in one process) or a TaskManager is lost. A task that failed
   because its channel to another TaskManager broke is most likely the echo of that
   TaskManager's loss, which is then waited for briefly and reported instead.
6. At the end of an attempt, the tasks still running are cancelled (``close()`` runs, never
   ``finish()``) and waited for; a TaskManager whose tasks do not end in time is killed, so it
   cannot go on with work that was given up. Every TaskManager then releases the attempt's
   channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from actors.protocol import (
    AcknowledgeCheckpoint,
    CancelTask,
    CommandForTask,
    DeclineCheckpoint,
    TaskCommand,
    TaskFailureInfo,
    TaskId,
    TaskMetrics,
    TaskState,
    TaskStateChanged,
    failure_from_info,
)
from actors.remote import RemoteChannelError
from actors.task import TaskListener
from runtime.cluster.jobmanager import (
    HeartbeatConfig,
    TaskManagerHandle,
    TaskManagerPool,
    TaskManagerState,
)
from runtime.cluster.jobspec import GraphFingerprint, JobSpec
from runtime.cluster.messages import (
    AttemptReleased,
    DeployAttempt,
    ReleaseAttempt,
    RestoreContextData,
    RestoredStateData,
    SubtaskDeployment,
    TaskManagerAddress,
)
from runtime.cluster.placement import TaskManagerPlacement, make_placement
from runtime.config import DEFAULT_JOBMANAGER_HOST, ExecutionConfig
from runtime.master.deployment import AttemptDeployment, Deployment, DeploymentError
from runtime.plan.execution import subtask_name, upstream_task_ids
from runtime.plan.graph import JobGraph

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 10.0
"""How long the tasks of an attempt that ended may take to close after their cancel; the
TaskManager of one that takes longer is killed (and replaced)."""

LOSS_AFTER_CHANNEL_FAILURE_S = 1.0
"""How long a task failure caused by a broken channel waits for the loss of the TaskManager at
the other end (seen within a second), which is then the failure reported."""

EXIT_AFTER_FENCE_S = 5.0

RELEASE_TIMEOUT_S = 5.0
"""How long a TaskManager may take to answer the release of an attempt."""

_TASK_REPORTS = (TaskStateChanged, AcknowledgeCheckpoint, DeclineCheckpoint)


def slots_per_taskmanager(graph: JobGraph, taskmanagers: int) -> int:
    """Slots each of ``taskmanagers`` needs for :func:`assign_subtasks` (Flink's slot sharing: a
    slot holds one subtask of every vertex)."""
    widest = max(vertex.parallelism for vertex in graph.vertices)
    return max(1, math.ceil(widest / taskmanagers))


def assign_subtasks(graph: JobGraph, taskmanagers: int) -> dict[str, tuple[int, ...]]:
    """Vertex id → for each subtask, the index of the TaskManager that runs it: subtask *i* of
    every vertex on TaskManager *i mod* ``taskmanagers``."""
    return {
        vertex.id: tuple(index % taskmanagers for index in range(vertex.parallelism))
        for vertex in graph.vertices
    }


class RemoteTaskHandle:
    """A task that runs in a TaskManager, as the job master knows it: its state is that of its
    latest report (it may lag behind the task), its metrics those of its latest metrics report."""

    def __init__(
        self,
        task_id: TaskId,
        name: str,
        operator_uids: tuple[str, ...],
        upstream: tuple[TaskId, ...],
        taskmanager: TaskManagerHandle,
    ) -> None:
        self.task_id = task_id
        self.name = name
        self.operator_uids = operator_uids
        self.upstream = upstream
        self.taskmanager = taskmanager
        self.state = TaskState.CREATED
        self.metrics: TaskMetrics | None = None

    def send(self, command: TaskCommand) -> bool:
        if self.state.is_terminal:
            return False
        return self.taskmanager.send(CommandForTask(self.task_id, command))

    def latest_metrics(self) -> TaskMetrics | None:
        return self.metrics

    def __repr__(self) -> str:
        return f"<RemoteTaskHandle {self.name} {self.state.value} on {self.taskmanager.tm_id}>"


class ClusterDeployment(Deployment):
    """Runs every attempt's subtasks on ``taskmanagers`` TaskManagers started through
    ``placement`` (see the module docstring); ``job`` is what they build the job graph from,
    which must give ``graph`` again."""

    def __init__(
        self,
        graph: JobGraph,
        job: JobSpec,
        placement: TaskManagerPlacement,
        taskmanagers: int,
        *,
        heartbeat: HeartbeatConfig | None = None,
        cancel_timeout_s: float = CANCEL_TIMEOUT_S,
        jobmanager_host: str = DEFAULT_JOBMANAGER_HOST,
    ) -> None:
        self.graph = graph
        self.job = job
        self.placement = placement
        self.count = taskmanagers
        self.heartbeat = heartbeat
        self.jobmanager_host = jobmanager_host
        """Where the pool listens for the TaskManagers' control connections: an address of this
        machine that they reach."""
        self.cancel_timeout_s = cancel_timeout_s
        self.pool: TaskManagerPool | None = None
        self.handles: dict[TaskId, RemoteTaskHandle] = {}
        """The tasks of the current attempt (until the next one is deployed)."""
        self._attempt = 0
        self._listener: TaskListener | None = None
        self._failure: asyncio.Future[tuple[BaseException, bool]] | None = None
        """The attempt's first task failure, and whether a broken channel caused it."""
        self._changed = asyncio.Event()
        """Set by every task state change and release answer (for the waits of end_attempt)."""
        self._released: set[str] = set()
        """The TaskManagers that released the current attempt."""
        self._not_armed: set[str] = set()
        """TaskManagers the job started with that have not armed their crash points yet."""

    # ---------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Start the TaskManagers and wait until each built the job graph; raises
        :class:`~runtime.cluster.jobmanager.TaskManagerStartError` when one does not."""
        if self.job.checkpoint_dir is not None:
            # Created here, before the TaskManagers check that they can write into it.
            try:
                await asyncio.to_thread(
                    Path(self.job.checkpoint_dir).mkdir, parents=True, exist_ok=True
                )
            except OSError as exc:
                msg = f"cannot create the checkpoint directory {self.job.checkpoint_dir}: {exc}"
                raise DeploymentError(msg) from exc
        self.pool = TaskManagerPool(
            self.placement,
            self.job,
            GraphFingerprint.of(self.graph),
            heartbeat=self.heartbeat,
            on_message=self._on_message,
            on_lost=lambda _: self._changed.set(),
            host=self.jobmanager_host,
        )
        try:
            started = await self.pool.start(self.count)
        except BaseException:
            await self.pool.shutdown("the job did not start")
            raise
        self._not_armed = {handle.tm_id for handle in started}

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.shutdown()

    def _pool(self) -> TaskManagerPool:
        if self.pool is None:
            msg = "the TaskManagers were not started (ClusterDeployment.start)"
            raise RuntimeError(msg)
        return self.pool

    # ---------------------------------------------------------------- an attempt

    async def deploy(
        self, attempt: AttemptDeployment, listener: TaskListener
    ) -> list[RemoteTaskHandle]:
        pool = self._pool()
        await pool.replace_lost()
        taskmanagers = [h for h in pool.taskmanagers if h.state is TaskManagerState.READY]
        if not taskmanagers:
            msg = "no TaskManager is ready to run the job's subtasks"
            raise DeploymentError(msg)
        graph = self.graph
        placement = assign_subtasks(graph, len(taskmanagers))
        subtasks: list[list[SubtaskDeployment]] = [[] for _ in taskmanagers]
        handles: list[RemoteTaskHandle] = []
        for vertex in graph.vertices:
            uids = tuple(node.uid for node in vertex.operators)
            for index, tm_index in enumerate(placement[vertex.id]):
                restored, finished = attempt.restored.get((vertex.id, index), ({}, False))
                subtasks[tm_index].append(
                    SubtaskDeployment(
                        vertex.id,
                        index,
                        {uid: RestoredStateData.of(state) for uid, state in restored.items()},
                        finished,
                    )
                )
                handles.append(
                    RemoteTaskHandle(
                        TaskId(vertex.id, index, attempt.attempt),
                        subtask_name(vertex, index),
                        uids,
                        upstream_task_ids(graph, vertex, index, attempt.attempt),
                        taskmanagers[tm_index],
                    )
                )
        self._attempt = attempt.attempt
        self._listener = listener
        self.handles = {handle.task_id: handle for handle in handles}
        self._released = set()
        self._failure = asyncio.get_running_loop().create_future()
        addresses = tuple(_address(handle) for handle in taskmanagers)
        restore_context = RestoreContextData.of(attempt.restore_context)
        splits = _splits_data(attempt.splits)
        for handle, own in zip(taskmanagers, subtasks, strict=True):
            message = DeployAttempt(
                attempt.attempt,
                tuple(own),
                addresses,
                placement,
                splits,
                restore_context,
                arm_crash_points=handle.tm_id in self._not_armed,
            )
            try:
                handle.send(message)
            except TypeError as exc:
                msg = (
                    f"cannot send the subtasks of attempt {attempt.attempt} to TaskManager "
                    f"{handle.tm_id}: {exc}; the splits of every source go to the TaskManagers "
                    "encoded with msgpack, so a source's splits must be plain data (dicts, "
                    "lists, str, int...)"
                )
                raise DeploymentError(msg) from exc
            self._not_armed.discard(handle.tm_id)
        return handles

    def run(self, group: asyncio.TaskGroup) -> list[asyncio.Task[Any]]:
        return [group.create_task(self._watch(), name="taskmanager-watch")]

    async def _watch(self) -> None:
        """Raise the attempt's failure: the first task failure, or the first TaskManager lost."""
        assert self._failure is not None
        loss: asyncio.Future[Any] = asyncio.ensure_future(self._pool().watch())
        failed: asyncio.Future[Any] = self._failure
        try:
            await asyncio.wait([loss, failed], return_when=asyncio.FIRST_COMPLETED)
            if loss.done():
                loss.result()
            failure, channel_broke = self._failure.result()
            if channel_broke:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(loss), LOSS_AFTER_CHANNEL_FAILURE_S)
            raise failure
        finally:
            loss.cancel()

    async def end_attempt(self) -> None:
        pool = self._pool()
        running = [h for h in self.handles.values() if not h.state.is_terminal]
        cancel = CancelTask(f"attempt {self._attempt} of the job ended")
        for handle in running:
            handle.send(cancel)
        await self._wait_ended(running)
        releasing = [h for h in pool.taskmanagers if h.send(ReleaseAttempt(self._attempt))]
        # Until each answered, a channel of the attempt may still be registered there (and fail
        # noisily when another TaskManager exits).
        await self._wait_for(
            lambda: all(h.tm_id in self._released or not h.connected for h in releasing),
            RELEASE_TIMEOUT_S,
        )

    async def _wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``condition`` holds, checked at every report and TaskManager loss; False
        after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    async def _wait_ended(self, handles: list[RemoteTaskHandle]) -> None:
        def ended() -> bool:
            return not any(not h.state.is_terminal and h.taskmanager.connected for h in handles)

        if await self._wait_for(ended, self.cancel_timeout_s):
            return
        alive = [h for h in handles if not h.state.is_terminal and h.taskmanager.connected]
        stuck = {h.taskmanager.tm_id: h.taskmanager for h in alive}
        for taskmanager in stuck.values():
            names = ", ".join(h.name for h in alive if h.taskmanager is taskmanager)
            log.warning(
                "%s: task(s) %s did not end within %gs of their cancel; killing it",
                taskmanager.label,
                names,
                self.cancel_timeout_s,
            )
            self._pool().fence(taskmanager)
        for taskmanager in stuck.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(taskmanager.exited.wait(), EXIT_AFTER_FENCE_S)

    # ---------------------------------------------------------------- reports

    def _on_message(self, taskmanager: TaskManagerHandle, message: Any) -> None:
        if type(message) is AttemptReleased:
            if message.attempt == self._attempt:
                self._released.add(taskmanager.tm_id)
                self._changed.set()
            return
        if type(message) is TaskMetrics:
            handle = self.handles.get(message.task)
            if handle is not None:
                handle.metrics = message
            return
        if not isinstance(message, _TASK_REPORTS):
            log.warning(
                "%s sent an unexpected %s; ignored", taskmanager.label, type(message).__name__
            )
            return
        handle = self.handles.get(message.task)
        if handle is None:
            return  # a task of an attempt that was released
        if type(message) is TaskStateChanged:
            handle.state = message.state
            self._changed.set()
            if message.state is TaskState.FAILED:
                self._task_failed(handle, message.failure)
        assert self._listener is not None
        self._listener.report(message)

    def _task_failed(self, handle: RemoteTaskHandle, info: TaskFailureInfo | None) -> None:
        if self._failure is None or self._failure.done():
            return
        if info is None:
            msg = f"task {handle.name} failed in {handle.taskmanager.label}"
            self._failure.set_result((RuntimeError(msg), False))
            return
        channel_broke = info.cause_type == RemoteChannelError.__name__
        self._failure.set_result((failure_from_info(info), channel_broke))

    # ---------------------------------------------------------------- status

    def taskmanager_of(self, task: TaskId) -> str | None:
        handle = self.handles.get(task)
        return handle.taskmanager.tm_id if handle is not None else None

    def taskmanagers(self) -> list[dict[str, Any]]:
        if self.pool is None:
            return []
        subtasks: dict[str, list[str]] = {}
        for handle in self.handles.values():
            subtasks.setdefault(handle.taskmanager.tm_id, []).append(handle.name)
        return [
            {**handle.describe(), "subtasks": subtasks.get(handle.tm_id, [])}
            for handle in self.pool.taskmanagers
        ]


def _address(handle: TaskManagerHandle) -> TaskManagerAddress:
    if handle.host is None or handle.data_port is None:
        msg = f"{handle.label} registered without a data plane address"
        raise DeploymentError(msg)
    return TaskManagerAddress(handle.tm_id, handle.host, handle.data_port)


def _splits_data(splits: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    return {uid: list(source_splits) for uid, source_splits in splits.items()}


def taskmanager_deployment(
    job_file: str,
    params: dict[str, str],
    parallelism: int,
    max_parallelism: int,
    graph: JobGraph,
    config: ExecutionConfig,
    taskmanagers: int,
    placement: str = "local",
    *,
    jobmanager_host: str = DEFAULT_JOBMANAGER_HOST,
    checkpoint_dir: str | None = None,
) -> ClusterDeployment:
    """The deployment of ``graph``, built from ``job_file`` with ``params``, ``parallelism`` and
    ``max_parallelism``, onto ``taskmanagers`` TaskManagers of the ``placement`` kind
    (:func:`~runtime.cluster.placement.make_placement`), each with the slots its share needs,
    which connect to the JobManager at ``jobmanager_host`` and check that they can write into
    ``checkpoint_dir``. Raises ``ValueError`` for a placement that is unknown or not installed."""
    job = JobSpec.create(
        job_file,
        params,
        parallelism,
        max_parallelism,
        graph.name,
        config,
        checkpoint_dir=checkpoint_dir,
    )
    slots = slots_per_taskmanager(graph, taskmanagers)
    return ClusterDeployment(
        graph,
        job,
        make_placement(placement, slots),
        taskmanagers,
        jobmanager_host=jobmanager_host,
    )
