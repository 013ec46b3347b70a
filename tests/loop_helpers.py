"""Helpers for in-process tests: step the event loop until a condition holds (no sleeps); a
virtual clock and scripted task handles to drive the checkpoint coordinator without tasks; a
source that emits what the test pushes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from actors.protocol import TaskCommand, TaskId, TaskMetrics, TaskState
from runtime.api.sources import END_OF_INPUT, Source, SourceReader


async def wait_until(
    predicate: Callable[[], bool],
    what: str,
    job: asyncio.Task[Any] | None = None,
    steps: int = 100_000,
) -> None:
    """Step the loop until ``predicate`` holds; a job that ended meanwhile raises its own error."""
    for _ in range(steps):
        if predicate():
            return
        if job is not None and job.done():
            job.result()  # raises the job's failure
            msg = f"the job ended while waiting for {what}"
            raise AssertionError(msg)
        await asyncio.sleep(0)
    msg = f"gave up waiting for {what}"
    raise AssertionError(msg)


class VirtualClock:
    """A coordinator clock that moves only when the test advances it."""

    def __init__(self, start_s: float = 1000.0, start_wall_ms: int = 1_700_000_000_000) -> None:
        self.now_s = start_s
        self._wall_offset_ms = start_wall_ms - int(start_s * 1000)

    def monotonic_s(self) -> float:
        return self.now_s

    def wall_ms(self) -> int:
        return self._wall_offset_ms + int(self.now_s * 1000)

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


class ScriptedTaskHandle:
    """A task handle whose state the test sets (as a late report would leave it) and which records
    the commands sent to it; ``accepts = False`` makes ``send`` fail as for a task that ended."""

    def __init__(
        self,
        vertex_id: str,
        subtask_index: int = 0,
        *,
        state: TaskState = TaskState.RUNNING,
        upstream: tuple[TaskId, ...] = (),
        operator_uids: tuple[str, ...] | None = None,
        attempt: int = 1,
    ) -> None:
        self.task_id = TaskId(vertex_id, subtask_index, attempt)
        self.name = f"{vertex_id} ({subtask_index + 1})"
        self.state = state
        self.upstream = upstream
        self.operator_uids = operator_uids if operator_uids is not None else (vertex_id,)
        self.accepts = True
        self.sent: list[TaskCommand] = []

    def send(self, command: TaskCommand) -> bool:
        if not self.accepts:
            return False
        self.sent.append(command)
        return True

    def latest_metrics(self) -> TaskMetrics | None:
        return None

    def take_sent(self) -> list[TaskCommand]:
        """The commands sent since the last call."""
        sent, self.sent = self.sent, []
        return sent


class ControlledSource(Source[Any]):
    """One split over ``elements``, which the test extends with ``push``; ends when the test
    calls ``end``. The split's position is its state, so a restored reader replays from there.

    ``hold``: while set to an unset event, ``prepare_snapshot`` (the start of this source's
    snapshot) waits on it, which delays this source's barrier.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self.elements: list[Any] = []
        self.ended = False
        self.hold: asyncio.Event | None = None
        self.snapshots_started = 0
        self._notify: Callable[[], None] | None = None

    def name(self) -> str:
        return self._name

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"split": 0, "next": 0}]

    def create_reader(self, context: Any) -> SourceReader[Any]:
        self._notify = context.notify_available
        return _ControlledReader(self)

    def push(self, *values: Any) -> None:
        self.elements.extend(values)
        if self._notify is not None:
            self._notify()

    def end(self) -> None:
        self.ended = True
        if self._notify is not None:
            self._notify()


class _ControlledReader(SourceReader[Any]):
    def __init__(self, source: ControlledSource) -> None:
        self.source = source
        self.splits: list[dict[str, Any]] = []

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> Any:
        source = self.source
        for split in self.splits:
            start = split["next"]
            if start < len(source.elements):
                values = source.elements[start : start + max_records]
                split["next"] = start + len(values)
                return values
        if source.ended:
            return END_OF_INPUT
        return None

    async def prepare_snapshot(self) -> None:
        self.source.snapshots_started += 1
        hold = self.source.hold
        if hold is not None:
            await hold.wait()

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]


class SettableClock:
    """A processing-time clock (``ExecutionConfig.clock``, a state backend's ``now_ms``) that
    moves only when the test sets or advances it."""

    def __init__(self, now_ms: int = 0) -> None:
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now

    def set(self, now_ms: int) -> None:
        self.now = now_ms

    def advance(self, ms: int) -> None:
        self.now += ms


async def start_job_on_master(
    build: Callable[[Any], None],
    config: Any,
    parallelism: int = 1,
    name: str = "test-job",
    **master_kw: Any,
) -> tuple[Any, asyncio.Task[Any]]:
    """A job master running ``build`` as a task of this loop, once every task of it runs; the
    test triggers checkpoints with :func:`take_checkpoint` and ends sources itself."""
    from runtime.master.jobmaster import JobMaster
    from runtime.shell.runner import build_graph

    graph = build_graph(build, {}, parallelism, name=name)
    master = JobMaster(graph, config, **master_kw)
    job = asyncio.create_task(master.run())
    await wait_until(
        lambda: bool(master.tasks) and all(t.state is TaskState.RUNNING for t in master.tasks),
        "every task running",
        job,
    )
    return master, job


async def take_checkpoint(master: Any, timeout_s: float = 10.0) -> Any:
    """Trigger a checkpoint on ``master`` and return it once completed (``.path`` is its folder
    when the job has a checkpoint directory)."""
    from state.storage import CheckpointKind

    trigger = master.coordinator.request_trigger(CheckpointKind.CHECKPOINT)
    return await asyncio.wait_for(trigger, timeout_s)
