"""The job's metrics snapshot (``runtime.master.metrics``) and the keys ``/status`` shows of it:
busy, idle and backpressured time measured in the task loop, rates, queues, watermarks, record
totals over attempts, and the job's checkpoint counts, uptime and restarts."""

from __future__ import annotations

from typing import Any

import pytest
from loop_helpers import (
    ControlledSource,
    HeldSink,
    ScriptedTaskHandle,
    control_status,
    running_job,
    take_checkpoint,
    wait_until,
    wait_until_in_time,
)

from actors.protocol import OperatorRecords, TaskMetrics, TaskState
from connectors import CollectSink, GeneratorSource
from runtime.api.watermarks import WatermarkStrategy
from runtime.config import CheckpointConfig, ExecutionConfig
from runtime.master.jobmaster import JobMaster
from runtime.master.metrics import JobMetricsSnapshot, OperatorMetrics
from runtime.master.restart import FixedDelayRestart
from runtime.plan.jobfile import build_graph

pytestmark = pytest.mark.asyncio


def operator(snapshot: JobMetricsSnapshot, uid: str) -> OperatorMetrics:
    [found] = [op for op in snapshot.operators if op.uid == uid]
    return found


def running(master: JobMaster) -> bool:
    return bool(master.tasks) and all(t.state is TaskState.RUNNING for t in master.tasks)


async def test_a_held_back_sink_backpressures_its_upstream_and_is_busy() -> None:
    sink = HeldSink(held=True)

    def build(job: Any) -> None:
        (
            job.from_source(GeneratorSource(lambda i: i))
            .uid("numbers")
            .map(lambda x: x + 1, name="plus one")
            .uid("plus")
            .sink_to(sink)
            .uid("held")
            .disable_chaining()
        )

    async with running_job(build) as (master, job):

        def held_back() -> bool:
            snapshot = master.metrics_snapshot()
            upstream = operator(snapshot, "plus").backpressured_ms_per_s
            busy = operator(snapshot, "held").busy_ms_per_s
            return upstream is not None and upstream > 800 and busy is not None and busy > 800

        await wait_until_in_time(held_back, "backpressure upstream of the held sink", job)
        snapshot = master.metrics_snapshot()
        source, held = operator(snapshot, "plus"), operator(snapshot, "held")
        # The source and the map are one chain: one task, the same figures.
        assert operator(snapshot, "numbers").backpressured_ms_per_s == source.backpressured_ms_per_s
        [upstream] = source.subtasks
        assert upstream.output_queue > 0 and upstream.output_credit == 0
        assert held.subtasks[0].input_queue > 0
        assert held.backpressured_ms_per_s == 0.0
        assert held.idle_ms_per_s is not None and held.idle_ms_per_s < 200
        assert held.vertex == 1 and source.vertex == 0


async def test_a_source_with_nothing_to_read_is_idle_and_so_is_its_consumer() -> None:
    source = ControlledSource("quiet")
    sink = CollectSink()

    def build(job: Any) -> None:
        job.from_source(source).uid("quiet").sink_to(sink).uid("out").disable_chaining()

    async with running_job(build) as (master, job):
        source.push(1, 2, 3)
        await wait_until(lambda: len(sink.results) == 3, "the records", job)

        def idle() -> bool:
            snapshot = master.metrics_snapshot()
            return all(
                (ms := operator(snapshot, uid).idle_ms_per_s) is not None
                and ms > 800
                and operator(snapshot, uid).records_out_per_s == 0.0
                and operator(snapshot, uid).records_in_per_s == 0.0
                for uid in ("quiet", "out")
            )

        await wait_until_in_time(idle, "both tasks to be idle", job)
        snapshot = master.metrics_snapshot()
        for uid in ("quiet", "out"):
            op = operator(snapshot, uid)
            assert op.backpressured_ms_per_s == 0.0
            assert op.busy_ms_per_s is not None and op.busy_ms_per_s < 200
        assert operator(snapshot, "quiet").records_out == 3
        assert operator(snapshot, "out").records_in == 3
        assert operator(snapshot, "out").subtasks[0].buffers_in >= 1


async def test_status_has_the_job_operator_and_subtask_figures_of_the_snapshot() -> None:
    source = ControlledSource("numbers")
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("numbers")
            .map(lambda x: x * 2, name="double")
            .uid("double")
            .sink_to(sink)
            .uid("out")
            .disable_chaining()
        )

    async with running_job(build) as (master, job):
        await wait_until(lambda: running(master), "every task running", job)
        source.push(*range(100))
        await wait_until(lambda: len(sink.results) == 100, "the records", job)
        checkpoint = await take_checkpoint(master)
        await wait_until_in_time(
            lambda: operator(master.metrics_snapshot(), "out").busy_ms_per_s is not None,
            "two reports of every task",
            job,
        )
        status = await control_status(master)
    assert status["job"] == "job" and status["status"] == "running" and status["attempt"] == 1
    assert status["uptime_s"] > 0
    assert status["restarts"] == 0
    assert status["checkpoints"] == {
        "completed": 1,
        "failed": 0,
        "in_progress": 0,
        "last_duration_ms": status["checkpoints"]["last_duration_ms"],
        "last_size_bytes": checkpoint.state_size,
        "last_completed_id": checkpoint.checkpoint_id,
    }
    assert status["checkpoints"]["last_duration_ms"] >= 0
    assert status["alert"] == {"active": False, "message": None}
    ops = {op["uid"]: op for op in status["operators"]}
    assert (ops["numbers"]["records_out"], ops["double"]["records_in"]) == (100, 100)
    assert (ops["double"]["records_out"], ops["out"]["records_in"]) == (100, 100)
    assert [ops[uid]["vertex"] for uid in ("numbers", "double", "out")] == [0, 0, 1]
    for op in ops.values():
        for key in ("records_in_per_s", "records_out_per_s", "busy_ms_per_s", "idle_ms_per_s"):
            assert 0 <= op[key] <= (1000 if key.endswith("ms_per_s") else 1e9), (key, op)
        assert op["backpressured_ms_per_s"] == 0.0
        [subtask] = op["subtasks"]
        assert subtask["taskmanager"] is None
        assert (subtask["records_in"], subtask["records_out"]) == (
            op["records_in"],
            op["records_out"],
        )
        assert subtask["busy_ms_per_s"] == op["busy_ms_per_s"]
        assert subtask["input_queue"] == 0 and subtask["output_queue"] == 0
    # The sink's task has an input: its (output) credit is none, its input watermark not yet.
    out = ops["out"]["subtasks"][0]
    assert out["output_credit"] == 0 and out["input_watermark"] is None
    assert ops["double"]["subtasks"][0]["output_credit"] > 0
    assert ops["numbers"]["input_watermark"] is None


async def test_records_count_once_over_attempts_and_restarts_are_counted() -> None:
    failures = []

    def fail_once(value: int) -> int:
        if value == 5 and not failures:
            failures.append(value)
            msg = "the first attempt fails"
            raise ValueError(msg)
        return value

    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(GeneratorSource(lambda i: i, count=10))
            .uid("numbers")
            .map(fail_once, name="fail once")
            .uid("fail")
            .sink_to(sink)
            .uid("out")
            .disable_chaining()
        )

    config = ExecutionConfig(restart_strategy=FixedDelayRestart(1, 0.0))
    master = JobMaster(build_graph(build, None, 1), config)
    result = await master.run()
    snapshot = master.metrics_snapshot()
    assert snapshot.restarts == 1 and snapshot.status == "finished"
    out = operator(snapshot, "out")
    # Without checkpoints the second attempt starts over: 10 records reach the sink then; the
    # first attempt's records before the failure count too, once.
    summaries = {s.uid: s for s in result.operators}
    assert out.records_in == summaries["out"].records_in
    assert out.subtasks[0].records_in == out.records_in
    assert operator(snapshot, "fail").records_in == summaries["fail"].records_in
    assert len(sink.results) >= 10
    assert out.records_in == len(sink.results)
    # Ended tasks: nothing flows any more.
    assert out.records_in_per_s == 0.0 and out.busy_ms_per_s == 0.0


async def test_checkpoint_counts_count_failures_beyond_the_history() -> None:
    sink = HeldSink()
    source = ControlledSource("numbers")

    def build(job: Any) -> None:
        job.from_source(source).uid("numbers").sink_to(sink).uid("held")

    config = ExecutionConfig(checkpoint=CheckpointConfig(tolerable_failures=1000))
    async with running_job(build, config=config) as (master, job):
        await wait_until(lambda: running(master), "every task running", job)
        sink.fail_snapshots = True
        for _ in range(3):
            with pytest.raises(Exception, match="held sink fails"):
                await take_checkpoint(master)
        sink.fail_snapshots = False
        await take_checkpoint(master)
        del master.coordinator.history[:]  # the history is capped; the counts are not
        counts = master.metrics_snapshot().checkpoints
    assert (counts.completed, counts.failed, counts.in_progress) == (1, 3, 0)
    assert counts.last_completed_id == 4


async def test_an_input_watermark_is_the_tasks_combined_one_or_the_chain_predecessors() -> None:
    source = ControlledSource("events")
    sink = CollectSink()
    strategy = WatermarkStrategy.for_bounded_out_of_orderness(500).with_timestamp_assigner(
        lambda value, _ts: value
    )

    def build(job: Any) -> None:
        (
            job.from_source(source, watermark_strategy=strategy)
            .uid("events")
            .map(lambda x: x, name="copy")
            .uid("copy")
            .sink_to(sink)
            .uid("out")
            .disable_chaining()
        )

    async with running_job(build) as (master, job):
        source.push(1000, 2000)
        await wait_until(
            lambda: operator(master.metrics_snapshot(), "out").input_watermark == 1499,
            "the watermark to reach the sink's input",
            job,
        )
        snapshot = master.metrics_snapshot()
    events, copy = operator(snapshot, "events"), operator(snapshot, "copy")
    assert events.input_watermark is None and events.watermark == 1499
    assert copy.input_watermark == 1499 and copy.watermark == 1499
    assert operator(snapshot, "out").subtasks[0].input_watermark == 1499


async def test_counts_after_the_job_ended_equal_its_result_not_twice() -> None:
    sink = CollectSink()

    def build(job: Any) -> None:
        job.from_source(GeneratorSource(lambda i: i, count=1000)).uid("numbers").sink_to(sink).uid(
            "out"
        )

    master = JobMaster(build_graph(build, None, 2))
    result = await master.run()
    final = {s.uid: (s.records_in, s.records_out) for s in result.operators}
    assert final == {"numbers": (0, 1000), "out": (1000, 0)}
    # What the progress display and /status read once the job ended: the same counts.
    live = {s.uid: (s.records_in, s.records_out) for s in master.operator_summaries(True)}
    assert live == final
    snapshot = master.metrics_snapshot()
    assert {op.uid: (op.records_in, op.records_out) for op in snapshot.operators} == final
    assert sum(s.records_out for s in operator(snapshot, "numbers").subtasks) == 1000


def report(handle: ScriptedTaskHandle, time_s: float, **fields: Any) -> TaskMetrics:
    records = fields.pop("records", (0, 0))
    return TaskMetrics(
        handle.task_id, {"op": OperatorRecords(*records)}, None, time_s=time_s, **fields
    )


async def test_rates_come_from_reports_a_second_apart_and_stop_when_the_task_ended() -> None:
    def build(job: Any) -> None:
        job.from_source(GeneratorSource(lambda i: i)).uid("op").sink_to(CollectSink())

    master = JobMaster(build_graph(build, None, 1))
    [vertex] = master.graph.vertices
    handle = ScriptedTaskHandle(vertex.id, operator_uids=("op",))
    master.handles = [handle]

    def snapshot_of(metrics: TaskMetrics) -> Any:
        handle.metrics = metrics
        [subtask] = operator(master.metrics_snapshot(), "op").subtasks
        return subtask

    first = snapshot_of(report(handle, 100.0, records=(0, 0)))
    assert first.records_out_per_s is None and first.busy_ms_per_s is None
    # 0.1 s later: too close for a rate.
    close = snapshot_of(report(handle, 100.1, records=(0, 50), busy_ms=100.0))
    assert close.records_out_per_s is None and close.records_out == 50
    # 0.5 s after the first: a rate over those 0.5 s.
    half = snapshot_of(
        report(handle, 100.5, records=(0, 500), busy_ms=200.0, idle_ms=250.0, backpressured_ms=50.0)
    )
    assert half.records_out_per_s == pytest.approx(1000.0)
    assert (half.busy_ms_per_s, half.idle_ms_per_s, half.backpressured_ms_per_s) == (
        pytest.approx(400.0),
        pytest.approx(500.0),
        pytest.approx(100.0),
    )
    # Once a second of reports is kept, the oldest ones go: the rate is the last second's.
    snapshot_of(report(handle, 101.0, records=(0, 1000), busy_ms=700.0))
    later = snapshot_of(report(handle, 101.6, records=(0, 1100), busy_ms=700.0))
    assert later.records_out_per_s == pytest.approx(600 / 1.1)  # from the report at 100.5
    assert later.busy_ms_per_s == pytest.approx(500 / 1.1)
    # The same report again changes nothing; a task that ended shows nothing flowing.
    assert snapshot_of(handle.metrics).records_out_per_s == later.records_out_per_s
    handle.state = TaskState.FINISHED
    ended = snapshot_of(report(handle, 101.7, records=(0, 1100), busy_ms=700.0))
    assert (ended.records_out_per_s, ended.busy_ms_per_s) == (0.0, 0.0)
    assert ended.records_out == 1100
