"""Local execution: the job master deploys every subtask of a job as an actor on one event loop.

The :class:`JobMaster` turns the :class:`~runtime.graph.JobGraph` into tasks, channels and writers
(the execution graph), runs them under one ``asyncio.TaskGroup`` together with the checkpoint
coordinator, and on a task failure cancels the attempt (``close()`` runs, ``finish()`` does not),
asks the restart strategy, and restarts from the latest completed checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.mailbox import Wakeup
from actors.network import (
    InputGate,
    ResultSubpartition,
)
from actors.operator import (
    ChainedOutput,
    DiscardingOutput,
    FanOutOutput,
    OperatorContext,
    Output,
    RestoreContext,
    StreamOperator,
    UserFunctionError,
    WriterOutput,
)
from actors.task import (
    AddSplitsMail,
    StopRequest,
    StreamTask,
    TaskFailure,
    TaskState,
)
from actors.writer import RecordWriter
from runtime.config import ExecutionConfig as ExecutionConfig
from runtime.coordinator import CheckpointCoordinator
from runtime.graph import JobGraph, JobVertex
from runtime.restore import assign_restored_state
from runtime.sources import SPLITS_STATE, SourceOperator, assign_splits
from state.keygroups import key_group_range_for_subtask
from state.operator import list_state_items
from state.refusal import restore_refusal
from state.snapshot import RestoredState
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
    ) -> None:
        self.graph = graph
        self.config = config or ExecutionConfig()
        self.storage = storage if storage is not None else CheckpointStorage(None, graph.name)
        self.restore_point = restored
        first_id = max(
            restored.checkpoint_id if restored else 0,
            highest_checkpoint_id(self.storage.directory) if self.storage.directory else 0,
        )
        self.coordinator = coordinator or CheckpointCoordinator(
            self.config.checkpoint,
            self.storage,
            self._describe_operators,
            first_checkpoint_id=first_id + 1,
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
        self.attempt = 0
        self.started = time.monotonic()
        self._all_finished = asyncio.Event()
        self._metric_totals: dict[str, list[int]] = {}
        self.on_attempt_started: Callable[[JobMaster], None] | None = None
        self._splits: dict[str, list[Any]] = {}
        self.status = "created"
        self.restore_context = RestoreContext()
        self.restarts_allowed = True
        """False once the job is being shut down: a failed attempt then ends the job."""
        self._all_restored = asyncio.Event()

    # ---------------------------------------------------------------- TaskListener

    def task_state_changed(self, task: StreamTask, state: TaskState) -> None:
        self.coordinator.on_task_state(task, state)
        if state in _PAST_RESTORE and all(t.state in _PAST_RESTORE for t in self.tasks):
            self._all_restored.set()
        if state is TaskState.FINISHED and all(t.state is TaskState.FINISHED for t in self.tasks):
            self._all_finished.set()

    def acknowledge_checkpoint(
        self,
        task: StreamTask,
        checkpoint_id: int,
        snapshots: dict[str, Any],
        finished: bool,
        alignment_ms: float,
    ) -> None:
        self.coordinator.on_ack(task, checkpoint_id, snapshots, finished, alignment_ms)

    def decline_checkpoint(self, task: StreamTask, checkpoint_id: int, reason: str) -> None:
        self.coordinator.on_decline(task, checkpoint_id, reason)

    # ---------------------------------------------------------------- running

    async def run(self) -> JobResult:
        """Run attempts until the job ends; raises :class:`JobFailedError` when it fails for good."""
        self.started = time.monotonic()
        strategy = self.config.restart_strategy
        await self._discover_splits()
        while True:
            self.attempt += 1
            self._all_finished = asyncio.Event()
            self.restore_context = self._restore_context(self.restore_point)
            self.tasks = self._deploy(self.restore_point)
            self.coordinator.attach(self.tasks, self._upstream_map())
            self.status = "running"
            if self.on_attempt_started is not None:
                self.on_attempt_started(self)
            failure: BaseException
            try:
                await self._run_attempt()
            except asyncio.CancelledError:
                self.status = "canceled"
                raise
            except BaseExceptionGroup as group:
                failure = root_cause(group)
            except Exception as exc:
                failure = exc
            else:
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
        return JobResult(
            self.graph.name,
            time.monotonic() - self.started,
            self.operator_summaries(),
            self.attempt,
            len(self.coordinator.completed_ids),
            self.coordinator.stop_savepoint_path,
        )

    async def stop_with_savepoint(
        self, target_dir: str | None = None, drain: bool = False
    ) -> CompletedCheckpoint:
        """Stop the job with a savepoint (the control endpoint's ``/stop`` and SIGTERM).

        The sources end (``EndOfData(drain=drain)``: with drain, timers fire and ``finish()``
        runs everywhere), the savepoint goes into ``target_dir`` (default
        ``<checkpoint-dir>/savepoints``) and commits like a final checkpoint, and :meth:`run`
        then returns with ``stopped_with_savepoint`` set. Raises
        :class:`~runtime.coordinator.CheckpointFailedError` when the savepoint cannot complete;
        tasks whose sources had already stopped then fail the attempt.
        """
        return await self.coordinator.request_trigger(
            CheckpointKind.SAVEPOINT, target_dir, StopRequest(drain)
        )

    async def _run_attempt(self) -> None:
        self._all_restored = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            for task in self.tasks:
                group.create_task(task.run(), name=task.name)
            abandoned = self.restore_context.newer_completed_checkpoints
            if self.restore_point is not None and abandoned:
                group.create_task(
                    self._mark_abandoned_once_restored(self.restore_point, abandoned),
                    name="mark-abandoned-checkpoints",
                )
            helpers = [group.create_task(self.coordinator.run(), name="checkpoint-coordinator")]
            for vertex in self.graph.vertices:
                source = vertex.head.transformation.source
                if source is not None and source.discovery_interval_s and not source.bounded:
                    helpers.append(
                        group.create_task(self._watch_new_splits(vertex), name="split-discovery")
                    )
            await self._all_finished.wait()
            for helper in helpers[1:]:
                helper.cancel()
            self.coordinator.mailbox.put(("stop",))

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
        """List every source's splits once, on the coordinator, before the first attempt."""
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
                self._splits[node.uid] = await source.discover_splits(vertex.parallelism)

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
        tasks = [t for t in self.tasks if t.vertex_id == vertex.id]
        while True:
            await asyncio.sleep(source.discovery_interval_s)
            new = await source.discover_new_splits(known)
            for split in new:
                index = len(known)
                known.append(split)
                target = source.assign_split(split, index, vertex.parallelism)
                tasks[target].mailbox.try_put(AddSplitsMail([split]))

    # ---------------------------------------------------------------- metrics

    def _accumulate_metrics(self) -> None:
        for uid, (records_in, records_out) in self._live_metrics().items():
            totals = self._metric_totals.setdefault(uid, [0, 0])
            totals[0] += records_in
            totals[1] += records_out

    def _live_metrics(self) -> dict[str, tuple[int, int]]:
        result: dict[str, tuple[int, int]] = {}
        for task in self.tasks:
            for op in task.operators:
                prev = result.get(op.uid, (0, 0))
                result[op.uid] = (prev[0] + op.metrics.records_in, prev[1] + op.metrics.records_out)
        return result

    def operator_summaries(self, include_live: bool = False) -> list[OperatorSummary]:
        """Records in/out per operator over all attempts so far."""
        live = self._live_metrics() if include_live else {}
        result = []
        for vertex in self.graph.vertices:
            for node in vertex.operators:
                done = self._metric_totals.get(node.uid, [0, 0])
                cur = live.get(node.uid, (0, 0))
                result.append(
                    OperatorSummary(
                        node.uid, node.name, node.parallelism, done[0] + cur[0], done[1] + cur[1]
                    )
                )
        return result

    # ---------------------------------------------------------------- deployment

    def _describe_operators(self) -> dict[str, tuple[str, int, int, bool]]:
        result: dict[str, tuple[str, int, int, bool]] = {}
        union_uids = set()
        for task in self.tasks:
            for op in task.operators:
                store = getattr(op, "operator_state", None) or getattr(op, "_state", None)
                if store is not None and getattr(store, "uses_union_state", False):
                    union_uids.add(op.uid)
        for node in self.graph.operators.values():
            result[node.uid] = (
                node.name,
                node.parallelism,
                node.max_parallelism,
                node.uid in union_uids,
            )
        return result

    def _upstream_map(self) -> dict[str, list[StreamTask]]:
        by_vertex: dict[str, list[StreamTask]] = {}
        for task in self.tasks:
            by_vertex.setdefault(task.vertex_id, []).append(task)
        result: dict[str, list[StreamTask]] = {}
        for task in self.tasks:
            upstream: list[StreamTask] = []
            for edge in self.graph.edges:
                if edge.target_vertex.id != task.vertex_id:
                    continue
                senders = by_vertex[edge.source_vertex.id]
                if edge.pointwise:
                    upstream.append(senders[task.subtask_index])
                else:
                    upstream.extend(senders)
            result[task.task_id] = upstream
        return result

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

    def _deploy(self, restore_point: CompletedCheckpoint | None) -> list[StreamTask]:
        graph = self.graph
        restored_state = assign_restored_state(graph, restore_point)
        subpartitions: dict[int, list[list[ResultSubpartition]]] = {}
        for edge in graph.edges:
            sender_p = edge.source_vertex.parallelism
            receiver_p = edge.target_vertex.parallelism
            per_sender = []
            for u in range(sender_p):
                count = 1 if edge.pointwise else receiver_p
                per_sender.append(
                    [
                        ResultSubpartition(f"{edge.source_vertex.name} ({u + 1}/{sender_p})")
                        for _ in range(count)
                    ]
                )
            subpartitions[id(edge)] = per_sender
        splits = self._splits
        tasks: list[StreamTask] = []
        for vertex in graph.vertices:
            for index in range(vertex.parallelism):
                tasks.append(
                    self._deploy_subtask(vertex, index, subpartitions, splits, restored_state)
                )
        return tasks

    def _deploy_subtask(
        self,
        vertex: JobVertex,
        index: int,
        subpartitions: dict[int, list[list[ResultSubpartition]]],
        splits: dict[str, list[Any]],
        restored_state: dict[tuple[str, int], tuple[dict[str, RestoredState], bool]],
    ) -> StreamTask:
        graph = self.graph
        config = self.config
        p = vertex.parallelism
        name = f"{vertex.name} ({index + 1}/{p})"
        wakeup = Wakeup()
        inputs = graph.inputs_of(vertex)
        gate: InputGate | None = None
        if inputs:
            gate = InputGate(name, wakeup, config.floating_buffers)
            for edge in inputs:
                senders = subpartitions[id(edge)]
                for u, subs in enumerate(senders):
                    if edge.pointwise:
                        if u == index:
                            gate.add_channel(
                                subs[0], config.exclusive_credits, edge.input_index, subs[0].name
                            )
                    else:
                        gate.add_channel(
                            subs[index],
                            config.exclusive_credits,
                            edge.input_index,
                            subs[index].name,
                        )
        operators: dict[int, StreamOperator] = {}
        for node in vertex.operators:
            t = node.transformation
            if t.kind == "source":
                assert t.source is not None
                operators[t.id] = SourceOperator(
                    node.name,
                    node.uid,
                    t.source,
                    assign_splits(t.source, splits.get(node.uid, []), p, index),
                )
            else:
                assert t.operator_factory is not None
                operators[t.id] = t.operator_factory(node.name, node.uid)
        writers_by_op: dict[int, list[RecordWriter]] = {}
        all_writers: list[RecordWriter] = []
        for edge in graph.outputs_of(vertex):
            writer = RecordWriter(
                subpartitions[id(edge)][index], edge.partitioner_factory(), config.buffer_size
            )
            writers_by_op.setdefault(edge.source_operator.transformation.id, []).append(writer)
            all_writers.append(writer)
        restored, finished = restored_state.get((vertex.id, index), ({}, False))
        task = StreamTask(
            name,
            vertex.id,
            index,
            p,
            [operators[n.transformation.id] for n in vertex.operators],
            gate,
            all_writers,
            self,
            wakeup,
            restored=restored,
            restored_finished=finished,
            checkpointing_mode=config.checkpoint.mode,
            buffer_timeout_s=config.buffer_timeout_s,
        )
        for node in vertex.operators:
            op = operators[node.transformation.id]
            outputs: list[Output] = [
                ChainedOutput(op, operators[c.transformation.id])
                for c in vertex.chained.get(node.transformation.id, [])
            ]
            writers = writers_by_op.get(node.transformation.id)
            if writers:
                outputs.append(WriterOutput(op, writers))
            output: Output
            if not outputs:
                output = DiscardingOutput()
            elif len(outputs) == 1:
                output = outputs[0]
            else:
                output = FanOutOutput(outputs)
            op.setup(
                OperatorContext(
                    operator_name=node.name,
                    operator_uid=node.uid,
                    task_name=name,
                    subtask_index=index,
                    parallelism=p,
                    max_parallelism=node.max_parallelism,
                    attempt=self.attempt,
                    params=graph.params,
                    clock=config.clock,
                    key_groups=key_group_range_for_subtask(node.max_parallelism, p, index),
                    scheduler=task,
                    checkpoint_interval_s=self.config.checkpoint.interval_s,
                    restore=self.restore_context,
                ),
                output,
            )
        return task


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


def describe_failure(failure: BaseException) -> str:
    if isinstance(failure, UserFunctionError | TaskFailure):
        return str(failure)
    return f"{type(failure).__name__}: {failure}"
