"""Subtasks built by ``runtime.plan.execution`` alone, as a TaskManager builds them: no job master
and no coordinator; the test plays the master, and talks to the tasks only in protocol messages."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from loop_helpers import wait_until

from actors.faults import InjectedCrash
from actors.operator import RestoreContext, UserFunctionError
from actors.protocol import (
    AcknowledgeCheckpoint,
    CancelTask,
    FailureCategory,
    NotifyCheckpointComplete,
    TaskId,
    TaskReport,
    TaskState,
    TaskStateChanged,
    TriggerCheckpoint,
    failure_from_info,
)
from actors.task import StreamTask
from actors.wire import decode_message, encode_message
from connectors import CollectionSource, CollectSink, GeneratorSource
from runtime.api.functions import RuntimeContext
from runtime.api.sinks import Sink, SinkWriter
from runtime.config import ExecutionConfig
from runtime.master.jobmaster import describe_failure
from runtime.plan.execution import LocalChannels, build_subtask, upstream_task_ids
from runtime.plan.graph import JobGraph
from runtime.shell.runner import build_graph

WAIT_S = 10.0


class WireListener:
    """Keeps every report after a round trip through the wire encoding, as a TaskManager's
    control connection would deliver it."""

    def __init__(self) -> None:
        self.reports: list[TaskReport] = []

    def report(self, message: TaskReport) -> None:
        self.reports.append(decode_message(encode_message(message)))

    def states(self, task: TaskId) -> list[TaskState]:
        return [r.state for r in self.reports if isinstance(r, TaskStateChanged) and r.task == task]

    def acks(self, checkpoint_id: int) -> list[AcknowledgeCheckpoint]:
        return [
            r
            for r in self.reports
            if isinstance(r, AcknowledgeCheckpoint) and r.checkpoint_id == checkpoint_id
        ]


async def deploy(graph: JobGraph, listener: WireListener, attempt: int = 1) -> list[StreamTask]:
    channels = LocalChannels(graph)
    splits: dict[str, list[Any]] = {}
    for vertex in graph.vertices:
        source = vertex.head.transformation.source
        if source is not None:
            splits[vertex.head.uid] = await source.discover_splits(vertex.parallelism)
    return [
        build_subtask(
            graph,
            vertex,
            index,
            channels.endpoints(vertex, index),
            splits=splits,
            restored={},
            restored_finished=False,
            restore_context=RestoreContext(),
            attempt=attempt,
            config=ExecutionConfig(),
            listener=listener,
        )
        for vertex in graph.vertices
        for index in range(vertex.parallelism)
    ]


@pytest.mark.asyncio
async def test_subtasks_run_to_their_end_on_protocol_messages_alone() -> None:
    sink = CollectSink()

    def build(job: Any) -> None:
        job.from_source(CollectionSource(range(10))).map(lambda x: x * 2).rebalance().sink_to(sink)

    graph = build_graph(build, parallelism=2)
    listener = WireListener()
    tasks = await deploy(graph, listener, attempt=3)
    assert [t.task_id.attempt for t in tasks] == [3] * 4
    sources = [t for t in tasks if t.is_source]
    sink_vertex = graph.vertices[1]
    assert upstream_task_ids(graph, sink_vertex, 0, 3) == tuple(t.task_id for t in sources)
    runners = [asyncio.create_task(t.run()) for t in tasks]
    await wait_until(
        lambda: all(t.state is TaskState.FINISHING for t in tasks), "every task to end its data"
    )
    # As the coordinator does: trigger the tasks whose upstream all finished (here: none has
    # finished, so the sources); the barrier reaches the sinks in-band.
    for task in sources:
        assert task.handle_command(TriggerCheckpoint(1, 1_700_000_000_000))
    await wait_until(lambda: len(listener.acks(1)) == len(tasks), "every acknowledgement")
    assert all(ack.finished for ack in listener.acks(1))
    for task in tasks:
        assert task.handle_command(NotifyCheckpointComplete(1))
    await asyncio.wait_for(asyncio.gather(*runners), WAIT_S)

    assert sorted(sink.committed) == [x * 2 for x in range(10)]
    for task in tasks:
        assert listener.states(task.task_id) == [
            TaskState.INITIALIZING,
            TaskState.RUNNING,
            TaskState.FINISHING,
            TaskState.FINISHED,
        ]
        assert not task.handle_command(NotifyCheckpointComplete(2)), "it ended: no more mail"
    map_uid = graph.vertices[0].operators[1].uid
    assert sum(t.metrics_report().records[map_uid].records_out for t in sources) == 10


@pytest.mark.asyncio
async def test_cancel_task_ends_a_running_task_as_canceled() -> None:
    def build(job: Any) -> None:
        job.from_source(GeneratorSource(lambda i: i, rate=1000)).rebalance().sink_to(CollectSink())

    listener = WireListener()
    tasks = await deploy(build_graph(build, parallelism=1), listener)
    runners = [asyncio.create_task(t.run()) for t in tasks]
    await wait_until(lambda: all(t.state is TaskState.RUNNING for t in tasks), "tasks to run")
    for task in tasks:
        assert task.handle_command(CancelTask("the attempt ended"))
    results = await asyncio.wait_for(asyncio.gather(*runners, return_exceptions=True), WAIT_S)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    for task in tasks:
        assert listener.states(task.task_id)[-1] is TaskState.CANCELED
        assert not task.handle_command(CancelTask())


@pytest.mark.asyncio
async def test_a_failed_task_reports_a_failure_the_master_can_rebuild() -> None:
    def fail_on_three(x: int) -> int:
        if x == 3:
            raise ValueError("three is not allowed")
        return x

    def build(job: Any) -> None:
        job.from_source(CollectionSource(range(5))).map(fail_on_three, name="check").sink_to(
            CollectSink()
        )

    listener = WireListener()
    [task] = await deploy(build_graph(build, parallelism=1), listener)
    with pytest.raises(UserFunctionError) as raised:
        await asyncio.wait_for(task.run(), WAIT_S)
    [report] = [
        r for r in listener.reports if isinstance(r, TaskStateChanged) and r.failure is not None
    ]
    assert report.state is TaskState.FAILED
    assert report.failure is not None
    assert report.failure.category is FailureCategory.USER_FUNCTION
    assert report.failure.operator_name == "check"
    rebuilt = failure_from_info(report.failure)
    assert isinstance(rebuilt, UserFunctionError)
    assert describe_failure(rebuilt) == describe_failure(raised.value)
    assert "three is not allowed" in describe_failure(rebuilt)


class _CloseOnSignal(Sink):
    """A sink whose ``close()`` waits until the test lets it end (a sink flushing a while)."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.may_close = asyncio.Event()

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        sink = self

        class Writer(SinkWriter):
            async def write(self, values: list[Any]) -> None:
                pass

            async def close(self) -> None:
                sink.closing.set()
                await sink.may_close.wait()

        return Writer()


@pytest.mark.asyncio
@pytest.mark.parametrize("cause", ["user function", "task failure"])
async def test_a_task_cancelled_while_it_closes_after_a_failure_still_reports_it_failed(
    cause: str,
) -> None:
    # A TaskManager tells its JobManager that a task ended only through its last state report:
    # the cancel of the attempt, arriving while the failed task still closes, must not lose it.
    def fail_on_three(x: int) -> int:
        if x == 3:
            if cause == "user function":
                raise ValueError("three is not allowed")
            raise InjectedCrash("injected crash at three")
        return x

    sink = _CloseOnSignal()

    def build(job: Any) -> None:
        job.from_source(CollectionSource(range(5))).map(fail_on_three, name="check").sink_to(sink)

    listener = WireListener()
    [task] = await deploy(build_graph(build, parallelism=1), listener)
    runner = asyncio.create_task(task.run())
    await asyncio.wait_for(sink.closing.wait(), WAIT_S)
    assert task.handle_command(CancelTask("the attempt ended"))
    sink.may_close.set()
    with pytest.raises(BaseException):  # noqa: B017, PT011 (whichever: failure or cancel)
        await asyncio.wait_for(runner, WAIT_S)
    states = listener.states(task.task_id)
    assert states[-1] is TaskState.FAILED, states
    [failed] = [r for r in listener.reports if isinstance(r, TaskStateChanged) and r.failure]
    assert failed.failure is not None
    assert "three" in failed.failure.message
