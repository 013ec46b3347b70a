"""Local execution: the job master deploys every subtask of a job as an actor on one event loop.

The :class:`JobMaster` turns the :class:`~runtime.plan.graph.JobGraph` into tasks, channels and writers
(the execution graph, :mod:`runtime.plan.execution`), runs them under one ``asyncio.TaskGroup``
together with the checkpoint coordinator, and on a task failure cancels the attempt (``close()``
runs, ``finish()`` does not), asks the restart strategy, and restarts from the latest completed
checkpoint. Tasks report to it in :mod:`actors.protocol` messages; it and the coordinator reach
them through :class:`LocalTaskHandle`. Where the subtasks run is a
:class:`~runtime.master.deployment.Deployment`: :class:`LocalDeployment` (this process) unless the
job master is given another (TaskManager processes, ``runtime.cluster.deployment``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.infrastructure import InfrastructureError
from actors.operator import RestoreContext, UserFunctionError
from actors.protocol import (
    AddSplits,
    StopRequest,
    TaskCommand,
    TaskFailure,
    TaskId,
    TaskMetrics,
    TaskReport,
    TaskState,
    TaskStateChanged,
)
from actors.task import StreamTask, TaskListener
from runtime.api.durations import format_duration
from runtime.api.sources import SPLITS_STATE
from runtime.config import ExecutionConfig
from runtime.master.coordinator import (
    CheckpointCoordinator,
    CheckpointedOperator,
    CheckpointFailedError,
    TaskHandle,
)
from runtime.master.deployment import AttemptDeployment, Deployment
from runtime.master.metrics import (
    SAMPLE_INTERVAL_S,
    JobMetricsSnapshot,
    MetricsTracker,
)
from runtime.plan.execution import LocalChannels, build_subtask, upstream_task_ids
from runtime.plan.graph import JobGraph, JobVertex
from runtime.plan.limits import RunLimits, SinkRecordLimit
from runtime.plan.restore import assign_restored_state
from state.operator import list_state_items
from state.refusal import restore_refusal
from state.storage import (
    CheckpointKind,
    CheckpointStorage,
    CompletedCheckpoint,
    completed_checkpoint_ids_after,
    highest_checkpoint_id,
)

log = logging.getLogger(__name__)

_PAST_RESTORE = frozenset({TaskState.RUNNING, TaskState.FINISHING, TaskState.FINISHED})
"""Task states that prove its operators restored their state (none refused the restore)."""


@dataclass
class OperatorSummary:
    uid: str
    name: str
    parallelism: int
    records_in: int
    records_out: int


@dataclass
class JobResult:
    job_name: str
    duration_s: float
    operators: list[OperatorSummary]
    attempts: int
    checkpoints_completed: int
    stopped_with_savepoint: str | None = None
    stopped_by: str | None = None
    """Which limit of a bounded run ended the job (``"max_records"`` or ``"timeout"``); None
    when it ended by itself or was stopped from outside."""


class LocalTaskHandle:
    """A task running in this process: its state is the task's own (never late), commands go
    through :meth:`StreamTask.handle_command`, metrics are read when asked for."""

    def __init__(self, task: StreamTask, upstream: tuple[TaskId, ...]) -> None:
        self.task = task
        self.task_id = task.task_id
        self.name = task.name
        self.operator_uids = tuple(op.uid for op in task.operators)
        self.upstream = upstream

    @property
    def state(self) -> TaskState:
        return self.task.state

    def send(self, command: TaskCommand) -> bool:
        return self.task.handle_command(command)

    def latest_metrics(self) -> TaskMetrics:
        return self.task.metrics_report()

    def __repr__(self) -> str:
        return f"<LocalTaskHandle {self.name} {self.state.value}>"


class LocalDeployment(Deployment):
    """Every subtask of an attempt as a :class:`StreamTask` on this process's event loop, with
    channels that hand Python objects over."""

    def __init__(
        self,
        graph: JobGraph,
        config: ExecutionConfig,
        sink_limit: SinkRecordLimit | None = None,
    ) -> None:
        self.graph = graph
        self.config = config
        self.sink_limit = sink_limit
        """Where the sink operators stop taking records (``max_records``), if anywhere."""
        self.tasks: list[StreamTask] = []

    async def start(self) -> None:
        pass  # the tasks run in this process: nothing to start

    async def deploy(
        self, attempt: AttemptDeployment, listener: TaskListener
    ) -> list[LocalTaskHandle]:
        graph = self.graph
        channels = LocalChannels(graph)
        handles: list[LocalTaskHandle] = []
        for vertex in graph.vertices:
            for index in range(vertex.parallelism):
                restored, finished = attempt.restored.get((vertex.id, index), ({}, False))
                task = build_subtask(
                    graph,
                    vertex,
                    index,
                    channels.endpoints(vertex, index),
                    splits=attempt.splits,
                    restored=restored,
                    restored_finished=finished,
                    restore_context=attempt.restore_context,
                    attempt=attempt.attempt,
                    config=self.config,
                    listener=listener,
                    sink_limit=self.sink_limit,
                )
                upstream = upstream_task_ids(graph, vertex, index, attempt.attempt)
                handles.append(LocalTaskHandle(task, upstream))
        self.tasks = [handle.task for handle in handles]
        return handles

    def run(self, group: asyncio.TaskGroup) -> list[asyncio.Task[Any]]:
        # The tasks end by themselves; one that fails makes the group cancel the others.
        for task in self.tasks:
            group.create_task(task.run(), name=task.name)
        return []

    async def end_attempt(self) -> None:
        # The attempt's task group ended: every task ended with it (cancelled ones closed).
        self.tasks = []

    async def close(self) -> None:
        pass


def checkpointed_operators(graph: JobGraph) -> dict[str, CheckpointedOperator]:
    """What every checkpoint of ``graph`` records of each operator, by uid."""
    return {
        node.uid: CheckpointedOperator(node.name, node.parallelism, node.max_parallelism)
        for node in graph.operators.values()
    }


class JobFailedError(RuntimeError):
    """The job failed and the restart strategy gave up; ``cause`` is the root failure."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause


class JobMaster:
    """Runs one job in this process until it finishes, fails for good, or is cancelled."""

    def __init__(
        self,
        graph: JobGraph,
        config: ExecutionConfig | None = None,
        storage: Any = None,
        restored: CompletedCheckpoint | None = None,
        coordinator: CheckpointCoordinator | None = None,
        deployment: Deployment | None = None,
        limits: RunLimits | None = None,
    ) -> None:
        """``limits``: a bounded run (``run_job(max_records=, timeout=)``): the job ends through
        :meth:`stop_with_final_checkpoint` once one is reached. ``max_records`` counts at the sink
        operators, so it needs the subtasks in this process (no ``deployment``)."""
        self.graph = graph
        self.config = config or ExecutionConfig()
        self.limits = limits or RunLimits()
        self.sink_limit: SinkRecordLimit | None = None
        if self.limits.max_records is not None:
            if deployment is not None:
                msg = (
                    "max_records counts the records at the sink operators, which must run in "
                    "this process: run without TaskManagers, or bound the run with timeout="
                )
                raise ValueError(msg)
            self.sink_limit = SinkRecordLimit(
                self.limits.max_records, lambda: self._limit_reached("max_records")
            )
        self.deployment = deployment or LocalDeployment(graph, self.config, self.sink_limit)
        """Where the subtasks run (this process unless told otherwise)."""
        self.storage = storage if storage is not None else CheckpointStorage(None, graph.name)
        self.restore_point = restored
        first_id = max(
            restored.checkpoint_id if restored else 0,
            highest_checkpoint_id(self.storage.directory) if self.storage.directory else 0,
        )
        self.coordinator = coordinator or CheckpointCoordinator(
            self.config.checkpoint,
            self.storage,
            checkpointed_operators(graph),
            first_checkpoint_id=first_id + 1,
            job_name=graph.name,
        )
        if (
            restored is not None
            and restored.path
            and self.storage.directory is not None
            and Path(restored.path).parent.resolve() == self.storage.directory.resolve()
            and restored.kind is CheckpointKind.CHECKPOINT
        ):
            # Restored from this checkpoint directory: it is ours to retain and later subsume.
            self.coordinator.completed.append(restored)
        self.tasks: list[StreamTask] = []
        """The tasks of the current attempt that run in this process (none with TaskManagers)."""
        self.handles: list[TaskHandle] = []
        """The tasks of the current attempt, as the coordinator and the control endpoint see them."""
        self.attempt = 0
        self.started = time.monotonic()
        self._all_finished = asyncio.Event()
        self.metrics = MetricsTracker()
        """The tasks' recent metrics reports and the counts of ended attempts."""
        self.on_attempt_started: Callable[[JobMaster], None] | None = None
        self._splits: dict[str, list[Any]] = {}
        self.status = "created"
        self.restore_context = RestoreContext()
        self.restarts_allowed = True
        """False once the job is being shut down: a failed attempt then ends the job."""
        self._all_restored = asyncio.Event()
        self._limits_hit: list[str] = []
        """The limits of a bounded run reached so far, first first."""
        self._limit_wakeup = asyncio.Event()
        self.stopped_by: str | None = None
        """The limit whose stop ended (or is ending) the job."""

    # ---------------------------------------------------------------- TaskListener

    def report(self, message: TaskReport) -> None:
        """A task's report: checkpoint and state reports go to the coordinator (metrics of tasks
        in this process are read from them when asked for)."""
        if type(message) is TaskMetrics:
            return
        self.coordinator.on_report(message)
        if type(message) is TaskStateChanged:
            state = message.state
            handles = self.handles
            if state in _PAST_RESTORE and all(t.state in _PAST_RESTORE for t in handles):
                self._all_restored.set()
            if state is TaskState.FINISHED and all(t.state is TaskState.FINISHED for t in handles):
                self._all_finished.set()

    # ---------------------------------------------------------------- running

    async def run(self) -> JobResult:
        """Run attempts until the job ends; raises :class:`JobFailedError` when it fails for good."""
        self.started = time.monotonic()
        timeout = None
        if self.limits.timeout_ms is not None:
            clock = self.config.clock
            timeout = clock.call_at(
                clock.now_ms() + self.limits.timeout_ms, lambda: self._limit_reached("timeout")
            )
        await self.deployment.start()
        try:
            return await self._run_attempts()
        finally:
            if timeout is not None:
                timeout.cancel()
            self.coordinator.shut_down(f"the job has ended ({self.status})")
            await self.deployment.close()

    async def _run_attempts(self) -> JobResult:
        strategy = self.config.restart_strategy
        await self._discover_splits()
        while True:
            self.attempt += 1
            self._all_finished = asyncio.Event()
            self.restore_context = self._restore_context(self.restore_point)
            self._rewind_limits(self.restore_point)
            handles = await self._deploy(self.restore_point)
            self.tasks = [h.task for h in handles if isinstance(h, LocalTaskHandle)]
            self.handles = list(handles)
            self.coordinator.attach(self.handles)
            self.status = "running"
            if self.on_attempt_started is not None:
                self.on_attempt_started(self)
            failure: BaseException | None = None
            try:
                await self._run_attempt()
            except asyncio.CancelledError:
                self.status = "canceled"
                raise
            except BaseExceptionGroup as group:
                failure = root_cause(group)
            except Exception as exc:
                failure = exc
            finally:
                await self.deployment.end_attempt()
            if failure is None:
                break
            self._accumulate_metrics()
            # A refused restore would be refused again by every further attempt; once the job is
            # being shut down (SIGTERM), a failed attempt ends it.
            refused = restore_refusal(failure) is not None
            restart = self.restarts_allowed and not refused
            delay = strategy.next_delay(failure, time.monotonic()) if restart else None
            if delay is None:
                self.status = "failed"
                raise JobFailedError(describe_failure(failure), failure) from failure
            latest = self.coordinator.latest_completed
            log.warning(
                "job attempt %d failed (%s); restarting in %.2fs from %s",
                self.attempt,
                describe_failure(failure),
                delay,
                f"checkpoint {latest.checkpoint_id}" if latest else "the beginning",
            )
            self.status = "restarting"
            if delay > 0:
                await asyncio.sleep(delay)
            self.restore_point = latest or self.restore_point
        self._accumulate_metrics()
        self.status = "finished"
        if self.sink_limit is not None and self.sink_limit.discarded:
            log.info(
                "max_records=%d: %d later records that were on their way to the sinks were not "
                "written",
                self.sink_limit.limit,
                self.sink_limit.discarded,
            )
        return JobResult(
            self.graph.name,
            time.monotonic() - self.started,
            self.operator_summaries(),
            self.attempt,
            len(self.coordinator.completed_ids),
            self.coordinator.stop_savepoint_path,
            self.stopped_by,
        )

    async def stop_with_savepoint(
        self, target_dir: str | None = None, drain: bool = False
    ) -> CompletedCheckpoint:
        """Stop the job with a savepoint (the control endpoint's ``/stop`` and SIGTERM).

        The sources end (``EndOfData(drain=drain)``: with drain, timers fire and ``finish()``
        runs everywhere), the savepoint goes into ``target_dir`` (default
        ``<checkpoint-dir>/savepoints``) and commits like a final checkpoint, and :meth:`run`
        then returns with ``stopped_with_savepoint`` set. Raises
        :class:`~runtime.master.coordinator.CheckpointFailedError` when the savepoint cannot complete;
        tasks whose sources had already stopped then fail the attempt.
        """
        return await self.coordinator.request_trigger(
            CheckpointKind.SAVEPOINT, target_dir, StopRequest(drain)
        )

    async def stop_with_final_checkpoint(self) -> CompletedCheckpoint:
        """End the job as a bounded job ends (the limits of a bounded run use it).

        The same stop as :meth:`stop_with_savepoint` with drain (the sources end, timers fire,
        ``finish()`` runs everywhere), but its snapshot is the job's final checkpoint: in the
        checkpoint directory like any checkpoint, in memory without one, so it needs no
        directory; two-phase sinks commit everything they received when it completes, and
        :meth:`run` then returns. Raises
        :class:`~runtime.master.coordinator.CheckpointFailedError` as that does.
        """
        return await self.coordinator.request_trigger(
            CheckpointKind.CHECKPOINT, None, StopRequest(drain=True)
        )

    def _limit_reached(self, limit: str) -> None:
        """A limit of the bounded run was reached (the timeout's clock callback, or the sinks'
        count): the attempt's :meth:`_stop_at_limits` ends the job."""
        if limit not in self._limits_hit:
            self._limits_hit.append(limit)
        self._limit_wakeup.set()

    def _rewind_limits(self, restore_point: CompletedCheckpoint | None) -> None:
        """A new attempt counts the sinks' records from what its restored checkpoint
        committed: a limit reached in a failed attempt may be ahead of it again."""
        self._limit_wakeup = asyncio.Event()
        if self.sink_limit is not None:
            self.sink_limit.rewind(restore_point.checkpoint_id if restore_point else None)
            if not self.sink_limit.reached and "max_records" in self._limits_hit:
                self._limits_hit.remove("max_records")
        if self._limits_hit:
            self._limit_wakeup.set()

    async def _stop_at_limits(self) -> None:
        """Once a limit of the bounded run is reached and every task runs, end the job with the
        final checkpoint. A stop that fails fails the attempt (its sources already ended), and
        the next attempt stops again."""
        await self._limit_wakeup.wait()
        await self._all_restored.wait()
        limit = self._limits_hit[0]
        log.info("%s reached: the job ends with a final checkpoint", _describe_limit(self, limit))
        self.stopped_by = limit
        try:
            await self.stop_with_final_checkpoint()
        except CheckpointFailedError as exc:
            if all(t.state is TaskState.FINISHED for t in self.handles):
                self.stopped_by = None  # the job had ended by itself
                return
            log.warning("%s: the final checkpoint failed (%s)", _describe_limit(self, limit), exc)

    async def _run_attempt(self) -> None:
        self._all_restored = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            helpers = self.deployment.run(group)
            abandoned = self.restore_context.newer_completed_checkpoints
            if self.restore_point is not None and abandoned:
                group.create_task(
                    self._mark_abandoned_once_restored(self.restore_point, abandoned),
                    name="mark-abandoned-checkpoints",
                )
            group.create_task(self.coordinator.run(), name="checkpoint-coordinator")
            helpers.append(group.create_task(self._sample_metrics(), name="metrics-sampler"))
            if self.limits.any:
                helpers.append(group.create_task(self._stop_at_limits(), name="run-limits"))
            for vertex in self.graph.vertices:
                source = vertex.head.transformation.source
                if source is not None and source.discovery_interval_s and not source.bounded:
                    helpers.append(
                        group.create_task(self._watch_new_splits(vertex), name="split-discovery")
                    )
            await self._all_finished.wait()
            for helper in helpers:
                helper.cancel()
            self.coordinator.request_stop()

    async def _mark_abandoned_once_restored(
        self, restored: CompletedCheckpoint, newer: tuple[int, ...]
    ) -> None:
        """Mark the completed checkpoints newer than ``restored`` abandoned (storage rule 6), once
        every task has restored: not before, since a refused restore leaves the user on the
        timeline of the newest checkpoint, which ``--restore latest`` must still find."""
        await self._all_restored.wait()
        try:
            marked = await self.storage.mark_abandoned(newer, restored)
        except OSError as exc:
            log.warning(
                "could not mark the checkpoint(s) %s in %s abandoned (%s): --restore latest may "
                "pick one of them instead of a checkpoint of this run",
                ", ".join(map(str, newer)),
                self.storage.directory,
                exc,
            )
            return
        if marked:
            log.info(
                "restored %s %d: marked the newer checkpoint(s) %s in %s abandoned",
                restored.kind.value,
                restored.checkpoint_id,
                ", ".join(map(str, marked)),
                self.storage.directory,
            )

    async def _discover_splits(self) -> None:
        """List every source's splits once, on the coordinator, before the first attempt; a
        source's :class:`InfrastructureError` (no input, no broker) ends the job, naming it."""
        restored = self.restore_point.operators if self.restore_point is not None else {}
        for vertex in self.graph.vertices:
            node = vertex.head
            source = node.transformation.source
            if source is None or node.uid in self._splits:
                continue
            if node.uid in restored:
                # Its splits, positions included, come from the restored state; a finished
                # source is not even run, so its input need not exist any more.
                self._splits[node.uid] = []
            else:
                try:
                    self._splits[node.uid] = await source.discover_splits(vertex.parallelism)
                except InfrastructureError as exc:
                    msg = f"source {node.name!r} (uid {node.uid}): {exc}"
                    raise InfrastructureError(msg) from exc

    async def _watch_new_splits(self, vertex: JobVertex) -> None:
        """Periodically hand splits that appeared while running (new partitions) to readers."""
        node = vertex.head
        source = node.transformation.source
        assert source is not None and source.discovery_interval_s
        known = list(self._splits.get(node.uid, []))
        if self.restore_point is not None and node.uid in self.restore_point.operators:
            entry = self.restore_point.operators[node.uid]
            for _, snapshot in entry.subtask_states.snapshots():
                known.extend(list_state_items(snapshot.operator or {}, SPLITS_STATE))
        tasks = [t for t in self.handles if t.task_id.vertex_id == vertex.id]
        while True:
            await asyncio.sleep(source.discovery_interval_s)
            new = await source.discover_new_splits(known)
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # The job is ending and the discovery swallowed the cancellation (aiokafka's
                # consumer.stop() does, when cancelled in it): looping on would keep the job's
                # task group, and so the job, from ever ending.
                raise asyncio.CancelledError
            for split in new:
                index = len(known)
                known.append(split)
                target = source.assign_split(split, index, vertex.parallelism)
                tasks[target].send(AddSplits((split,)))

    # ---------------------------------------------------------------- metrics

    def metrics_snapshot(self) -> JobMetricsSnapshot:
        """Every figure of the job now, for every view (see :mod:`runtime.master.metrics`)."""
        return self.metrics.snapshot(self)

    async def _sample_metrics(self) -> None:
        """Keep the reports the rates come from recent, whoever asks for a snapshot when."""
        while True:
            self.metrics.observe(self.handles)
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    def _accumulate_metrics(self) -> None:
        self.metrics.end_attempt(self.handles)

    def operator_summaries(self, include_live: bool = False) -> list[OperatorSummary]:
        """Records in/out per operator over all attempts so far."""
        live = [m for h in self.handles if (m := h.latest_metrics()) is not None]
        result = []
        for vertex in self.graph.vertices:
            for node in vertex.operators:
                records_in, records_out = self.metrics.operator_totals(
                    node.uid, live if include_live else ()
                )
                result.append(
                    OperatorSummary(node.uid, node.name, node.parallelism, records_in, records_out)
                )
        return result

    # ---------------------------------------------------------------- deployment

    def _restore_context(self, restore_point: CompletedCheckpoint | None) -> RestoreContext:
        config = self.config
        checkpoint_id = restore_point.checkpoint_id if restore_point is not None else None
        newer: list[int] = []
        if self.storage.directory is not None:
            newer = completed_checkpoint_ids_after(self.storage.directory, checkpoint_id)
        return RestoreContext(
            checkpoint_id=checkpoint_id,
            checkpoint_timestamp_ms=restore_point.timestamp_ms if restore_point else None,
            newer_completed_checkpoints=tuple(newer),
            allow_non_restored_state=config.allow_non_restored_state,
            on_newer_committed_output=config.on_newer_committed_output,
            allow_existing_output=config.allow_existing_output,
            checkpoint_dir=str(self.storage.directory) if self.storage.directory else None,
        )

    async def _deploy(self, restore_point: CompletedCheckpoint | None) -> Sequence[TaskHandle]:
        plan = AttemptDeployment(
            self.attempt,
            assign_restored_state(self.graph, restore_point),
            self._splits,
            self.restore_context,
        )
        return await self.deployment.deploy(plan, self)


def root_cause(group: BaseException) -> BaseException:
    """The failure that started it all: user code first, then task failures, then anything."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, asyncio.CancelledError):
            leaves.append(exc)

    walk(group)
    if not leaves:
        return group
    for kind in (UserFunctionError, TaskFailure):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]


def _describe_limit(master: JobMaster, limit: str) -> str:
    if limit == "timeout":
        return f"timeout={format_duration((master.limits.timeout_ms or 0) / 1000)}"
    return f"max_records={master.limits.max_records}"


def describe_failure(failure: BaseException) -> str:
    if isinstance(failure, UserFunctionError | TaskFailure):
        return str(failure)
    return f"{type(failure).__name__}: {failure}"
