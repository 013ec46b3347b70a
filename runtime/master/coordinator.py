"""The checkpoint coordinator: triggers checkpoints, collects acknowledgements, completes or aborts.

Protocol for checkpoint *n* (numbered as in DESIGN.md "Checkpoints"):

1. Trigger (periodically, on demand for a savepoint, or at once when every running task only waits
   for a final checkpoint), honouring max concurrent checkpoints and the minimum pause.
2. Send the trigger to the *running tasks whose upstream tasks have all finished*, computed from
   the latest task states the handles know; every task that has not finished must acknowledge.
   If a trigger cannot be delivered because its task just finished (the handle's ``send`` says so,
   the task declines it as ended, or its FINISHED report arrives before its acknowledgement), abort
   *n* without counting it as a failure (the next checkpoint takes the new set).
3. Tasks snapshot, forward the barrier and acknowledge (see ``actors.task``).
4. (Alignment happens in the tasks.)
5. When every task acknowledged: build the checkpoint (operators whose every subtask finished are
   marked finished), persist it through the storage (metadata last, atomically), notify every
   running task, and drop subsumed checkpoints. A timeout, a decline or a lost task aborts it and
   notifies the tasks; more consecutive failures than tolerated fail the job.

The coordinator works over :class:`TaskHandle` objects (a task in this process, or one in another
process whose state it knows only from its reports, possibly late) and talks to tasks only in
messages of :mod:`actors.protocol`. Its decisions are a state machine driven by :meth:`handle`
(one report) and :meth:`tick` (time passed, read from an injected :class:`CoordinatorClock`); the
actor loop :meth:`run` only feeds them from its mailbox and sleeps until the next deadline, so
tests drive the decisions with scripted reports and virtual time.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from actors.mailbox import Mailbox
from actors.protocol import (
    AcknowledgeCheckpoint,
    DeclineCheckpoint,
    NotifyCheckpointAborted,
    NotifyCheckpointComplete,
    StopRequest,
    TaskCommand,
    TaskId,
    TaskMetrics,
    TaskReport,
    TaskState,
    TaskStateChanged,
    TriggerCheckpoint,
)
from runtime.config import CheckpointConfig
from runtime.master.alerts import CheckpointFailureAlarm
from state.operator import has_union_state
from state.storage import CheckpointKind, CompletedCheckpoint, OperatorCheckpoint, SnapshotMap

if TYPE_CHECKING:
    from state.storage import CheckpointStorage

log = logging.getLogger(__name__)


class CheckpointStatus(enum.StrEnum):
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    FAILED = "failed"


class CoordinatorClock(Protocol):
    """The coordinator's time: monotonic seconds for its deadlines, wall ms for the records."""

    def monotonic_s(self) -> float: ...

    def wall_ms(self) -> int: ...


class SystemClock:
    def monotonic_s(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000


SYSTEM_CLOCK = SystemClock()


class TaskHandle(Protocol):
    """The job master's view of one deployed task, in this process or another.

    ``state`` is the latest state the master knows, which for a task in another process is its
    latest ``TaskStateChanged`` report: it may lag behind the task (a task believed RUNNING may
    have finished). Everything the coordinator decides stays correct under such a lag.
    """

    @property
    def task_id(self) -> TaskId: ...

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> TaskState: ...

    @property
    def operator_uids(self) -> tuple[str, ...]:
        """The uids of the task's operator chain, head first."""
        ...

    @property
    def upstream(self) -> tuple[TaskId, ...]:
        """The tasks that send to this one."""
        ...

    def send(self, command: TaskCommand) -> bool:
        """Deliver ``command`` to the task; False when it cannot be (the task has ended)."""
        ...

    def latest_metrics(self) -> TaskMetrics | None:
        """The task's latest records in/out and source lag (None before its first report)."""
        ...


@dataclass(frozen=True)
class CheckpointedOperator:
    """What a completed checkpoint records of an operator besides its subtasks' state."""

    name: str
    parallelism: int
    max_parallelism: int


@dataclass
class CheckpointStats:
    """One row of the checkpoint history shown by the control endpoint."""

    checkpoint_id: int
    kind: str
    status: CheckpointStatus
    trigger_time_ms: int
    duration_ms: float | None = None
    state_size: int = 0
    alignment_ms: dict[str, float] = field(default_factory=dict)
    snapshot_ms: dict[str, float] = field(default_factory=dict)
    """Per task, how long it took its snapshot (processing no record meanwhile)."""
    failure: str | None = None
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.checkpoint_id,
            "kind": self.kind,
            "status": self.status.value,
            "trigger_time_ms": self.trigger_time_ms,
            "duration_ms": self.duration_ms,
            "state_size": self.state_size,
            "alignment_ms": self.alignment_ms,
            "snapshot_ms": self.snapshot_ms,
            "failure": self.failure,
            "path": self.path,
        }


@dataclass
class PendingCheckpoint:
    checkpoint_id: int
    kind: CheckpointKind
    trigger_time: float
    timestamp_ms: int
    awaiting: set[TaskId]
    finished_at_trigger: set[TaskId]
    target_dir: str | None
    stop: StopRequest | None
    future: asyncio.Future[CompletedCheckpoint]
    acks: dict[TaskId, AcknowledgeCheckpoint] = field(default_factory=dict)
    stats: CheckpointStats | None = None


class CheckpointFailedError(RuntimeError):
    """A checkpoint or savepoint was aborted; says which and why."""


class TooManyCheckpointFailures(RuntimeError):
    """More consecutive checkpoint failures than ``tolerable_failures``: the job fails over."""


@dataclass(frozen=True)
class _TriggerRequest:
    """A trigger asked for from outside the coordinator's actor (the control endpoint)."""

    kind: CheckpointKind
    target_dir: str | None
    stop: StopRequest | None
    result: asyncio.Future[CompletedCheckpoint]


_STOP = object()
"""Mail: every task finished, the coordinator ends."""


class CheckpointCoordinator:
    """Lives for the whole job, across failover attempts; checkpoint ids never repeat."""

    def __init__(
        self,
        config: CheckpointConfig,
        storage: CheckpointStorage | None,
        operators: Mapping[str, CheckpointedOperator],
        first_checkpoint_id: int = 1,
        clock: CoordinatorClock = SYSTEM_CLOCK,
        job_name: str = "job",
    ) -> None:
        self.config = config
        self.storage = storage
        self.operators = dict(operators)
        """uid → what a checkpoint records of every operator of the job."""
        self.clock = clock
        self.next_id = first_checkpoint_id
        self.pending: dict[int, PendingCheckpoint] = {}
        self.completed: list[CompletedCheckpoint] = []
        self.history: list[CheckpointStats] = []
        self.consecutive_failures = 0
        self.mailbox = Mailbox("checkpoint-coordinator")
        self.tasks: list[TaskHandle] = []
        self._by_id: dict[TaskId, TaskHandle] = {}
        self._last_completion = 0.0
        self._next_periodic: float | None = None
        self.failure: BaseException | None = None
        """Set when the job must fail over (too many consecutive checkpoint failures)."""
        self._finishing_since: dict[TaskId, int] = {}
        """Task → the first checkpoint id that could cover it after it became FINISHING."""
        self.completed_ids: list[int] = []
        self.stop_savepoint_path: str | None = None
        self.ended_counts = {CheckpointStatus.COMPLETED: 0, CheckpointStatus.FAILED: 0}
        """Checkpoints and savepoints of the job that completed or failed (every abort), over
        its whole life (the history keeps only the latest)."""
        self.last_completed_stats: CheckpointStats | None = None
        """The statistics of the latest completed checkpoint or savepoint."""
        self._shut_down_reason = "the job has ended"
        self.alarm = CheckpointFailureAlarm(
            job_name, config.alert_on_failures, config.on_failure_alert
        )
        """The checkpoint failure alert (on this coordinator's clock)."""

    # ---------------------------------------------------------------- attempt wiring

    def attach(self, tasks: Sequence[TaskHandle]) -> None:
        """A new job attempt starts with these tasks; pending checkpoints of the old one abort."""
        for pending in list(self.pending.values()):
            self._abort(pending, "the job attempt ended")
        self.tasks = list(tasks)
        self._by_id = {task.task_id: task for task in self.tasks}
        self._finishing_since = {}
        self.failure = None
        if self.config.interval_s:
            self._next_periodic = self.clock.monotonic_s() + self.config.interval_s

    @property
    def latest_completed(self) -> CompletedCheckpoint | None:
        return self.completed[-1] if self.completed else None

    # ---------------------------------------------------------------- mail (from any actor)

    def on_report(self, report: TaskReport) -> None:
        """A task's report, served in order by the coordinator's actor."""
        self.mailbox.try_put(report)

    def request_trigger(
        self, kind: CheckpointKind, target_dir: str | None = None, stop: StopRequest | None = None
    ) -> asyncio.Future[CompletedCheckpoint]:
        """Trigger from outside the coordinator's actor (e.g. the control endpoint)."""
        result: asyncio.Future[CompletedCheckpoint] = asyncio.get_running_loop().create_future()
        if not self.mailbox.try_put(_TriggerRequest(kind, target_dir, stop, result)):
            result.set_exception(
                CheckpointFailedError(f"{kind.value} not taken: {self._shut_down_reason}")
            )
        return result

    def request_stop(self) -> None:
        """Every task finished: serve the mail before this, then end :meth:`run`."""
        self.mailbox.put(_STOP)

    # ---------------------------------------------------------------- the actor loop

    async def run(self) -> None:
        """Serve mail and deadlines until :meth:`request_stop` (every task finished) or cancel.

        Mail is served in order, so acknowledgements sent before the tasks finished complete
        their checkpoint (metadata written, retention applied) before the coordinator stops.
        Raises :attr:`failure` when the job must fail over.
        """
        mailbox = self.mailbox
        while True:
            mailbox.wakeup.clear()
            while mailbox.has_mail():
                mail = mailbox.take_nowait()
                if mail is _STOP:
                    self.end()
                    return
                await self.handle(mail)
            if self.failure is None:
                self.tick()
            if self.failure is not None:
                raise self.failure
            await mailbox.wakeup.wait(self.next_wakeup())

    # ---------------------------------------------------------------- decisions

    async def handle(self, message: Any) -> None:
        """Act on one report of a task (or a trigger request): the state machine's input."""
        kind = type(message)
        if kind is AcknowledgeCheckpoint:
            await self._on_ack(message)
        elif kind is DeclineCheckpoint:
            pending = self.pending.get(message.checkpoint_id)
            if pending is not None:
                self._abort(pending, message.reason, counts=not message.task_ended)
        elif kind is TaskStateChanged:
            self._on_task_state(message)
        elif kind is TaskMetrics:
            return
        elif kind is _TriggerRequest:
            inner = self.trigger(message.kind, message.target_dir, message.stop)
            inner.add_done_callback(lambda f: _chain_future(f, message.result))
        else:
            msg = f"checkpoint coordinator: unknown mail {message!r}"
            raise TypeError(msg)

    def tick(self) -> None:
        """Time passed: expire overdue checkpoints, trigger the periodic or the final one."""
        now = self.clock.monotonic_s()
        self._expire(now)
        if self.failure is not None:
            return
        if self._next_periodic is not None and now >= self._next_periodic:
            self._next_periodic = now + (self.config.interval_s or 0)
            self._trigger_periodic()
        if self._wants_final_checkpoint():
            self.trigger(CheckpointKind.CHECKPOINT)

    def next_wakeup(self) -> float | None:
        """Seconds until :meth:`tick` has something to do, or None when only mail can wake it."""
        deadlines = [p.trigger_time + self.config.timeout_s for p in self.pending.values()]
        if self._next_periodic is not None:
            deadlines.append(self._next_periodic)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self.clock.monotonic_s())

    def shut_down(self, reason: str) -> None:
        """The job ended (``reason`` says how): abort what is pending, fail the trigger requests
        never served, and refuse further ones, so that nobody waits for a checkpoint that can
        never come (the control endpoint would otherwise hang on a savepoint request)."""
        self._shut_down_reason = reason
        for pending in list(self.pending.values()):
            self._abort(pending, reason, counts=False)
        for mail in self.mailbox.close():
            if type(mail) is _TriggerRequest and not mail.result.done():
                mail.result.set_exception(
                    CheckpointFailedError(f"{mail.kind.value} not taken: {reason}")
                )

    def end(self) -> None:
        """Every task finished: what is still pending can never complete."""
        for pending in list(self.pending.values()):
            self._abort(pending, "every task finished", counts=False)

    async def _on_ack(self, ack: AcknowledgeCheckpoint) -> None:
        pending = self.pending.get(ack.checkpoint_id)
        if pending is None or ack.task not in pending.awaiting:
            return
        pending.awaiting.discard(ack.task)
        pending.acks[ack.task] = ack
        if not pending.awaiting:
            await self._complete(pending)

    def _on_task_state(self, report: TaskStateChanged) -> None:
        task = self._by_id.get(report.task)
        if task is None:
            return  # a task of an earlier attempt
        if report.state is TaskState.FINISHING:
            # A task that finishes because of a stop with savepoint is covered by that very
            # savepoint (as the task itself waits for it), not by a checkpoint after it.
            stopping = [p.checkpoint_id for p in self.pending.values() if p.stop is not None]
            self._finishing_since[report.task] = min(stopping, default=self.next_id)
        if report.state is TaskState.FINISHED:
            for pending in list(self.pending.values()):
                if report.task in pending.awaiting:
                    self._abort(
                        pending, f"task {task.name} finished before acknowledging", counts=False
                    )

    # ---------------------------------------------------------------- triggering

    def _trigger_periodic(self) -> None:
        if len(self.pending) >= self.config.max_concurrent:
            return
        if self.clock.monotonic_s() - self._last_completion < self.config.min_pause_s:
            return
        self.trigger(CheckpointKind.CHECKPOINT)

    def _wants_final_checkpoint(self) -> bool:
        """Every task still alive only waits for a final checkpoint, and none is in flight."""
        if self.pending or not self.tasks:
            return False
        alive = [t for t in self.tasks if t.state is not TaskState.FINISHED]
        if not alive or any(t.state is not TaskState.FINISHING for t in alive):
            return False
        covered = self.completed_ids[-1] if self.completed_ids else 0
        return any(self._finishing_since.get(t.task_id, 0) > covered for t in alive)

    def _upstream_finished(self, task: TaskHandle) -> bool:
        for upstream_id in task.upstream:
            upstream = self._by_id.get(upstream_id)
            if upstream is None or upstream.state is not TaskState.FINISHED:
                return False
        return True

    def trigger(
        self,
        kind: CheckpointKind,
        target_dir: str | None = None,
        stop: StopRequest | None = None,
    ) -> asyncio.Future[CompletedCheckpoint]:
        """Step 1 and 2. Returns a future that completes with the checkpoint or fails with
        :class:`CheckpointFailedError`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CompletedCheckpoint] = loop.create_future()
        checkpoint_id = self.next_id
        alive = [t for t in self.tasks if t.state is not TaskState.FINISHED]
        not_ready = [
            t.name for t in alive if t.state not in (TaskState.RUNNING, TaskState.FINISHING)
        ]
        if not alive or not_ready:
            reason = (
                "every task has finished"
                if not alive
                else f"tasks not running yet: {', '.join(not_ready[:5])}"
            )
            future.set_exception(CheckpointFailedError(f"{kind.value} not triggered: {reason}"))
            future.exception()  # mark retrieved: periodic checkpoints have no waiter
            return future
        self.next_id += 1
        finished = {t.task_id for t in self.tasks if t.state is TaskState.FINISHED}
        targets = [t for t in alive if self._upstream_finished(t)]
        stats = CheckpointStats(
            checkpoint_id, kind.value, CheckpointStatus.IN_PROGRESS, self.clock.wall_ms()
        )
        pending = PendingCheckpoint(
            checkpoint_id,
            kind,
            self.clock.monotonic_s(),
            stats.trigger_time_ms,
            {t.task_id for t in alive},
            finished,
            target_dir,
            stop,
            future,
            stats=stats,
        )
        self.pending[checkpoint_id] = pending
        if stop is not None:
            # As Flink's stop-with-savepoint: no periodic checkpoint after it, so the savepoint is
            # the job's last snapshot (a failed stop fails over, and the next attempt resumes them).
            self._next_periodic = None
        self.history.append(stats)
        del self.history[:-100]
        command = TriggerCheckpoint(checkpoint_id, stats.trigger_time_ms, kind, stop)
        for task in targets:
            if not task.send(command):
                self._abort(
                    pending,
                    f"task {task.name} finished while being triggered (state {task.state.value})",
                    counts=False,
                )
                break
        return future

    # ---------------------------------------------------------------- completion and abort

    async def _complete(self, pending: PendingCheckpoint) -> None:
        """Step 5."""
        operators: dict[str, OperatorCheckpoint] = {
            uid: OperatorCheckpoint(
                uid, op.name, op.parallelism, op.max_parallelism, SnapshotMap(), set()
            )
            for uid, op in self.operators.items()
        }
        for task in self.tasks:
            ack = pending.acks.get(task.task_id)
            finished = task.task_id in pending.finished_at_trigger or (
                ack is not None and ack.finished
            )
            subtask_index = task.task_id.subtask_index
            for uid in task.operator_uids:
                entry = operators[uid]
                if finished:
                    entry.finished_subtasks.add(subtask_index)
                if ack is not None and uid in ack.snapshots:
                    entry.subtask_states.set_encoded(subtask_index, ack.snapshots[uid])
        # FLIP-147: union state of a partially finished operator cannot be redistributed safely.
        for entry in operators.values():
            partially = 0 < len(entry.finished_subtasks) < entry.parallelism
            if partially and _has_union_state(entry):
                self._abort(
                    pending,
                    f"operator {entry.name!r} uses union list state and is partially finished",
                    counts=False,
                )
                return
        checkpoint = CompletedCheckpoint(
            pending.checkpoint_id, pending.kind, pending.timestamp_ms, operators
        )
        if self.storage is not None:
            try:
                await self.storage.write(checkpoint, pending.target_dir)
            except Exception as exc:
                log.exception("writing checkpoint %d failed", pending.checkpoint_id)
                self._abort(pending, f"writing the checkpoint failed: {exc}", counts=True)
                return
        del self.pending[pending.checkpoint_id]
        self._last_completion = self.clock.monotonic_s()
        self.consecutive_failures = 0
        stats = pending.stats
        assert stats is not None
        stats.status = CheckpointStatus.COMPLETED
        stats.duration_ms = (self._last_completion - pending.trigger_time) * 1000.0
        stats.state_size = checkpoint.state_size
        stats.path = checkpoint.path
        stats.alignment_ms = {task.key: ack.alignment_ms for task, ack in pending.acks.items()}
        stats.snapshot_ms = {task.key: ack.snapshot_ms for task, ack in pending.acks.items()}
        self.ended_counts[CheckpointStatus.COMPLETED] += 1
        self.last_completed_stats = stats
        if pending.kind is CheckpointKind.CHECKPOINT:
            self.alarm.on_completed(pending.checkpoint_id)
            self.completed.append(checkpoint)
            subsumed = self.completed[: -self.config.retained]
            del self.completed[: -self.config.retained]
            if self.storage is not None:
                for old in subsumed:
                    await self.storage.discard(old)
                await self.storage.remove_incomplete(pending.checkpoint_id, keep=set(self.pending))
        for older in [p for p in self.pending.values() if p.checkpoint_id < pending.checkpoint_id]:
            if older.kind is CheckpointKind.CHECKPOINT:
                self._abort(older, f"subsumed by checkpoint {pending.checkpoint_id}", counts=False)
        # An intermediate savepoint commits no side effects and is not used for failover (as in
        # Flink 1.15+): a later failover restores the latest checkpoint, which must not find
        # output committed beyond it. A stop-with-savepoint does commit: the job ends on it.
        if pending.stop is not None and pending.kind is CheckpointKind.SAVEPOINT:
            self.stop_savepoint_path = checkpoint.path
        if pending.kind is CheckpointKind.CHECKPOINT or pending.stop is not None:
            self.completed_ids.append(pending.checkpoint_id)
            notice = NotifyCheckpointComplete(pending.checkpoint_id)
            for task in self.tasks:
                if task.state is not TaskState.FINISHED:
                    task.send(notice)
        log.info(
            "%s %d completed in %.0f ms (%d bytes)",
            pending.kind.value,
            pending.checkpoint_id,
            stats.duration_ms,
            checkpoint.state_size,
        )
        if not pending.future.done():
            pending.future.set_result(checkpoint)

    def _abort(self, pending: PendingCheckpoint, reason: str, counts: bool = True) -> None:
        if self.pending.pop(pending.checkpoint_id, None) is None:
            return
        stats = pending.stats
        if stats is not None:
            stats.status = CheckpointStatus.FAILED
            stats.failure = reason
            stats.duration_ms = (self.clock.monotonic_s() - pending.trigger_time) * 1000.0
        self.ended_counts[CheckpointStatus.FAILED] += 1
        log.warning("%s %d aborted: %s", pending.kind.value, pending.checkpoint_id, reason)
        notice = NotifyCheckpointAborted(pending.checkpoint_id, reason)
        for task in self.tasks:
            if task.state is not TaskState.FINISHED:
                task.send(notice)
        if not pending.future.done():
            pending.future.set_exception(
                CheckpointFailedError(
                    f"{pending.kind.value} {pending.checkpoint_id} failed: {reason}"
                )
            )
            pending.future.exception()  # mark retrieved: periodic checkpoints have no waiter
        if counts and pending.kind is CheckpointKind.CHECKPOINT:
            self.alarm.on_failure(self.clock.monotonic_s(), pending.checkpoint_id, reason)
            self.consecutive_failures += 1
            if self.consecutive_failures > self.config.tolerable_failures:
                self.failure = TooManyCheckpointFailures(
                    f"{self.consecutive_failures} consecutive checkpoint failures (tolerated: "
                    f"{self.config.tolerable_failures}); last: checkpoint {pending.checkpoint_id} "
                    f"{reason}"
                )

    def _expire(self, now: float) -> None:
        for pending in list(self.pending.values()):
            if now - pending.trigger_time >= self.config.timeout_s:
                self._abort(
                    pending,
                    f"expired after the checkpoint timeout of {self.config.timeout_s:g}s",
                    counts=True,
                )


def _has_union_state(entry: OperatorCheckpoint) -> bool:
    return any(
        has_union_state(snapshot.operator or {}) for _, snapshot in entry.subtask_states.snapshots()
    )


def _chain_future(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())
