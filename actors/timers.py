"""Keyed timers for process functions and windows: event time and processing time.

A timer is a (timestamp, key, namespace) triple, registered at most once; the namespace is
``None`` for process functions' timers and the window for a window operator's. Event-time
timers fire when the operator's watermark reaches their timestamp (``MAX_WATERMARK`` fires all
of them); processing-time timers fire when processing time (the task's clock: an injected
:class:`Clock`, the wall clock by default) reaches it, through control mail to the owning task,
so that the firing runs on the task's own actor like everything else.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Iterable
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
    """Timers bucketed by timestamp: a heap of distinct timestamps, and per timestamp its
    (key, namespace) entries in registration order. Window operators register one timer per
    key and window, mostly at few distinct timestamps, so a bucket costs one dict lookup."""

    __slots__ = ("_buckets", "_heap", "_size")

    def __init__(self) -> None:
        self._heap: list[int] = []
        self._buckets: dict[int, dict[tuple[Any, Any], None]] = {}
        self._size = 0

    def add(self, timestamp: int, key: Any, namespace: Any = None) -> bool:
        bucket = self._buckets.get(timestamp)
        if bucket is None:
            bucket = self._buckets[timestamp] = {}
            heapq.heappush(self._heap, timestamp)
        entry = (key, namespace)
        if entry in bucket:
            return False
        bucket[entry] = None
        self._size += 1
        return True

    def remove(self, timestamp: int, key: Any, namespace: Any = None) -> None:
        bucket = self._buckets.get(timestamp)
        if bucket is not None and bucket.pop((key, namespace), _GONE) is not _GONE:
            self._size -= 1  # an empty bucket's timestamp is skipped when it surfaces

    def peek(self) -> int | None:
        heap, buckets = self._heap, self._buckets
        while heap and not buckets.get(heap[0]):
            buckets.pop(heapq.heappop(heap), None)
        return heap[0] if heap else None

    def pop_due(self, up_to: int) -> list[tuple[int, Any, Any]]:
        due: list[tuple[int, Any, Any]] = []
        heap, buckets = self._heap, self._buckets
        while heap and heap[0] <= up_to:
            timestamp = heapq.heappop(heap)
            bucket = buckets.pop(timestamp, None)
            if bucket:
                due.extend([(timestamp, key, ns) for key, ns in bucket])
        self._size -= len(due)
        return due

    def clear(self) -> None:
        self._heap.clear()
        self._buckets.clear()
        self._size = 0

    def entries(self) -> list[tuple[int, Any, Any]]:
        return [
            (timestamp, key, ns)
            for timestamp in sorted(self._buckets)
            for key, ns in self._buckets[timestamp]
        ]

    def __len__(self) -> int:
        return self._size


_GONE: Any = object()


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

    def current_key(self) -> Any:
        """The key the operator is processing, which timers are registered for."""
        return self._current_key()

    def register_event_time_timer(self, timestamp: int, namespace: Any = None) -> None:
        self._event.add(int(timestamp), self._current_key(), namespace)

    def delete_event_time_timer(self, timestamp: int, namespace: Any = None) -> None:
        self._event.remove(int(timestamp), self._current_key(), namespace)

    def register_processing_time_timer(self, timestamp: int, namespace: Any = None) -> None:
        timestamp = int(timestamp)
        if self._processing.add(timestamp, self._current_key(), namespace) and self._scheduler:
            self._scheduler.schedule_processing_timer(timestamp)

    def delete_processing_time_timer(self, timestamp: int, namespace: Any = None) -> None:
        self._processing.remove(int(timestamp), self._current_key(), namespace)

    def due_event_timers(self, watermark: int) -> list[tuple[int, Any]]:
        """Remove and return the event-time timers with timestamp <= ``watermark``, in order, as
        (timestamp, key): for users of timers without a namespace."""
        return [(timestamp, key) for timestamp, key, _ in self.due_event_timer_entries(watermark)]

    def due_event_timer_entries(self, watermark: int) -> list[tuple[int, Any, Any]]:
        """Remove and return the event-time timers with timestamp <= ``watermark`` as
        (timestamp, key, namespace), in timestamp order, then registration order."""
        if watermark > self.current_watermark:
            self.current_watermark = watermark
        return self._event.pop_due(watermark)

    def due_processing_timers(self, now_ms: int) -> list[tuple[int, Any]]:
        return [(timestamp, key) for timestamp, key, _ in self._processing.pop_due(now_ms)]

    def due_processing_timer_entries(self, now_ms: int) -> list[tuple[int, Any, Any]]:
        """Like :meth:`due_event_timer_entries`, for processing time."""
        return self._processing.pop_due(now_ms)

    def event_timer_entries(self) -> list[tuple[int, Any, Any]]:
        """Every pending event-time timer as (timestamp, key, namespace), in firing order."""
        return self._event.entries()

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
        return timers_snapshot(
            (
                (kind, timestamp, key, namespace)
                for kind, heap in (("e", self._event), ("p", self._processing))
                for timestamp, key, namespace in heap.entries()
            ),
            max_parallelism,
        )

    def restore(self, snapshots: list[dict[str, Any]], owns: Callable[[int], bool]) -> None:
        for snapshot in snapshots:
            for key_group, entries in snapshot["groups"].items():
                if not owns(int(key_group)):
                    continue
                for kind, timestamp, key, *rest in entries:
                    namespace = rest[0] if rest else None
                    if type(namespace) is list:
                        namespace = tuple(namespace)  # see timers_snapshot
                    if kind == "e":
                        self._event.add(timestamp, key, namespace)
                    elif self._processing.add(timestamp, key, namespace) and self._scheduler:
                        self._scheduler.schedule_processing_timer(timestamp)


def timers_snapshot(
    entries: Iterable[tuple[str, int, Any, Any]],
    max_parallelism: int,
    key_groups: dict[Any, int] | None = None,
) -> dict[str, Any]:
    """The snapshot of timers ``(kind, timestamp, key, namespace)`` (kind ``"e"`` event time,
    ``"p"`` processing time): ``{"groups": {key group: [[kind, timestamp, key(, namespace)]]}}``.

    An entry without a namespace keeps the layout from before namespaces. A tuple namespace (a
    window) is written as a list, which msgpack encodes natively (a tuple needs an extension
    type, several times slower); namespaces are hashable, so a list restores as the tuple.
    ``key_groups`` caches the key group of keys across snapshots (it is read and filled).
    """
    groups: dict[int, list[list[Any]]] = {}
    group_of: dict[Any, list[list[Any]]] = {}
    known = key_groups if key_groups is not None else {}
    for kind, timestamp, key, namespace in entries:
        group = group_of.get(key)
        if group is None:
            key_group = known.get(key)
            if key_group is None:
                key_group = known[key] = key_group_for_key(key, max_parallelism)
            group = groups.setdefault(key_group, [])
            group_of[key] = group
        if namespace is None:
            group.append([kind, timestamp, key])
        else:
            group.append(
                [kind, timestamp, key, list(namespace) if type(namespace) is tuple else namespace]
            )
    return {"groups": groups}
