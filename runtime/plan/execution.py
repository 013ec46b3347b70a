"""The execution graph: one attempt's subtasks, their channels and writers, built from the job graph.

:func:`build_subtask` builds one :class:`~actors.task.StreamTask` (operators, chaining outputs,
record writers, input gate) from the :class:`~runtime.plan.graph.JobGraph` alone plus what the master
decides per attempt (channel endpoints, splits, restored state, restore context, attempt), so the
job master in this process and a TaskManager in another build subtasks with the same code.
:class:`LocalChannels` makes the endpoints of channels whose both ends run in one process (a
TaskManager makes its own, for channels to subtasks in other processes too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from actors.mailbox import Wakeup
from actors.network import ChannelSender, InputGate, ResultSubpartition
from actors.operator import (
    ChainedOutput,
    DiscardingOutput,
    FanOutOutput,
    OperatorContext,
    Output,
    RestoreContext,
    StreamOperator,
    WriterOutput,
)
from actors.partitioner import KeyGroupPartitioner
from actors.protocol import TaskId
from actors.task import StreamTask, TaskListener
from actors.writer import RecordWriter
from runtime.api.sources import SourceOperator, assign_splits
from runtime.config import ExecutionConfig
from runtime.plan.graph import JobEdge, JobGraph, JobVertex
from runtime.plan.limits import RecordLimitedSink, SinkRecordLimit
from state.keygroups import key_group_range_for_subtask
from state.snapshot import RestoredState


@dataclass(frozen=True)
class InputEndpoint:
    """One channel of a subtask's input gate: the sending end it reads, for which input."""

    sender: ChannelSender
    """The sending subtask's subpartition when it runs in this process, else the stand-in of
    the one in another process (:meth:`actors.remote.DataPlane.remote_sender`)."""
    input_index: int


@dataclass(frozen=True)
class SubtaskEndpoints:
    """The ends of every channel one subtask reads and writes."""

    inputs: tuple[InputEndpoint, ...]
    """Gate channels in order: per input edge (``graph.inputs_of``), per sending subtask."""
    outputs: tuple[tuple[ResultSubpartition, ...], ...]
    """Per output edge (``graph.outputs_of``), the subpartitions this subtask writes: one per
    receiving subtask, or one for a pointwise edge."""


def subtask_name(vertex: JobVertex, index: int) -> str:
    return f"{vertex.name} ({index + 1}/{vertex.parallelism})"


class LocalChannels:
    """Every channel of one attempt with both ends in this process: a subpartition per pair of a
    sending and a receiving subtask (per sender, one for a pointwise edge)."""

    def __init__(self, graph: JobGraph) -> None:
        self.graph = graph
        self._by_edge: dict[int, list[list[ResultSubpartition]]] = {}
        for edge in graph.edges:
            sender_p = edge.source_vertex.parallelism
            count = 1 if edge.pointwise else edge.target_vertex.parallelism
            self._by_edge[id(edge)] = [
                [ResultSubpartition(subtask_name(edge.source_vertex, u)) for _ in range(count)]
                for u in range(sender_p)
            ]

    def _senders(self, edge: JobEdge) -> list[list[ResultSubpartition]]:
        return self._by_edge[id(edge)]

    def endpoints(self, vertex: JobVertex, index: int) -> SubtaskEndpoints:
        inputs: list[InputEndpoint] = []
        for edge in self.graph.inputs_of(vertex):
            for u, subs in enumerate(self._senders(edge)):
                if edge.pointwise:
                    if u == index:
                        inputs.append(InputEndpoint(subs[0], edge.input_index))
                else:
                    inputs.append(InputEndpoint(subs[index], edge.input_index))
        outputs = tuple(tuple(self._senders(edge)[index]) for edge in self.graph.outputs_of(vertex))
        return SubtaskEndpoints(tuple(inputs), outputs)


def upstream_task_ids(
    graph: JobGraph, vertex: JobVertex, index: int, attempt: int
) -> tuple[TaskId, ...]:
    """The subtasks that send to subtask ``index`` of ``vertex``."""
    result: list[TaskId] = []
    for edge in graph.inputs_of(vertex):
        sender = edge.source_vertex
        if edge.pointwise:
            result.append(TaskId(sender.id, index, attempt))
        else:
            result.extend(TaskId(sender.id, u, attempt) for u in range(sender.parallelism))
    return tuple(result)


def build_subtask(
    graph: JobGraph,
    vertex: JobVertex,
    index: int,
    endpoints: SubtaskEndpoints,
    *,
    splits: Mapping[str, list[object]],
    restored: Mapping[str, RestoredState],
    restored_finished: bool,
    restore_context: RestoreContext,
    attempt: int,
    config: ExecutionConfig,
    listener: TaskListener,
    sink_limit: SinkRecordLimit | None = None,
) -> StreamTask:
    """Subtask ``index`` of ``vertex`` as a task ready to run.

    ``splits`` holds every split of each source (by operator uid); the subtask takes its share by
    the source's assignment. ``restored`` is this subtask's share of the restored state by
    operator uid, ``restored_finished`` whether all its operators had finished (FLIP-147).
    ``sink_limit``: the count of records that reached the job's sinks, which its sink operators
    stop at (``run_job(max_records=...)``).
    """
    p = vertex.parallelism
    name = subtask_name(vertex, index)
    wakeup = Wakeup()
    gate: InputGate | None = None
    if graph.inputs_of(vertex):
        gate = InputGate(name, wakeup, config.floating_buffers)
        for endpoint in endpoints.inputs:
            gate.add_channel(
                endpoint.sender,
                config.exclusive_credits,
                endpoint.input_index,
                endpoint.sender.name,
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
                assign_splits(t.source, list(splits.get(node.uid, [])), p, index),
                t.watermark_strategy,
            )
        else:
            assert t.operator_factory is not None
            operators[t.id] = t.operator_factory(node.name, node.uid)
            if t.kind == "sink" and sink_limit is not None:
                operators[t.id] = RecordLimitedSink(operators[t.id], sink_limit)
    # Per operator and output (None: the main one, else a side output's tag), its writers.
    writers_by_output: dict[tuple[int, str | None], list[RecordWriter]] = {}
    all_writers: list[RecordWriter] = []
    for edge, subpartitions in zip(graph.outputs_of(vertex), endpoints.outputs, strict=True):
        writer = RecordWriter(list(subpartitions), edge.partitioner_factory(), config.buffer_size)
        key = (edge.source_operator.transformation.id, edge.side_output)
        writers_by_output.setdefault(key, []).append(writer)
        all_writers.append(writer)
    task = StreamTask(
        name,
        vertex.id,
        index,
        p,
        [operators[n.transformation.id] for n in vertex.operators],
        gate,
        all_writers,
        listener,
        wakeup,
        restored=dict(restored),
        restored_finished=restored_finished,
        checkpointing_mode=config.checkpoint.mode,
        buffer_timeout_s=config.buffer_timeout_s,
        attempt=attempt,
        clock=config.clock,
    )
    task.carried_key_inputs = carried_key_inputs(graph.inputs_of(vertex), task.head)
    for node in vertex.operators:
        tid = node.transformation.id
        op = operators[tid]
        outputs: list[Output] = [
            ChainedOutput(op, operators[c.transformation.id]) for c in vertex.chained.get(tid, [])
        ]
        writers = writers_by_output.get((tid, None))
        if writers:
            outputs.append(WriterOutput(op, writers))
        side_outputs: dict[str, Output] = {
            tag: WriterOutput(op, side_writers)
            for (owner, tag), side_writers in writers_by_output.items()
            if owner == tid and tag is not None
        }
        op.setup(
            OperatorContext(
                operator_name=node.name,
                operator_uid=node.uid,
                task_name=name,
                subtask_index=index,
                parallelism=p,
                max_parallelism=node.max_parallelism,
                attempt=attempt,
                params=graph.params,
                clock=config.clock,
                key_groups=key_group_range_for_subtask(node.max_parallelism, p, index),
                scheduler=task,
                checkpoint_interval_s=config.checkpoint.interval_s,
                restore=restore_context,
                auto_watermark_interval_ms=round(config.auto_watermark_interval_s * 1000),
            ),
            _combined(op, outputs),
            side_outputs,
        )
    return task


def carried_key_inputs(edges: list[JobEdge], head: StreamOperator) -> frozenset[int]:
    """The inputs of ``head`` whose every edge is partitioned by the key selector ``head`` takes
    the keys of (:meth:`~actors.operator.StreamOperator.carried_key_selector`): the keys the
    partitioner computed are the ones the operator would compute, nothing changed the records
    in between (a key-partitioned edge ends at its keyed operator)."""
    carried: set[int] = set()
    for input_index in {edge.input_index for edge in edges}:
        selector = head.carried_key_selector(input_index)
        if selector is None:
            continue
        partitioners = [e.partitioner_factory() for e in edges if e.input_index == input_index]
        if all(
            isinstance(p, KeyGroupPartitioner) and p.key_selector is selector for p in partitioners
        ):
            carried.add(input_index)
    return frozenset(carried)


def _combined(owner: StreamOperator, outputs: list[Output]) -> Output:
    if not outputs:
        return DiscardingOutput(owner)
    if len(outputs) == 1:
        return outputs[0]
    return FanOutOutput(outputs)
