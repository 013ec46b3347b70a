"""The job's metrics in one place: what ``/status``, ``/metrics``, the progress display and the web
page show, computed once (:meth:`JobMaster.metrics_snapshot
<runtime.master.jobmaster.JobMaster.metrics_snapshot>` → :class:`JobMetricsSnapshot`).

Tasks report cumulative numbers (:class:`~actors.protocol.TaskMetrics`: records and buffers in and
out, busy, idle and backpressured milliseconds since they started, each with the task's own
monotonic time). The :class:`MetricsTracker` keeps a few recent reports of every task and derives
rates and milliseconds per second from the oldest one at least :data:`RATE_WINDOW_S` older than
the newest, so figures are means over about the last second, whether the task runs in this process
(sampled every :data:`SAMPLE_INTERVAL_S` and at each snapshot) or in a TaskManager (which reports
every 0.5 s). Rates are ``None`` until a task has two reports :data:`MIN_RATE_WINDOW_S` apart,
and 0 once it ended.

Flink's definitions: a task is *backpressured* while it waits for room (credit) on an output
channel, *idle* while it waits for input (a source: for data) or for its final checkpoint, and
*busy* the rest of the time; the three add up to 1000 ms per second. They belong to the task, so
the operators of one chain show the same figures; an operator shows the worst of its subtasks
(the highest busy and backpressured, the lowest idle), as Flink's web UI colours a vertex.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actors.protocol import TaskId, TaskMetrics, TaskState
from runtime.master.coordinator import CheckpointStatus, TaskHandle

if TYPE_CHECKING:
    from runtime.master.jobmaster import JobMaster

RATE_WINDOW_S = 1.0
"""Rates are means over at least this long (the reports of a task this far apart)."""

MIN_RATE_WINDOW_S = 0.2
"""No rate from reports closer than this (a task's first moments): it would be noise."""

SAMPLE_INTERVAL_S = 0.5
"""How often the job master samples the metrics of the tasks in its own process."""


@dataclass(frozen=True)
class SubtaskWatermark:
    subtask: int
    watermark: int | None
    """None until the subtask emitted one."""
    idle: bool


def combined_watermark(subtasks: Sequence[SubtaskWatermark]) -> tuple[int | None, bool]:
    """An operator's watermark over its subtasks, as its consumers combine them: the minimum
    over the active ones, the maximum when all are idle; and whether all are idle."""
    active = [s.watermark for s in subtasks if not s.idle]
    if active:
        return (None if None in active else min(w for w in active if w is not None)), False
    marks = [s.watermark for s in subtasks if s.watermark is not None]
    return (max(marks) if marks else None), bool(subtasks)


@dataclass(frozen=True)
class SubtaskMetrics:
    """One operator in one subtask. Counts cover every attempt of the job; the rest is the
    current attempt's. Times are of the subtask's task (its whole chain)."""

    subtask: int
    task: str
    """The task's name (its chain and subtask)."""
    state: str
    taskmanager: str | None
    """The id of the TaskManager it runs in; None in the job's process."""
    records_in: int
    records_out: int
    records_in_per_s: float | None
    records_out_per_s: float | None
    busy_ms_per_s: float | None
    idle_ms_per_s: float | None
    backpressured_ms_per_s: float | None
    watermark: int | None
    """The watermark the operator last emitted here (ms; None before the first)."""
    idle: bool
    """Whether the watermark status it last emitted is idle."""
    input_watermark: int | None
    """The watermark of its input: the task's combined input watermark for the head of a chain,
    the previous operator's output watermark for a chained one; None for a source."""
    input_idle: bool
    input_queue: int
    """Buffers queued at the task's input gate."""
    output_queue: int
    """Buffers of the task waiting on its output channels for credit."""
    output_credit: int
    """Credit the task's output channels hold."""
    buffers_in: int
    buffers_out: int
    buffers_in_per_s: float | None
    buffers_out_per_s: float | None
    last_alignment_ms: float | None
    """Barrier alignment of the task's last checkpoint."""
    last_snapshot_ms: float | None
    """How long the task took the snapshot of its last checkpoint."""
    late_records_dropped: int
    source_lag: dict[str, int] | None
    """For the head of a source task whose reader can tell: records behind the end of each split
    (Kafka: per ``topic[partition]``)."""

    def to_json(self) -> dict[str, Any]:
        """The entry in ``/status`` (``operators[].subtasks[]``)."""
        return {
            "subtask": self.subtask,
            "watermark": self.watermark,
            "idle": self.idle,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "records_in_per_s": self.records_in_per_s,
            "records_out_per_s": self.records_out_per_s,
            "busy_ms_per_s": self.busy_ms_per_s,
            "idle_ms_per_s": self.idle_ms_per_s,
            "backpressured_ms_per_s": self.backpressured_ms_per_s,
            "input_watermark": self.input_watermark,
            "input_queue": self.input_queue,
            "output_queue": self.output_queue,
            "output_credit": self.output_credit,
            "taskmanager": self.taskmanager,
        }


@dataclass(frozen=True)
class OperatorMetrics:
    """One operator over its subtasks."""

    uid: str
    name: str
    vertex: int
    """The job vertex (chain) it runs in: its index in the job graph, as ``/plan`` numbers it."""
    parallelism: int
    records_in: int
    records_out: int
    records_in_per_s: float | None
    records_out_per_s: float | None
    busy_ms_per_s: float | None
    """The highest of its subtasks."""
    idle_ms_per_s: float | None
    """The lowest of its subtasks."""
    backpressured_ms_per_s: float | None
    """The highest of its subtasks."""
    watermark: int | None
    idle: bool
    input_watermark: int | None
    late_records_dropped: int
    subtasks: tuple[SubtaskMetrics, ...]
    """The subtasks that reported in the current attempt, by index."""

    def to_json(self) -> dict[str, Any]:
        """The entry in ``/status`` (``operators[]``)."""
        return {
            "uid": self.uid,
            "name": self.name,
            "parallelism": self.parallelism,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "late_records_dropped": self.late_records_dropped,
            "watermark": self.watermark,
            "idle": self.idle,
            "records_in_per_s": self.records_in_per_s,
            "records_out_per_s": self.records_out_per_s,
            "busy_ms_per_s": self.busy_ms_per_s,
            "idle_ms_per_s": self.idle_ms_per_s,
            "backpressured_ms_per_s": self.backpressured_ms_per_s,
            "input_watermark": self.input_watermark,
            "vertex": self.vertex,
            "subtasks": [s.to_json() for s in self.subtasks],
        }


@dataclass(frozen=True)
class CheckpointCounts:
    completed: int
    failed: int
    """Checkpoints and savepoints that were aborted, for whatever reason."""
    in_progress: int
    last_duration_ms: float | None
    """Of the latest completed checkpoint or savepoint."""
    last_size_bytes: int | None
    last_completed_id: int | None


@dataclass(frozen=True)
class AlertStatus:
    active: bool
    message: str | None


@dataclass(frozen=True)
class JobMetricsSnapshot:
    job: str
    status: str
    attempt: int
    uptime_s: float
    restarts: int
    operators: tuple[OperatorMetrics, ...]
    """In the job graph's order (vertex by vertex, head first)."""
    checkpoints: CheckpointCounts
    alert: AlertStatus
    source_lag: dict[str, dict[str, int]]
    """Per running source task (by name), records behind the end of each split."""

    def status_json(self) -> dict[str, Any]:
        """Its keys of ``/status`` (besides the tasks and TaskManagers)."""
        checkpoints = self.checkpoints
        return {
            "job": self.job,
            "status": self.status,
            "attempt": self.attempt,
            "uptime_s": self.uptime_s,
            "restarts": self.restarts,
            "checkpoints": {
                "completed": checkpoints.completed,
                "failed": checkpoints.failed,
                "in_progress": checkpoints.in_progress,
                "last_duration_ms": checkpoints.last_duration_ms,
                "last_size_bytes": checkpoints.last_size_bytes,
                "last_completed_id": checkpoints.last_completed_id,
            },
            "alert": {"active": self.alert.active, "message": self.alert.message},
            "operators": [op.to_json() for op in self.operators],
            "source_lag": self.source_lag,
        }


class _TaskSamples:
    """The recent reports of one task: the oldest one kept is the newest one at least
    :data:`RATE_WINDOW_S` older than the latest (or the oldest there is)."""

    def __init__(self) -> None:
        self.reports: deque[TaskMetrics] = deque()

    def add(self, report: TaskMetrics) -> None:
        reports = self.reports
        if reports and report.time_s <= reports[-1].time_s:
            return  # the same report again (a TaskManager's arrive every 0.5 s)
        reports.append(report)
        while len(reports) > 2 and report.time_s - reports[1].time_s >= RATE_WINDOW_S:
            reports.popleft()

    def window(self) -> tuple[TaskMetrics, float] | None:
        """The oldest kept report and the seconds from it to the latest; None while they are
        less than :data:`MIN_RATE_WINDOW_S` apart."""
        reports = self.reports
        elapsed = reports[-1].time_s - reports[0].time_s
        return (reports[0], elapsed) if elapsed >= MIN_RATE_WINDOW_S else None


class _Rates:
    """Per-second figures of one task between two of its reports."""

    def __init__(self, state: TaskState, old: TaskMetrics | None, new: TaskMetrics, dt: float):
        self.ended = state.is_terminal
        self.old = old
        self.new = new
        self.dt = dt

    def per_s(self, old_value: float, new_value: float) -> float | None:
        if self.ended:
            return 0.0
        if self.old is None:
            return None
        return max(0.0, new_value - old_value) / self.dt

    def ms_per_s(self, field: str) -> float | None:
        old = 0.0 if self.old is None else getattr(self.old, field)
        value = self.per_s(old, getattr(self.new, field))
        return None if value is None else min(1000.0, value)


class MetricsTracker:
    """Keeps the tasks' recent reports and the counts of ended attempts; makes snapshots."""

    def __init__(self) -> None:
        self._samples: dict[TaskId, _TaskSamples] = {}
        self._ended_records: dict[tuple[str, int], tuple[int, int]] = {}
        """(operator uid, subtask) → records in and out of the attempts that ended."""
        self._ended_tasks: set[TaskId] = set()
        """The tasks whose counts are in ``_ended_records``: their reports, which their handles
        still give, must not be counted again."""

    def observe(self, handles: Iterable[TaskHandle]) -> list[tuple[TaskHandle, TaskMetrics]]:
        """Take the latest report of every task (as its handle knows it); returns them."""
        latest = []
        for handle in handles:
            report = handle.latest_metrics()
            if report is not None:
                self._samples.setdefault(report.task, _TaskSamples()).add(report)
                latest.append((handle, report))
        return latest

    def end_attempt(self, handles: Iterable[TaskHandle]) -> None:
        """An attempt ended: its tasks' last counts join the totals (once, however often this is
        called); reports of earlier attempts are dropped."""
        handles = list(handles)
        current = {handle.task_id for handle in handles}
        for task in [t for t in self._samples if t not in current]:
            del self._samples[task]
        for handle in handles:
            report = handle.latest_metrics()
            if report is None or report.task in self._ended_tasks:
                continue
            self._ended_tasks.add(report.task)
            index = report.task.subtask_index
            for uid, records in report.records.items():
                done_in, done_out = self._ended_records.get((uid, index), (0, 0))
                self._ended_records[(uid, index)] = (
                    done_in + records.records_in,
                    done_out + records.records_out,
                )

    def ended_records(self, uid: str, subtask: int) -> tuple[int, int]:
        return self._ended_records.get((uid, subtask), (0, 0))

    def operator_totals(self, uid: str, live: Iterable[TaskMetrics]) -> tuple[int, int]:
        """Records in and out of ``uid`` over every attempt: the ended ones and ``live``."""
        records_in = sum(v[0] for (u, _), v in self._ended_records.items() if u == uid)
        records_out = sum(v[1] for (u, _), v in self._ended_records.items() if u == uid)
        for report in live:
            records = report.records.get(uid)
            if records is not None and report.task not in self._ended_tasks:
                records_in += records.records_in
                records_out += records.records_out
        return records_in, records_out

    def _rates(self, handle: TaskHandle, report: TaskMetrics) -> _Rates:
        samples = self._samples.get(report.task)
        window = samples.window() if samples is not None else None
        if window is None:
            return _Rates(handle.state, None, report, 0.0)
        old, elapsed = window
        return _Rates(handle.state, old, report, elapsed)

    def snapshot(self, master: JobMaster) -> JobMetricsSnapshot:
        """Every figure of the job now (see :class:`JobMetricsSnapshot`)."""
        live = self.observe(master.handles)
        by_uid: dict[str, list[SubtaskMetrics]] = {}
        for handle, report in live:
            self._add_subtasks(master, handle, report, by_uid)
        operators = []
        for vertex_index, vertex in enumerate(master.graph.vertices):
            for node in vertex.operators:
                subtasks = sorted(by_uid.get(node.uid, []), key=lambda s: s.subtask)
                operators.append(
                    _operator(
                        node.uid,
                        node.name,
                        vertex_index,
                        node.parallelism,
                        self.operator_totals(node.uid, (r for _, r in live)),
                        subtasks,
                    )
                )
        coordinator = master.coordinator
        last = coordinator.last_completed_stats
        ended = coordinator.ended_counts
        checkpoints = CheckpointCounts(
            ended[CheckpointStatus.COMPLETED],
            ended[CheckpointStatus.FAILED],
            len(coordinator.pending),
            last.duration_ms if last is not None else None,
            last.state_size if last is not None else None,
            last.checkpoint_id if last is not None else None,
        )
        alert = coordinator.alarm.active
        return JobMetricsSnapshot(
            master.graph.name,
            master.status,
            master.attempt,
            time.monotonic() - master.started,
            max(0, master.attempt - 1),
            tuple(operators),
            checkpoints,
            AlertStatus(alert is not None, alert.message if alert is not None else None),
            {
                h.name: r.source_lag
                for h, r in live
                if r.source_lag is not None and h.state in (TaskState.RUNNING, TaskState.FINISHING)
            },
        )

    def _add_subtasks(
        self,
        master: JobMaster,
        handle: TaskHandle,
        report: TaskMetrics,
        by_uid: dict[str, list[SubtaskMetrics]],
    ) -> None:
        """The entries of every operator of one task's chain."""
        rates = self._rates(handle, report)
        old = rates.old
        index = report.task.subtask_index
        taskmanager = master.deployment.taskmanager_of(report.task)
        input_watermark, input_idle = report.input_watermark, report.input_idle
        for position, (uid, records) in enumerate(report.records.items()):
            old_records = old.records.get(uid) if old is not None else None
            total_in, total_out = self.ended_records(uid, index)
            if report.task not in self._ended_tasks:
                total_in += records.records_in
                total_out += records.records_out
            by_uid.setdefault(uid, []).append(
                SubtaskMetrics(
                    subtask=index,
                    task=handle.name,
                    state=handle.state.value,
                    taskmanager=taskmanager,
                    records_in=total_in,
                    records_out=total_out,
                    records_in_per_s=rates.per_s(
                        old_records.records_in if old_records else 0, records.records_in
                    ),
                    records_out_per_s=rates.per_s(
                        old_records.records_out if old_records else 0, records.records_out
                    ),
                    busy_ms_per_s=rates.ms_per_s("busy_ms"),
                    idle_ms_per_s=rates.ms_per_s("idle_ms"),
                    backpressured_ms_per_s=rates.ms_per_s("backpressured_ms"),
                    watermark=records.watermark,
                    idle=records.idle,
                    input_watermark=input_watermark,
                    input_idle=input_idle,
                    input_queue=report.input_queue,
                    output_queue=report.output_queue,
                    output_credit=report.output_credit,
                    buffers_in=report.buffers_in,
                    buffers_out=report.buffers_out,
                    buffers_in_per_s=rates.per_s(old.buffers_in if old else 0, report.buffers_in),
                    buffers_out_per_s=rates.per_s(
                        old.buffers_out if old else 0, report.buffers_out
                    ),
                    last_alignment_ms=report.last_alignment_ms,
                    last_snapshot_ms=report.last_snapshot_ms,
                    late_records_dropped=records.late_records_dropped,
                    source_lag=report.source_lag if position == 0 else None,
                )
            )
            # The next operator of the chain reads what this one emitted.
            input_watermark, input_idle = records.watermark, records.idle


def _operator(
    uid: str,
    name: str,
    vertex: int,
    parallelism: int,
    totals: tuple[int, int],
    subtasks: list[SubtaskMetrics],
) -> OperatorMetrics:
    watermark, idle = combined_watermark(
        [SubtaskWatermark(s.subtask, s.watermark, s.idle) for s in subtasks]
    )
    input_watermark, _ = combined_watermark(
        [SubtaskWatermark(s.subtask, s.input_watermark, s.input_idle) for s in subtasks]
    )
    return OperatorMetrics(
        uid=uid,
        name=name,
        vertex=vertex,
        parallelism=parallelism,
        records_in=totals[0],
        records_out=totals[1],
        records_in_per_s=_sum([s.records_in_per_s for s in subtasks]),
        records_out_per_s=_sum([s.records_out_per_s for s in subtasks]),
        busy_ms_per_s=_extreme(max, [s.busy_ms_per_s for s in subtasks]),
        idle_ms_per_s=_extreme(min, [s.idle_ms_per_s for s in subtasks]),
        backpressured_ms_per_s=_extreme(max, [s.backpressured_ms_per_s for s in subtasks]),
        watermark=watermark,
        idle=idle,
        input_watermark=input_watermark,
        late_records_dropped=sum(s.late_records_dropped for s in subtasks),
        subtasks=tuple(subtasks),
    )


def _sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _extreme(pick: Callable[[list[float]], float], values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return pick(known) if known else None
