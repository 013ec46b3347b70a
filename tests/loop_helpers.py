"""Helpers for in-process tests: step the event loop until a condition holds (no sleeps); a
virtual clock and scripted task handles to drive the checkpoint coordinator without tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from actors.protocol import TaskCommand, TaskId, TaskMetrics, TaskState


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
