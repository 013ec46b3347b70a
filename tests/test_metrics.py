"""The job's metrics snapshot (``runtime.master.metrics``) and the keys ``/status`` shows of it:
busy, idle and backpressured time measured in the task loop, rates, queues, watermarks, record
totals over attempts, and the job's checkpoint counts, uptime and restarts."""

from __future__ import annotations

from typing import Any

import pytest
from loop_helpers import (
    ControlledSource,
    HeldSink,
    control_status,
    running_job,
    take_checkpoint,
    wait_until,
    wait_until_in_time,
)

from actors.protocol import TaskState
from connectors import CollectSink, GeneratorSource
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
    sink = HeldSink()
    sink.release.clear()

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
        sink.release.set()
        await wait_until_in_time(
            lambda: (
                (bp := operator(master.metrics_snapshot(), "plus").backpressured_ms_per_s)
                is not None
                and bp < 500
            ),
            "the backpressure to end once the sink writes again",
            job,
        )


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
