"""Keyed timers for process functions: event time and processing time.

A timer is a (timestamp, key) pair, registered at most once. Event-time timers fire when the
operator's watermark reaches their timestamp (``MAX_WATERMARK`` fires all of them); processing-time
timers fire when the wall clock (an injected :class:`Clock`) reaches it, through control mail to the
owning task, so that the firing runs on the task's own actor like everything else.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

from state.keygroups import key_group_for_key


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    """Wall-clock milliseconds since the epoch."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


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
