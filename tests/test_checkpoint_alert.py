"""Checkpoint-failure alerting (the Youzan seed): N failed checkpoints within a window log an
ERROR, raise ``/status``'s alert and ``pyflow_checkpoint_failure_alert``, and call the user's hook;
a completed checkpoint clears it. In process on the coordinator's virtual clock, and once through
``python -m runtime run --taskmanagers 2`` with a hook in the job file."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    get_json,
    get_metrics,
    metric_samples,
    printed_address,
    run_cli,
    start_cli,
    stop_process,
    wait_for,
)
from loop_helpers import (
    ControlledSource,
    HeldSink,
    VirtualClock,
    control_metrics,
    control_status,
    take_checkpoint,
    wait_until,
)

from actors.protocol import TaskState
from runtime.config import CheckpointConfig, ExecutionConfig
from runtime.master.alerts import CheckpointFailureAlert, CheckpointFailureThreshold
from runtime.master.coordinator import CheckpointCoordinator, CheckpointFailedError
from runtime.master.jobmaster import JobMaster, checkpointed_operators
from runtime.plan.jobfile import build_graph
from state.storage import CheckpointStorage


def build_with(source: ControlledSource, sink: HeldSink) -> Any:
    def build(job: Any) -> None:
        job.from_source(source).uid("numbers").sink_to(sink).uid("held")

    return build


async def started_on_virtual_time(
    sink: HeldSink, threshold: str, hook: Any
) -> tuple[JobMaster, VirtualClock, Any]:
    graph = build_graph(build_with(ControlledSource("numbers"), sink), None, 1, name="alerting")
    checkpoint = CheckpointConfig(
        tolerable_failures=1000,
        alert_on_failures=CheckpointFailureThreshold.parse(threshold),
        on_failure_alert=hook,
    )
    clock = VirtualClock()
    coordinator = CheckpointCoordinator(
        checkpoint,
        CheckpointStorage(None, graph.name),
        checkpointed_operators(graph),
        clock=clock,
        job_name=graph.name,
    )
    master = JobMaster(graph, ExecutionConfig(checkpoint=checkpoint), coordinator=coordinator)
    job = asyncio.create_task(master.run())
    await wait_until(
        lambda: bool(master.tasks) and all(t.state is TaskState.RUNNING for t in master.tasks),
        "every task running",
        job,
    )
    return master, clock, job


async def fail_checkpoints(master: JobMaster, sink: HeldSink, count: int) -> None:
    sink.fail_snapshots = True
    for _ in range(count):
        with pytest.raises(CheckpointFailedError, match="held sink fails"):
            await take_checkpoint(master)
    sink.fail_snapshots = False


async def stop(job: Any) -> None:
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job


@pytest.mark.asyncio
async def test_n_failures_within_the_window_raise_the_alert_and_a_completed_one_clears_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    alerts: list[CheckpointFailureAlert] = []
    sink = HeldSink()
    master, clock, job = await started_on_virtual_time(sink, "3/10min", alerts.append)
    try:
        caplog.set_level(logging.WARNING)
        await fail_checkpoints(master, sink, 2)
        clock.advance(601)  # the two fall out of the 10 minutes
        await fail_checkpoints(master, sink, 2)
        assert alerts == [] and master.metrics_snapshot().alert.active is False
        clock.advance(60)
        await fail_checkpoints(master, sink, 1)
        [alert] = alerts
        assert (alert.job, alert.failures, alert.window_s) == ("alerting", 3, 600.0)
        assert alert.checkpoint_id == 5 and "held sink fails" in alert.reason
        [logged] = [r for r in caplog.records if r.levelno == logging.ERROR]
        for part in ("'alerting'", "3 checkpoints failed within 10min", "checkpoint 5"):
            assert part in logged.getMessage(), logged.getMessage()
        assert "held sink fails" in logged.getMessage()
        status = await control_status(master)
        assert status["alert"] == {"active": True, "message": alert.message}
        assert status["checkpoints"]["failed"] == 5
        metrics = await control_metrics(master)
        [raised] = metric_samples(metrics, "pyflow_checkpoint_failure_alert", job="alerting")
        assert raised.value == 1
        # More failures keep the alert raised; the hook was called once.
        await fail_checkpoints(master, sink, 1)
        assert len(alerts) == 1
        await take_checkpoint(master)
        status = await control_status(master)
        assert status["alert"] == {"active": False, "message": None}
        metrics = await control_metrics(master)
        [cleared] = metric_samples(metrics, "pyflow_checkpoint_failure_alert", job="alerting")
        assert cleared.value == 0
        # The count starts afresh after the completed checkpoint.
        await fail_checkpoints(master, sink, 2)
        assert len(alerts) == 1 and master.metrics_snapshot().alert.active is False
        await fail_checkpoints(master, sink, 1)
        assert len(alerts) == 2
    finally:
        await stop(job)


@pytest.mark.asyncio
async def test_a_hook_that_raises_is_logged_and_the_job_runs_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_hook(alert: CheckpointFailureAlert) -> None:
        msg = "the pager is down"
        raise RuntimeError(msg)

    sink = HeldSink()
    master, _, job = await started_on_virtual_time(sink, "1/1min", broken_hook)
    try:
        await fail_checkpoints(master, sink, 1)
        assert master.metrics_snapshot().alert.active
        [hook_error] = [r for r in caplog.records if "hook" in r.getMessage()]
        assert "'alerting'" in hook_error.getMessage() and hook_error.exc_info is not None
        assert "the pager is down" in str(hook_error.exc_info[1])
        await take_checkpoint(master)
        assert not job.done() and not master.metrics_snapshot().alert.active
    finally:
        await stop(job)


def test_the_threshold_reads_as_on_the_command_line() -> None:
    assert CheckpointFailureThreshold.parse("3/10min") == CheckpointFailureThreshold(3, 600.0)
    assert CheckpointFailureThreshold.parse(" 1 / 500ms ").window_s == 0.5
    for bad in ("3", "3/", "/10min", "x/10min", "3/ten", "0/10min", "3/0s"):
        with pytest.raises(ValueError, match="alert"):
            CheckpointFailureThreshold.parse(bad)
    result = run_cli("run", "job.py", "--alert-on-checkpoint-failures", "3/ten")
    assert result.returncode == 2
    assert "N/WINDOW" in result.stderr or "invalid duration" in result.stderr, result.stderr


ALERTING_JOB = """
from pathlib import Path

from connectors import GeneratorSource
from runtime.api.sinks import Sink, SinkWriter


class FailOnDemand(Sink):
    def create_writer(self, context):
        return FailOnDemandWriter(Path(context.params["flag"]))


class FailOnDemandWriter(SinkWriter):
    def __init__(self, flag):
        self.flag = flag

    async def write(self, values):
        pass

    async def snapshot_state(self, checkpoint_id):
        if self.flag.exists():
            raise OSError(f"the flag {self.flag} is set")
        return []


def on_checkpoint_failure_alert(alert):
    with open(Path(__file__).with_name("alerts.txt"), "a") as out:
        out.write(f"{alert.job} {alert.failures} {alert.message}\\n")


def build(job):
    (
        job.from_source(GeneratorSource(lambda i: i, rate=200))
        .uid("numbers")
        .map(lambda x: x, name="copy")
        .uid("copy")
        .sink_to(FailOnDemand(), name="fails on demand")
        .uid("sink")
    )
"""


@pytest.mark.slow
def test_the_job_files_hook_fires_and_metrics_cover_both_taskmanagers(tmp_path: Path) -> None:
    job_file = tmp_path / "alerting.py"
    job_file.write_text(textwrap.dedent(ALERTING_JOB))
    flag = tmp_path / "fail"
    stderr = tmp_path / "stderr.txt"
    proc = start_cli(
        stderr,
        *("run", str(job_file), "--parallelism", "2", "--taskmanagers", "2"),
        *("--set", f"flag={flag}", "--checkpoint-interval", "100ms"),
        *("--tolerable-checkpoint-failures", "1000", "--alert-on-checkpoint-failures", "3/1min"),
        *("--rest-port", "0", "--no-progress"),
    )
    try:
        address = wait_for(lambda: printed_address(stderr), "the control endpoint", proc, stderr)

        def both_subtasks_counting() -> dict[str, Any] | None:
            metrics = get_metrics(address)
            samples = metric_samples(metrics, "pyflow_records_in_total", operator_uid="copy")
            counting = {s.labels["subtask"] for s in samples if s.value > 0}
            busy = metric_samples(metrics, "pyflow_busy_time_ms_per_second", operator_uid="copy")
            return metrics if counting == {"0", "1"} and len(busy) == 2 else None

        metrics = wait_for(both_subtasks_counting, "both subtasks in /metrics", proc, stderr)
        assert all(s.labels["job"] == "alerting" for s in metrics["pyflow_records_in"].samples)
        status = get_json(address, "/status")
        [copy] = [op for op in status["operators"] if op["uid"] == "copy"]
        placed = {s["taskmanager"] for s in copy["subtasks"]}
        assert len(placed) == 2 and None not in placed, copy["subtasks"]
        assert {tm["id"] for tm in status["taskmanagers"]} == placed
        wait_for(
            lambda: get_json(address, "/status")["checkpoints"]["completed"] >= 1,
            "a completed checkpoint",
            proc,
            stderr,
        )

        flag.touch()
        alerts = tmp_path / "alerts.txt"
        wait_for(alerts.exists, "the job file's hook to be called", proc, stderr)
        status = wait_for(
            lambda: (s := get_json(address, "/status"))["alert"]["active"] and s,
            "the alert in /status",
            proc,
            stderr,
        )
        assert "'alerting'" in status["alert"]["message"]
        assert "within 1min" in status["alert"]["message"]
        [raised] = metric_samples(get_metrics(address), "pyflow_checkpoint_failure_alert")
        assert raised.value == 1
        [line] = alerts.read_text().splitlines()
        assert line.startswith("alerting 3 ") and str(flag) in line
        log = stderr.read_text()
        assert "ERROR" in log and "3 checkpoints failed within 1min" in log

        flag.unlink()
        wait_for(
            lambda: not get_json(address, "/status")["alert"]["active"],
            "the alert to clear after a completed checkpoint",
            proc,
            stderr,
        )
        [cleared] = metric_samples(get_metrics(address), "pyflow_checkpoint_failure_alert")
        assert cleared.value == 0
        assert run_cli("cancel", "--address", address).returncode == 0
        assert proc.wait(timeout=60) == 130, stderr.read_text()
    finally:
        stop_process(proc)
