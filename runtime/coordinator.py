"""The checkpoint coordinator: triggers checkpoints, collects acknowledgements, completes or aborts.

Protocol for checkpoint *n* (numbered as in DESIGN.md "Checkpoints"):

1. Trigger (periodically, on demand for a savepoint, or at once when every running task only waits
   for a final checkpoint), honouring max concurrent checkpoints and the minimum pause.
2. Send the trigger to the *running tasks whose upstream tasks have all finished*, computed from
   the latest task states; every task that has not finished must acknowledge. If a trigger cannot
   be delivered because its task just finished, abort *n* (the next checkpoint takes the new set).
3. Tasks snapshot, forward the barrier and acknowledge (see ``actors.task``).
4. (Alignment happens in the tasks.)
5. When every task acknowledged: build the checkpoint (operators whose every subtask finished are
   marked finished), persist it through the storage (metadata last, atomically), notify every
   running task, and drop subsumed checkpoints. A timeout, a decline or a lost task aborts it and
   notifies the tasks; more consecutive failures than tolerated fail the job.

The coordinator is an actor: tasks report through its mailbox, and only its own coroutine changes
its state.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actors.events import CheckpointBarrier
from actors.mailbox import Mailbox
from actors.task import (
    CheckpointAbortedMail,
    CheckpointCompleteMail,
    StopRequest,
    StreamTask,
    TaskState,
    TriggerCheckpointMail,
)
from runtime.config import CheckpointConfig as CheckpointConfig
from state.operator import has_union_state
from state.storage import CheckpointKind, CompletedCheckpoint, OperatorCheckpoint, SnapshotMap

if TYPE_CHECKING:
    from state.storage import CheckpointStorage

log = logging.getLogger(__name__)


class CheckpointStatus(enum.StrEnum):
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass
class TaskAck:
    snapshots: dict[str, Any]
    finished: bool
    alignment_ms: float
    acked_at: float


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
            "failure": self.failure,
            "path": self.path,
        }


@dataclass
class PendingCheckpoint:
    checkpoint_id: int
    kind: CheckpointKind
    trigger_time: float
    timestamp_ms: int
    awaiting: set[str]
    finished_at_trigger: set[str]
    target_dir: str | None
    stop: StopRequest | None
    future: asyncio.Future[CompletedCheckpoint]
    acks: dict[str, TaskAck] = field(default_factory=dict)
    stats: CheckpointStats | None = None


class CheckpointFailedError(RuntimeError):
    """A checkpoint or savepoint was aborted; says which and why."""


class TooManyCheckpointFailures(RuntimeError):
    """More consecutive checkpoint failures than ``tolerable_failures``: the job fails over."""


class CheckpointCoordinator:
    """Lives for the whole job, across failover attempts; checkpoint ids never repeat."""

    def __init__(
        self,
        config: CheckpointConfig,
        storage: CheckpointStorage | None,
        describe_operators: Callable[[], dict[str, tuple[str, int, int, bool]]],
        first_checkpoint_id: int = 1,
    ) -> None:
        self.config = config
        self.storage = storage
        self._describe_operators = describe_operators
        """uid → (name, parallelism, max parallelism, uses union state)."""
        self.next_id = first_checkpoint_id
        self.pending: dict[int, PendingCheckpoint] = {}
        self.completed: list[CompletedCheckpoint] = []
        self.history: list[CheckpointStats] = []
        self.consecutive_failures = 0
        self.mailbox = Mailbox("checkpoint-coordinator")
        self.tasks: list[StreamTask] = []
        self.upstream: dict[str, list[StreamTask]] = {}
        self._last_completion = 0.0
        self._next_periodic: float | None = None
        self._failure: BaseException | None = None
        self._finishing_since: dict[str, int] = {}
        """Task name → the first checkpoint id that could cover it after it became FINISHING."""
        self.completed_ids: list[int] = []
        self.stop_savepoint_path: str | None = None

    # ---------------------------------------------------------------- attempt wiring

    def attach(self, tasks: list[StreamTask], upstream: dict[str, list[StreamTask]]) -> None:
        """A new job attempt starts with these tasks; pending checkpoints of the old one abort."""
        for pending in list(self.pending.values()):
            self._abort(pending, "the job attempt ended")
        self.tasks = tasks
        self.upstream = upstream
        self._finishing_since = {}
        self._failure = None
        if self.config.interval_s:
            self._next_periodic = time.monotonic() + self.config.interval_s

    @property
    def latest_completed(self) -> CompletedCheckpoint | None:
        return self.completed[-1] if self.completed else None

    # ---------------------------------------------------------------- called by tasks (mail)

    def on_task_state(self, task: StreamTask, state: TaskState) -> None:
        self.mailbox.try_put(("state", task, state))

    def on_ack(
        self,
        task: StreamTask,
        checkpoint_id: int,
        snapshots: dict[str, Any],
        finished: bool,
        alignment_ms: float,
    ) -> None:
        self.mailbox.try_put(
            (
                "ack",
                task,
                checkpoint_id,
                TaskAck(snapshots, finished, alignment_ms, time.monotonic()),
            )
        )

    def on_decline(self, task: StreamTask, checkpoint_id: int, reason: str) -> None:
        self.mailbox.try_put(("decline", task, checkpoint_id, reason))

    # ---------------------------------------------------------------- the actor loop

    async def run(self) -> None:
        """Serve mail and timers until a ``("stop",)`` mail (every task finished) or cancel.

        Mail is served in order, so acknowledgements sent before the tasks finished complete
        their checkpoint (metadata written, retention applied) before the coordinator stops.
        """
        mailbox = self.mailbox
        while True:
            mailbox.wakeup.clear()
            while mailbox.has_mail():
                mail = mailbox.take_nowait()
                if mail == ("stop",):
                    for pending in list(self.pending.values()):
                        self._abort(pending, "every task finished", counts=False)
                    return
                await self._handle(mail)
            if self._failure is not None:
                raise self._failure
            now = time.monotonic()
            self._expire(now)
            if self._failure is not None:
                raise self._failure
            if self._next_periodic is not None and now >= self._next_periodic:
                self._next_periodic = now + (self.config.interval_s or 0)
                self._trigger_periodic()
            if self._wants_final_checkpoint():
                self.trigger(CheckpointKind.CHECKPOINT)
            await mailbox.wakeup.wait(self._next_wakeup(now))

    def _next_wakeup(self, now: float) -> float | None:
        deadlines = [p.trigger_time + self.config.timeout_s for p in self.pending.values()]
        if self._next_periodic is not None:
            deadlines.append(self._next_periodic)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    async def _handle(self, mail: Any) -> None:
        kind = mail[0]
        if kind == "ack":
            _, task, checkpoint_id, ack = mail
            pending = self.pending.get(checkpoint_id)
            if pending is None or task.task_id not in pending.awaiting:
                return
            pending.awaiting.discard(task.task_id)
            pending.acks[task.task_id] = ack
            if not pending.awaiting:
                await self._complete(pending)
        elif kind == "decline":
            _, task, checkpoint_id, reason = mail
            pending = self.pending.get(checkpoint_id)
            if pending is not None:
                self._abort(pending, reason, counts=True)
        elif kind == "state":
            _, task, state = mail
            if state is TaskState.FINISHING:
                # A task that finishes because of a stop with savepoint is covered by that very
                # savepoint (as the task itself waits for it), not by a checkpoint after it.
                stopping = [p.checkpoint_id for p in self.pending.values() if p.stop is not None]
                self._finishing_since[task.task_id] = min(stopping, default=self.next_id)
            if state is TaskState.FINISHED:
                for pending in list(self.pending.values()):
                    if task.task_id in pending.awaiting:
                        self._abort(
                            pending, f"task {task.name} finished before acknowledging", counts=False
                        )
        elif kind == "trigger":
            _, request = mail
            request()
        else:
            msg = f"checkpoint coordinator: unknown mail {mail!r}"
            raise TypeError(msg)

    # ---------------------------------------------------------------- triggering

    def _trigger_periodic(self) -> None:
        if len(self.pending) >= self.config.max_concurrent:
            return
        if time.monotonic() - self._last_completion < self.config.min_pause_s:
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
        targets = [
            t
            for t in alive
            if all(u.state is TaskState.FINISHED for u in self.upstream.get(t.task_id, []))
        ]
        now = time.monotonic()
        stats = CheckpointStats(checkpoint_id, kind.value, CheckpointStatus.IN_PROGRESS, _wall_ms())
        pending = PendingCheckpoint(
            checkpoint_id,
            kind,
            now,
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
        barrier = CheckpointBarrier(checkpoint_id, stats.trigger_time_ms, kind)
        for task in targets:
            if not task.mailbox.try_put(TriggerCheckpointMail(barrier, stop)):
                self._abort(
                    pending,
                    f"task {task.name} finished while being triggered (state {task.state.value})",
                    counts=False,
                )
                break
        return future

    def request_trigger(
        self, kind: CheckpointKind, target_dir: str | None = None, stop: StopRequest | None = None
    ) -> asyncio.Future[CompletedCheckpoint]:
        """Trigger from outside the coordinator's actor (e.g. the control endpoint)."""
        loop = asyncio.get_running_loop()
        outer: asyncio.Future[CompletedCheckpoint] = loop.create_future()

        def start() -> None:
            inner = self.trigger(kind, target_dir, stop)
            inner.add_done_callback(lambda f: _chain_future(f, outer))

        self.mailbox.put(("trigger", start))
        return outer

    # ---------------------------------------------------------------- completion and abort

    async def _complete(self, pending: PendingCheckpoint) -> None:
        """Step 5."""
        operators: dict[str, OperatorCheckpoint] = {}
        for uid, (name, parallelism, max_parallelism, _) in self._describe_operators().items():
            operators[uid] = OperatorCheckpoint(
                uid, name, parallelism, max_parallelism, SnapshotMap(), set()
            )
        for task in self.tasks:
            ack = pending.acks.get(task.task_id)
            finished = task.task_id in pending.finished_at_trigger or (
                ack is not None and ack.finished
            )
            for op in task.operators:
                entry = operators[op.uid]
                if finished:
                    entry.finished_subtasks.add(task.subtask_index)
                if ack is not None and op.uid in ack.snapshots:
                    entry.subtask_states.set_encoded(task.subtask_index, ack.snapshots[op.uid])
        # FLIP-147: union state of a partially finished operator cannot be redistributed safely.
        for uid, (_, _, _, uses_union) in self._describe_operators().items():
            entry = operators[uid]
            partially = 0 < len(entry.finished_subtasks) < entry.parallelism
            if uses_union and partially and _has_union_state(entry):
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
        self._last_completion = time.monotonic()
        self.consecutive_failures = 0
        stats = pending.stats
        assert stats is not None
        stats.status = CheckpointStatus.COMPLETED
        stats.duration_ms = (self._last_completion - pending.trigger_time) * 1000.0
        stats.state_size = checkpoint.state_size
        stats.path = checkpoint.path
        stats.alignment_ms = {name: a.alignment_ms for name, a in pending.acks.items()}
        if pending.kind is CheckpointKind.CHECKPOINT:
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
        if pending.stop is not None:
            self.stop_savepoint_path = checkpoint.path
        if pending.kind is CheckpointKind.CHECKPOINT or pending.stop is not None:
            self.completed_ids.append(pending.checkpoint_id)
            for task in self.tasks:
                if task.state is not TaskState.FINISHED:
                    task.mailbox.try_put(CheckpointCompleteMail(pending.checkpoint_id))
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
            stats.duration_ms = (time.monotonic() - pending.trigger_time) * 1000.0
        log.warning("%s %d aborted: %s", pending.kind.value, pending.checkpoint_id, reason)
        for task in self.tasks:
            if task.state is not TaskState.FINISHED:
                task.mailbox.try_put(CheckpointAbortedMail(pending.checkpoint_id, reason))
        if not pending.future.done():
            pending.future.set_exception(
                CheckpointFailedError(
                    f"{pending.kind.value} {pending.checkpoint_id} failed: {reason}"
                )
            )
            pending.future.exception()  # mark retrieved: periodic checkpoints have no waiter
        if counts and pending.kind is CheckpointKind.CHECKPOINT:
            self.consecutive_failures += 1
            if self.consecutive_failures > self.config.tolerable_failures:
                self._failure = TooManyCheckpointFailures(
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


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000
