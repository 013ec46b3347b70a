"""Keyed timers for process functions: event time and processing time.

A timer is a (timestamp, key) pair, registered at most once. Event-time timers fire when the
operator's watermark reaches their timestamp (``MAX_WATERMARK`` fires all of them); processing-time
timers fire when the task's clock (an injected :class:`Clock`, the wall clock by default) reaches
it, through control mail to the owning task, so that the firing runs on the task's own actor like
everything else.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

from state.keygroups import key_group_for_key


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Processing time: what time it is, and callbacks when a time is reached.

    Everything in a task that depends on processing time (processing-time timers, periodic
    watermarks, idleness) reads and schedules through the clock of its :class:`ExecutionConfig`,
    never the wall clock directly, so a test can run it on a :class:`ManualClock`.
    """

    def now_ms(self) -> int: ...

    def call_at(self, timestamp_ms: int, callback: Callable[[], None]) -> Cancellable:
        """Call ``callback`` (on the event loop, from no particular task) once ``now_ms()``
        reached ``timestamp_ms``; at once, on the loop, if it already has. It must not block."""
        ...


class SystemClock:
    """Wall-clock milliseconds since the epoch; callbacks scheduled on the running event loop."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def call_at(self, timestamp_ms: int, callback: Callable[[], None]) -> Cancellable:
        delay = max(0.0, (timestamp_ms - time.time_ns() / 1_000_000) / 1000.0)
        return asyncio.get_running_loop().call_later(delay, callback)


class ManualClock:
    """A clock that moves only when told to, for tests of processing time: ``advance(ms)`` and
    ``set(ms)`` run every callback that became due, in timestamp order (callbacks scheduled by
    those and already due run too), before they return. Time never goes backwards."""

    def __init__(self, start_ms: int = 0) -> None:
        self._now = int(start_ms)
        self._due: list[tuple[int, int, _ManualCall]] = []
        self._seq = itertools.count()

    def now_ms(self) -> int:
        return self._now

    def call_at(self, timestamp_ms: int, callback: Callable[[], None]) -> Cancellable:
        call = _ManualCall(callback)
        heapq.heappush(self._due, (int(timestamp_ms), next(self._seq), call))
        if timestamp_ms <= self._now:
            # As the system clock does for a time already reached: soon, not inside call_at.
            asyncio.get_running_loop().call_soon(self._run_due)
        return call

    def advance(self, ms: int) -> None:
        """Move time forward by ``ms`` and run what became due."""
        if ms < 0:
            msg = f"ManualClock.advance({ms}): time does not go backwards"
            raise ValueError(msg)
        self.set(self._now + ms)

    def set(self, now_ms: int) -> None:
        """Move time to ``now_ms`` (not before the current time) and run what became due."""
        if now_ms < self._now:
            msg = f"ManualClock.set({now_ms}): time does not go backwards (now {self._now})"
            raise ValueError(msg)
        self._now = int(now_ms)
        self._run_due()

    @property
    def pending(self) -> int:
        """Callbacks scheduled and neither run nor cancelled yet."""
        return sum(1 for *_, call in self._due if not call.cancelled)

    def _run_due(self) -> None:
        due = self._due
        while due and due[0][0] <= self._now:
            _, _, call = heapq.heappop(due)
            if not call.cancelled:
                call.cancelled = True
                call.callback()


class _ManualCall:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ProcessingTimeScheduler(Protocol):
    def schedule_processing_timer(self, timestamp_ms: int) -> None: ...


class _TimerHeap:
    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Any]] = []
        self._live: set[tuple[int, Any]] = set()
        self._seq = itertools.count()

    def add(self, timestamp: int, key: Any) -> bool:
        entry = (timestamp, key)
        if entry in self._live:
            return False
        self._live.add(entry)
        heapq.heappush(self._heap, (timestamp, next(self._seq), key))
        return True

    def remove(self, timestamp: int, key: Any) -> None:
        self._live.discard((timestamp, key))  # the heap entry is skipped when it surfaces

    def peek(self) -> int | None:
        heap = self._heap
        while heap and (heap[0][0], heap[0][2]) not in self._live:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, up_to: int) -> list[tuple[int, Any]]:
        due: list[tuple[int, Any]] = []
        heap = self._heap
        while heap and heap[0][0] <= up_to:
            timestamp, _, key = heapq.heappop(heap)
            if (timestamp, key) in self._live:
                self._live.discard((timestamp, key))
                due.append((timestamp, key))
        return due

    def clear(self) -> None:
        self._heap.clear()
        self._live.clear()

    def entries(self) -> list[tuple[int, Any]]:
        return sorted(self._live, key=lambda e: e[0])

    def __len__(self) -> int:
        return len(self._live)


class TimerService:
    """The timers of one keyed operator in one subtask.

    ``current_key`` is a callable returning the key the operator is processing, so that
    ``register_*`` registers for that key, as in Flink's ``TimerService``.
    """

    def __init__(
        self,
        current_key: Callable[[], Any],
        clock: Clock,
        scheduler: ProcessingTimeScheduler | None,
    ) -> None:
        self._current_key = current_key
        self.clock = clock
        self._scheduler = scheduler
        self._event = _TimerHeap()
        self._processing = _TimerHeap()
        self.current_watermark = -(1 << 63)

    def current_processing_time(self) -> int:
        return self.clock.now_ms()

    def register_event_time_timer(self, timestamp: int) -> None:
        self._event.add(int(timestamp), self._current_key())

    def delete_event_time_timer(self, timestamp: int) -> None:
        self._event.remove(int(timestamp), self._current_key())

    def register_processing_time_timer(self, timestamp: int) -> None:
        if self._processing.add(int(timestamp), self._current_key()) and self._scheduler:
            self._scheduler.schedule_processing_timer(int(timestamp))

    def delete_processing_time_timer(self, timestamp: int) -> None:
        self._processing.remove(int(timestamp), self._current_key())

    def due_event_timers(self, watermark: int) -> list[tuple[int, Any]]:
        """Remove and return the event-time timers with timestamp <= ``watermark``, in order."""
        self.current_watermark = max(self.current_watermark, watermark)
        return self._event.pop_due(watermark)

    def due_processing_timers(self, now_ms: int) -> list[tuple[int, Any]]:
        return self._processing.pop_due(now_ms)

    def next_processing_timer(self) -> int | None:
        return self._processing.peek()

    def clear(self) -> None:
        """Delete every timer (restored timers dropped knowingly); already scheduled
        processing-time wake-ups then find nothing due."""
        self._event.clear()
        self._processing.clear()

    @property
    def pending_event_timers(self) -> int:
        return len(self._event)

    def snapshot(self, max_parallelism: int) -> dict[str, Any]:
        """Timers grouped by key group, like keyed state, so they rescale with their keys."""
        groups: dict[int, list[list[Any]]] = {}
        for kind, heap in (("e", self._event), ("p", self._processing)):
            for timestamp, key in heap.entries():
                groups.setdefault(key_group_for_key(key, max_parallelism), []).append(
                    [kind, timestamp, key]
                )
        return {"groups": groups}

    def restore(self, snapshots: list[dict[str, Any]], owns: Callable[[int], bool]) -> None:
        for snapshot in snapshots:
            for key_group, entries in snapshot["groups"].items():
                if not owns(int(key_group)):
                    continue
                for kind, timestamp, key in entries:
                    if kind == "e":
                        self._event.add(timestamp, key)
                    elif self._processing.add(timestamp, key) and self._scheduler:
                        self._scheduler.schedule_processing_timer(timestamp)
