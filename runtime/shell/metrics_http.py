"""``GET /metrics``: the job's metrics snapshot in the Prometheus text format.

Produced by prometheus-client: a custom collector (:class:`JobMetricsCollector`) turns each
:class:`~runtime.master.metrics.JobMetricsSnapshot` into metric families when scraped, in a
registry of the job's own (so nothing of the process's default registry leaks in, and two jobs in
one process never mix). Every name starts with ``pyflow_``; labels:

- per operator and subtask: ``job``, ``operator`` (its name), ``operator_uid``, ``subtask`` (the
  index): records and buffers in and out (counters over the job's attempts; buffers over the
  current one) and their rates, busy / idle / backpressured milliseconds per second, the output
  and input watermark (ms), the input and output queue lengths and the output credit, the last
  checkpoint's alignment and snapshot time, late records dropped; and ``topic``, ``partition``
  for the Kafka lag;
- per job (``job``): checkpoints by ``status`` (completed, failed, in_progress; gauges, as Flink's
  numberOf*Checkpoints), the last completed checkpoint's duration and size, restarts, uptime, and
  the checkpoint failure alert (1 while raised).

A figure not known yet (a rate before a task's second report, a watermark before the first) has
no sample. With TaskManager processes the JobManager serves them all: their reports reach it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.master.metrics import JobMetricsSnapshot, OperatorMetrics, SubtaskMetrics

SUBTASK_LABELS = ["job", "operator", "operator_uid", "subtask"]
LAG_LABELS = [*SUBTASK_LABELS, "topic", "partition"]

_KAFKA_SPLIT = re.compile(r"^(?P<topic>.*)\[(?P<partition>\d+)\]$")

SubtaskValue = Callable[[SubtaskMetrics], float | int | None]

_SUBTASK_COUNTERS: list[tuple[str, str, SubtaskValue]] = [
    (
        "records_in",
        "Records the operator received (over the job's attempts)",
        lambda s: s.records_in,
    ),
    (
        "records_out",
        "Records the operator emitted (over the job's attempts)",
        lambda s: s.records_out,
    ),
    ("buffers_in", "Buffers the task's input channels received", lambda s: s.buffers_in),
    ("buffers_out", "Buffers the task's output channels sent", lambda s: s.buffers_out),
    (
        "late_records_dropped",
        "Records a window operator dropped as later than its allowed lateness",
        lambda s: s.late_records_dropped,
    ),
]

_SUBTASK_GAUGES: list[tuple[str, str, SubtaskValue]] = [
    ("records_in_per_second", "Records received per second", lambda s: s.records_in_per_s),
    ("records_out_per_second", "Records emitted per second", lambda s: s.records_out_per_s),
    ("buffers_in_per_second", "Buffers received per second", lambda s: s.buffers_in_per_s),
    ("buffers_out_per_second", "Buffers sent per second", lambda s: s.buffers_out_per_s),
    (
        "busy_time_ms_per_second",
        "Milliseconds per second the task was neither idle nor backpressured",
        lambda s: s.busy_ms_per_s,
    ),
    (
        "idle_time_ms_per_second",
        "Milliseconds per second the task waited for input",
        lambda s: s.idle_ms_per_s,
    ),
    (
        "backpressured_time_ms_per_second",
        "Milliseconds per second the task waited for output credit",
        lambda s: s.backpressured_ms_per_s,
    ),
    (
        "current_watermark_ms",
        "The watermark the operator last emitted (ms since the epoch)",
        lambda s: s.watermark,
    ),
    (
        "current_input_watermark_ms",
        "The watermark of the operator's input (ms since the epoch)",
        lambda s: s.input_watermark,
    ),
    ("input_queue_length", "Buffers queued at the task's input gate", lambda s: s.input_queue),
    (
        "output_queue_length",
        "Buffers of the task waiting for credit on its output channels",
        lambda s: s.output_queue,
    ),
    (
        "output_available_credit",
        "Credit the task's output channels hold",
        lambda s: s.output_credit,
    ),
    (
        "checkpoint_alignment_time_ms",
        "Barrier alignment of the task's last checkpoint",
        lambda s: s.last_alignment_ms,
    ),
    (
        "checkpoint_snapshot_time_ms",
        "How long the task took the snapshot of its last checkpoint, processing no record",
        lambda s: s.last_snapshot_ms,
    ),
]


class JobMetricsCollector(Collector):
    """The metric families of ``snapshot()`` (the job master's ``metrics_snapshot``)."""

    def __init__(self, snapshot: Callable[[], JobMetricsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        yield from _subtask_families(snapshot)
        yield from _job_families(snapshot)


def _subtask_labels(job: str, op: OperatorMetrics, subtask: SubtaskMetrics) -> list[str]:
    return [job, op.name, op.uid, str(subtask.subtask)]


def _subtask_families(snapshot: JobMetricsSnapshot) -> Iterator[Metric]:
    job = snapshot.job
    rows = [(op, s) for op in snapshot.operators for s in op.subtasks]
    families: list[tuple[CounterMetricFamily | GaugeMetricFamily, SubtaskValue]] = [
        (CounterMetricFamily(f"pyflow_{name}", text, labels=SUBTASK_LABELS), value)
        for name, text, value in _SUBTASK_COUNTERS
    ] + [
        (GaugeMetricFamily(f"pyflow_{name}", text, labels=SUBTASK_LABELS), value)
        for name, text, value in _SUBTASK_GAUGES
    ]
    for family, value in families:
        for op, subtask in rows:
            number = value(subtask)
            if number is not None:
                family.add_metric(_subtask_labels(job, op, subtask), number)
        yield family
    lag = GaugeMetricFamily(
        "pyflow_kafka_consumer_lag",
        "Records a source subtask is behind the end of each partition it reads",
        labels=LAG_LABELS,
    )
    for op, subtask in rows:
        for split, behind in (subtask.source_lag or {}).items():
            match = _KAFKA_SPLIT.match(split)
            topic, partition = (match["topic"], match["partition"]) if match else (split, "")
            lag.add_metric([*_subtask_labels(job, op, subtask), topic, partition], behind)
    yield lag


def _job_families(snapshot: JobMetricsSnapshot) -> Iterator[Metric]:
    job = snapshot.job
    checkpoints = snapshot.checkpoints
    counts = GaugeMetricFamily(
        "pyflow_checkpoints_total",
        "Checkpoints and savepoints of the job by status",
        labels=["job", "status"],
    )
    counts.add_metric([job, "completed"], checkpoints.completed)
    counts.add_metric([job, "failed"], checkpoints.failed)
    counts.add_metric([job, "in_progress"], checkpoints.in_progress)
    yield counts
    optional: list[tuple[str, str, float | None]] = [
        (
            "pyflow_last_checkpoint_duration_seconds",
            "Duration of the latest completed checkpoint or savepoint",
            None if checkpoints.last_duration_ms is None else checkpoints.last_duration_ms / 1000,
        ),
        (
            "pyflow_last_checkpoint_size_bytes",
            "State size of the latest completed checkpoint or savepoint",
            checkpoints.last_size_bytes,
        ),
        ("pyflow_job_uptime_seconds", "Time since the job started", snapshot.uptime_s),
        (
            "pyflow_checkpoint_failure_alert",
            "1 while the checkpoint failure alert is raised, else 0",
            1 if snapshot.alert.active else 0,
        ),
    ]
    for name, text, number in optional:
        family = GaugeMetricFamily(name, text, labels=["job"])
        if number is not None:
            family.add_metric([job], number)
        yield family
    restarts = CounterMetricFamily(
        "pyflow_job_restarts", "Times the job restarted after a failure", labels=["job"]
    )
    restarts.add_metric([job], snapshot.restarts)
    yield restarts


class MetricsEndpoint:
    """The ``/metrics`` route of one job's control endpoint."""

    def __init__(self, master: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(JobMetricsCollector(master.metrics_snapshot))

    async def handle(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
