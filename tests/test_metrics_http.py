"""``GET /metrics``: the job's metrics in the Prometheus text format, read back with
prometheus-client's parser while the job runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cli_helpers import metric_samples
from loop_helpers import (
    ControlledSource,
    HeldSink,
    control_metrics,
    running_job,
    take_checkpoint,
    wait_until,
    wait_until_in_time,
)

from actors.protocol import TaskState
from runtime.master.jobmaster import JobMaster

pytestmark = pytest.mark.asyncio

SUBTASK_FAMILIES = {
    "pyflow_records_in": "counter",
    "pyflow_records_out": "counter",
    "pyflow_buffers_in": "counter",
    "pyflow_buffers_out": "counter",
    "pyflow_records_in_per_second": "gauge",
    "pyflow_records_out_per_second": "gauge",
    "pyflow_busy_time_ms_per_second": "gauge",
    "pyflow_idle_time_ms_per_second": "gauge",
    "pyflow_backpressured_time_ms_per_second": "gauge",
    "pyflow_current_watermark_ms": "gauge",
    "pyflow_current_input_watermark_ms": "gauge",
    "pyflow_input_queue_length": "gauge",
    "pyflow_output_queue_length": "gauge",
    "pyflow_output_available_credit": "gauge",
    "pyflow_checkpoint_alignment_time_ms": "gauge",
    "pyflow_checkpoint_snapshot_time_ms": "gauge",
    "pyflow_kafka_consumer_lag": "gauge",
}
JOB_FAMILIES = {
    "pyflow_checkpoints_total": "gauge",
    "pyflow_last_checkpoint_duration_seconds": "gauge",
    "pyflow_last_checkpoint_size_bytes": "gauge",
    "pyflow_job_restarts": "counter",
    "pyflow_job_uptime_seconds": "gauge",
    "pyflow_checkpoint_failure_alert": "gauge",
}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    [found] = metric_samples(families, sample, **labels)
    return float(found.value)


def running(master: JobMaster) -> bool:
    return bool(master.tasks) and all(t.state is TaskState.RUNNING for t in master.tasks)


async def test_metrics_show_records_backpressure_and_checkpoints_of_a_running_job() -> None:
    source = ControlledSource("numbers")
    sink = HeldSink()

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("numbers")
            .map(lambda x: x + 1, name="plus one")
            .uid("plus")
            .sink_to(sink)
            .uid("held")
            .disable_chaining()
        )

    async with running_job(build) as (master, job):
        await wait_until(lambda: running(master), "every task running", job)
        source.push(*range(500))
        await wait_until(lambda: len(sink.results) == 500, "the first records", job)
        checkpoint = await take_checkpoint(master)
        families = await control_metrics(master)
        for name, kind in {**SUBTASK_FAMILIES, **JOB_FAMILIES}.items():
            assert families[name].type == kind, name
        plus = {"job": "job", "operator": "plus one", "operator_uid": "plus", "subtask": "0"}
        assert value(families, "pyflow_records_in_total", **plus) == 500
        assert value(families, "pyflow_records_out_total", **plus) == 500
        assert value(families, "pyflow_records_in_total", operator_uid="held") == 500
        assert value(families, "pyflow_buffers_in_total", operator_uid="held") >= 1
        assert value(families, "pyflow_checkpoints_total", job="job", status="completed") == 1
        assert value(families, "pyflow_checkpoints_total", status="failed") == 0
        assert value(families, "pyflow_checkpoints_total", status="in_progress") == 0
        assert value(families, "pyflow_last_checkpoint_size_bytes", job="job") == (
            checkpoint.state_size
        )
        assert value(families, "pyflow_last_checkpoint_duration_seconds") >= 0
        assert value(families, "pyflow_job_restarts_total", job="job") == 0
        assert value(families, "pyflow_job_uptime_seconds") > 0
        assert value(families, "pyflow_checkpoint_failure_alert", job="job") == 0
        assert value(families, "pyflow_checkpoint_alignment_time_ms", operator_uid="held") >= 0
        assert value(families, "pyflow_checkpoint_snapshot_time_ms", operator_uid="held") > 0
        # No event time in this job: no watermark sample yet.
        assert metric_samples(families, "pyflow_current_watermark_ms") == []

        # The sink is held back from now on: its upstream waits for credit.
        sink.release.clear()
        source.push(*range(500, 200_000))

        def held_back() -> bool:
            snapshot = master.metrics_snapshot()
            [upstream, held] = [op for op in snapshot.operators if op.uid in ("plus", "held")]
            return (upstream.backpressured_ms_per_s or 0) > 800 and (held.busy_ms_per_s or 0) > 800

        await wait_until_in_time(held_back, "backpressure upstream of the held sink", job)
        latest = await control_metrics(master)
        assert value(latest, "pyflow_backpressured_time_ms_per_second", **plus) > 800
        assert value(latest, "pyflow_busy_time_ms_per_second", operator_uid="held") > 800
        assert value(latest, "pyflow_idle_time_ms_per_second", operator_uid="held") < 200
        assert value(latest, "pyflow_output_queue_length", **plus) > 0
        assert value(latest, "pyflow_output_available_credit", **plus) == 0
        assert value(latest, "pyflow_input_queue_length", operator_uid="held") > 0
        # The source and the map run in one task: the same backpressure.
        numbers = value(latest, "pyflow_backpressured_time_ms_per_second", operator_uid="numbers")
        assert numbers > 800
        sink.release.set()
        source.end()
        await asyncio.wait_for(job, 30)
        families = await control_metrics(master)
    assert len(sink.results) == 200_000
    assert value(families, "pyflow_records_in_total", operator_uid="held") == 200_000
    assert value(families, "pyflow_records_out_total", operator_uid="numbers") == 200_000
