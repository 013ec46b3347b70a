"""A TaskManager's subtasks: built from the JobManager's deployments, run on the TaskManager's
event loop, their reports and metrics sent back over the control connection.

Per attempt the JobManager sends a :class:`~runtime.cluster.messages.DeployAttempt`. The
TaskManager builds each of its subtasks with :func:`~runtime.plan.execution.build_subtask` from its
own job graph, exactly as the job master does in one process; only the channel endpoints differ
(:class:`ClusterChannels`): a channel whose two subtasks run here hands Python objects over, a
channel to a subtask in another TaskManager goes through this process's
:class:`~actors.remote.DataPlane`. Every channel is registered before the first task starts.

Reports go to the JobManager as the tasks make them; each task's metrics go every
:data:`METRICS_INTERVAL_S`, and once more right before its last state change, so the JobManager
holds its final counts when it learns that the task ended. Commands arrive as
:class:`~actors.protocol.CommandForTask`; a trigger for a task that has ended is declined with
``task_ended`` (the coordinator retries with the new set of tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

from actors.network import ResultSubpartition
from actors.protocol import (
    CommandForTask,
    DeclineCheckpoint,
    TaskId,
    TaskReport,
    TaskState,
    TaskStateChanged,
    TriggerCheckpoint,
    failure_info,
)
from actors.remote import ChannelId, DataPlane
from actors.task import StreamTask
from runtime.cluster.messages import (
    AttemptReleased,
    DeployAttempt,
    ReleaseAttempt,
    TaskManagerAddress,
)
from runtime.config import ExecutionConfig
from runtime.plan.execution import InputEndpoint, SubtaskEndpoints, build_subtask, subtask_name
from runtime.plan.graph import JobEdge, JobGraph, JobVertex
from runtime.testing import arm_from_params

log = logging.getLogger(__name__)

METRICS_INTERVAL_S = 0.5
"""How often each running task's records in/out and source lag go to the JobManager."""

CLOSE_TIMEOUT_S = 3.0
"""When the TaskManager ends with tasks still running (its JobManager is gone), how long their
``close()`` may take before it exits anyway."""


class ClusterChannels:
    """The channel endpoints of the subtasks one TaskManager runs in one attempt.

    ``placement`` says for every subtask of the job which TaskManager (an index into
    ``taskmanagers``) runs it; ``own`` is this one's index. Subpartitions of channels between two
    local subtasks are shared by both ends, as :class:`~runtime.plan.execution.LocalChannels`
    shares them; the others are bound to the data plane as they are made.
    """

    def __init__(
        self,
        graph: JobGraph,
        plane: DataPlane,
        attempt: int,
        taskmanagers: tuple[TaskManagerAddress, ...],
        placement: dict[str, tuple[int, ...]],
        own: int,
    ) -> None:
        self.graph = graph
        self.plane = plane
        self.attempt = attempt
        self.taskmanagers = taskmanagers
        self.placement = placement
        self.own = own
        self._edge_index = {id(edge): k for k, edge in enumerate(graph.edges)}
        self._subpartitions: dict[tuple[int, int, int], ResultSubpartition] = {}

    def _is_local(self, vertex: JobVertex, index: int) -> bool:
        return self.placement[vertex.id][index] == self.own

    def _peer(self, vertex: JobVertex, index: int) -> TaskManagerAddress:
        return self.taskmanagers[self.placement[vertex.id][index]]

    def _subpartition(self, edge: JobEdge, sender: int, receiver: int) -> ResultSubpartition:
        key = (self._edge_index[id(edge)], sender, receiver)
        subpartition = self._subpartitions.get(key)
        if subpartition is None:
            subpartition = ResultSubpartition(subtask_name(edge.source_vertex, sender))
            self._subpartitions[key] = subpartition
        return subpartition

    def _channel_id(self, edge: JobEdge, sender: int, receiver: int) -> ChannelId:
        return ChannelId(self.attempt, self._edge_index[id(edge)], sender, receiver)

    def endpoints(self, vertex: JobVertex, index: int) -> SubtaskEndpoints:
        """Subtask ``index`` of ``vertex`` (which runs here): its gate's channels in the order of
        ``LocalChannels`` (per input edge, per sending subtask), and its subpartitions."""
        inputs: list[InputEndpoint] = []
        for edge in self.graph.inputs_of(vertex):
            source = edge.source_vertex
            senders = [index] if edge.pointwise else range(source.parallelism)
            for sender in senders:
                if self._is_local(source, sender):
                    subpartition = self._subpartition(edge, sender, index)
                    inputs.append(InputEndpoint(subpartition, edge.input_index))
                    continue
                peer = self._peer(source, sender)
                remote = self.plane.remote_sender(
                    self._channel_id(edge, sender, index),
                    peer.host,
                    peer.data_port,
                    subtask_name(source, sender),
                )
                inputs.append(InputEndpoint(remote, edge.input_index))
        outputs: list[tuple[ResultSubpartition, ...]] = []
        for edge in self.graph.outputs_of(vertex):
            target = edge.target_vertex
            receivers = [index] if edge.pointwise else range(target.parallelism)
            subpartitions = []
            for receiver in receivers:
                subpartition = self._subpartition(edge, index, receiver)
                if not self._is_local(target, receiver):
                    peer = self._peer(target, receiver)
                    self.plane.outgoing(
                        self._channel_id(edge, index, receiver),
                        peer.host,
                        peer.data_port,
                        subpartition,
                        receiver=subtask_name(target, receiver),
                    )
                subpartitions.append(subpartition)
            outputs.append(tuple(subpartitions))
        return SubtaskEndpoints(tuple(inputs), tuple(outputs))


class _TaskReporter:
    """One task's listener: its reports go to the JobManager, its final metrics right before its
    last state change."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        self._send = send
        self.task: StreamTask | None = None

    def report(self, message: TaskReport) -> None:
        if type(message) is TaskStateChanged and message.state.is_terminal:
            if self.task is not None:
                self._send(self.task.metrics_report())
        self._send(message)


class TaskManagerTasks:
    """The subtasks of one TaskManager across the attempts of its job.

    ``send`` queues a message for the JobManager (from the event loop).
    """

    def __init__(
        self,
        tm_id: str,
        graph: JobGraph,
        config: ExecutionConfig,
        plane: DataPlane,
        send: Callable[[Any], None],
    ) -> None:
        self.tm_id = tm_id
        self.graph = graph
        self.config = config
        self.plane = plane
        self._send = send
        self._vertices = {vertex.id: vertex for vertex in graph.vertices}
        self.tasks: dict[TaskId, StreamTask] = {}
        """The deployed tasks that have not ended yet."""
        self._runners: dict[TaskId, asyncio.Task[None]] = {}
        self._metrics: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- deployment

    async def deploy(self, message: DeployAttempt) -> None:
        """Build every subtask ``message`` names, register their channels, start them all."""
        if message.arm_crash_points:
            arm_from_params(self.graph.params)
        own = next(
            i for i, address in enumerate(message.taskmanagers) if address.tm_id == self.tm_id
        )
        channels = ClusterChannels(
            self.graph, self.plane, message.attempt, message.taskmanagers, message.placement, own
        )
        restore_context = message.restore_context.to_context()
        built: list[StreamTask] = []
        for subtask in message.subtasks:
            vertex = self._vertices[subtask.vertex_id]
            reporter = _TaskReporter(self._send)
            try:
                task = build_subtask(
                    self.graph,
                    vertex,
                    subtask.subtask_index,
                    channels.endpoints(vertex, subtask.subtask_index),
                    splits=message.splits,
                    restored={uid: data.to_restored() for uid, data in subtask.restored.items()},
                    restored_finished=subtask.restored_finished,
                    restore_context=restore_context,
                    attempt=message.attempt,
                    config=self.config,
                    listener=reporter,
                )
            except Exception as exc:
                # The others still start (and are cancelled by the JobManager, which learns
                # of this failure as of any other).
                name = subtask_name(vertex, subtask.subtask_index)
                log.exception("TaskManager %s: cannot deploy %s", self.tm_id, name)
                task_id = TaskId(vertex.id, subtask.subtask_index, message.attempt)
                failure = failure_info(exc, name)
                self._send(TaskStateChanged(task_id, TaskState.FAILED, failure))
                continue
            reporter.task = task
            built.append(task)
        for task in built:
            self.tasks[task.task_id] = task
            runner = asyncio.create_task(task.run(), name=task.name)
            runner.add_done_callback(functools.partial(self._ended, task))
            self._runners[task.task_id] = runner
        if self._metrics is None:
            self._metrics = asyncio.create_task(self._report_metrics(), name="task-metrics")
        # Let every task take its first step, so that a command right behind this deployment
        # (a cancel) finds it running.
        await asyncio.sleep(0)

    def _ended(self, task: StreamTask, runner: asyncio.Task[None]) -> None:
        self.tasks.pop(task.task_id, None)
        self._runners.pop(task.task_id, None)
        if not runner.cancelled() and runner.exception() is not None:
            # Reported (FAILED, with the failure) by the task itself.
            log.debug("%s failed: %s", task.name, runner.exception())

    # ---------------------------------------------------------------- commands

    def command(self, message: CommandForTask) -> None:
        task = self.tasks.get(message.task)
        if task is not None and task.handle_command(message.command):
            return
        command = message.command
        if type(command) is TriggerCheckpoint:
            self._send(
                DeclineCheckpoint(
                    message.task,
                    command.checkpoint_id,
                    f"task {message.task} has ended in TaskManager {self.tm_id}",
                    task_ended=True,
                )
            )

    def release(self, message: ReleaseAttempt) -> None:
        self.plane.release(message.attempt)
        self._send(AttemptReleased(message.attempt))

    # ---------------------------------------------------------------- metrics and the end

    async def _report_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S)
            for task in list(self.tasks.values()):
                if not task.state.is_terminal:
                    self._send(task.metrics_report())

    async def close(self) -> None:
        """Cancel the tasks that still run (``close()`` runs), wait for them a little, and close
        the data plane."""
        if self._metrics is not None:
            self._metrics.cancel()
        runners = list(self._runners.values())
        for runner in runners:
            runner.cancel("the TaskManager is ending")
        if runners:
            await asyncio.wait(runners, timeout=CLOSE_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await self.plane.close()
