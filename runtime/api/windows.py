"""Windows: assigners, triggers and window functions (Flink's window API and semantics).

``keyed.window(assigner)`` groups each key's records into windows; a trigger decides when a
window's contents are evaluated by its window function::

    counts = (events.key_by(lambda e: e["user"])
                    .window(TumblingEventTimeWindows.of("10s"))
                    .allowed_lateness("5s")
                    .aggregate(CountAndSum()))

- **Assigners** give each record its windows: tumbling, sliding and session windows in event
  time (the record's timestamp) or processing time (the injected clock when the record arrives),
  and the one global window. Sizes, slides, gaps and offsets are int milliseconds or duration
  strings (``"10s"``, ``"1min"``, ``"250ms"``). Session windows merge when they overlap.
- **Windows** are :class:`TimeWindow` (``start`` inclusive, ``end`` exclusive, ms;
  ``max_timestamp == end - 1``) or :class:`GlobalWindow`. Both are tuples, which is also how the
  operator keeps them in keyed state and timers.
- **Triggers** (:class:`Trigger`) are asked on every element, event-time and processing-time
  timer; they return a :class:`TriggerResult` (fire and/or purge). Each assigner has a default
  trigger (:class:`EventTimeTrigger` for event time, :class:`ProcessingTimeTrigger` for
  processing time, one that never fires for :class:`GlobalWindows`).
- **Lateness**: an event-time window is late once ``max_timestamp + allowed_lateness <=
  watermark``; its state is removed then. A record whose windows are all late goes to the late
  data side output if one is set, else it is dropped and counted (``late_records_dropped`` in
  ``GET /status``). A record later than its window's end but within the allowed lateness fires
  the window again, with the updated result.
- **Window functions**: ``reduce(fn)``, ``aggregate(AggregateFunction)`` (both incremental: a
  window holds one value) and ``process(ProcessWindowFunction)`` (gets every element); reduce and
  aggregate take an optional ``ProcessWindowFunction`` that gets the one aggregated value with the
  window's metadata. Results carry the window's ``max_timestamp`` as their timestamp.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, Generic, NamedTuple, TypeVar, cast

from actors.events import MAX_TIMESTAMP
from runtime.api.durations import duration_ms
from runtime.api.functions import Collector, OutputTag, RichFunction
from runtime.api.streams import DataStream, JobDefinitionError, KeyedStream, _require_sync
from state.keyed import ReducingStateDescriptor

IN = TypeVar("IN")
OUT = TypeVar("OUT")
KEY = TypeVar("KEY")


# ----------------------------------------------------------------------------------- windows


class TimeWindow(NamedTuple):
    """The time interval ``[start, end)`` in milliseconds."""

    start: int
    end: int

    @property
    def max_timestamp(self) -> int:
        """The largest timestamp that belongs to the window (``end - 1``)."""
        return self.end - 1

    def intersects(self, other: tuple[int, int]) -> bool:
        """Overlapping or adjacent: session windows that intersect merge."""
        return self.start <= other[1] and self.end >= other[0]

    def cover(self, other: tuple[int, int]) -> TimeWindow:
        """The smallest window containing both."""
        return TimeWindow(min(self.start, other[0]), max(self.end, other[1]))


class GlobalWindow(NamedTuple):
    """The one window of :class:`GlobalWindows`: it never ends."""

    @property
    def max_timestamp(self) -> int:
        return MAX_TIMESTAMP


Window = TimeWindow | GlobalWindow


def window_of(window: tuple[int, ...]) -> Window:
    """The API object for a window as state keeps it (a plain tuple after a restore)."""
    return TimeWindow(window[0], window[1]) if window else GlobalWindow()


def max_timestamp_of(window: tuple[int, ...]) -> int:
    return window[1] - 1 if window else MAX_TIMESTAMP


# ----------------------------------------------------------------------------------- assigners


def window_start(timestamp: int, offset: int, size: int) -> int:
    """The start of the window of length ``size`` (aligned to ``offset``) holding ``timestamp``."""
    return timestamp - (timestamp - offset) % size


class WindowAssigner:
    """Gives each record the windows it belongs to."""

    is_event_time = True
    """Windows end by the watermark (else by the processing-time clock)."""
    is_merging = False
    """Windows may merge (session windows)."""

    def assign_windows(self, timestamp: int, processing_time: int) -> list[tuple[int, ...]]:
        """The windows of a record with event ``timestamp`` arriving at ``processing_time``."""
        raise NotImplementedError

    def default_trigger(self) -> Trigger:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _positive_ms(value: int | str, what: str) -> int:
    millis = duration_ms(value, what)
    if millis <= 0:
        msg = f"{what} must be positive, got {value!r}"
        raise ValueError(msg)
    return millis


class _Tumbling(WindowAssigner):
    def __init__(self, size: int | str, offset: int | str = 0) -> None:
        self.size = _positive_ms(size, "window size")
        self.offset = duration_ms(offset, "window offset") % self.size

    @classmethod
    def of(cls, size: int | str, offset: int | str = 0) -> Any:
        """Windows of ``size`` back to back, aligned to ``offset`` (e.g. ``"1h"`` windows at
        ``"15min"`` past the hour)."""
        return cls(size, offset)

    def _assign(self, timestamp: int) -> list[tuple[int, ...]]:
        start = window_start(timestamp, self.offset, self.size)
        return [(start, start + self.size)]


class _Sliding(WindowAssigner):
    def __init__(self, size: int | str, slide: int | str, offset: int | str = 0) -> None:
        self.size = _positive_ms(size, "window size")
        self.slide = _positive_ms(slide, "window slide")
        self.offset = duration_ms(offset, "window offset") % self.slide

    @classmethod
    def of(cls, size: int | str, slide: int | str, offset: int | str = 0) -> Any:
        """Windows of ``size`` starting every ``slide``: each record is in ``size / slide``
        of them."""
        return cls(size, slide, offset)

    def _assign(self, timestamp: int) -> list[tuple[int, ...]]:
        size, slide = self.size, self.slide
        last = window_start(timestamp, self.offset, slide)
        return [(start, start + size) for start in range(last, timestamp - size, -slide)]


class _Sessions(WindowAssigner):
    is_merging = True

    def __init__(self, gap: int | str) -> None:
        self.gap = _positive_ms(gap, "session gap")

    @classmethod
    def with_gap(cls, gap: int | str) -> Any:
        """A window per burst of activity: it closes after ``gap`` without records of its key."""
        return cls(gap)

    def _assign(self, timestamp: int) -> list[tuple[int, ...]]:
        return [(timestamp, timestamp + self.gap)]


class _EventTime(WindowAssigner):
    """Windows of the records' timestamps, ended by the watermark."""

    def assign_windows(self, timestamp: int, processing_time: int) -> list[tuple[int, ...]]:
        return self._assign(timestamp)

    def _assign(self, timestamp: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def default_trigger(self) -> Trigger:
        return EventTimeTrigger()


class _ProcessingTime(WindowAssigner):
    """Windows of the processing-time clock when records arrive, ended by that clock."""

    is_event_time = False

    def assign_windows(self, timestamp: int, processing_time: int) -> list[tuple[int, ...]]:
        return self._assign(processing_time)

    def _assign(self, timestamp: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def default_trigger(self) -> Trigger:
        return ProcessingTimeTrigger()


class TumblingEventTimeWindows(_Tumbling, _EventTime):
    """Fixed-size, non-overlapping event-time windows."""


class SlidingEventTimeWindows(_Sliding, _EventTime):
    """Fixed-size event-time windows that overlap by ``size - slide``."""


class EventTimeSessionWindows(_Sessions, _EventTime):
    """Event-time session windows: ``[timestamp, timestamp + gap)`` per record, merged."""


class TumblingProcessingTimeWindows(_Tumbling, _ProcessingTime):
    """Fixed-size, non-overlapping windows of the processing-time clock."""


class SlidingProcessingTimeWindows(_Sliding, _ProcessingTime):
    """Fixed-size overlapping windows of the processing-time clock."""


class ProcessingTimeSessionWindows(_Sessions, _ProcessingTime):
    """Session windows of the processing-time clock."""


class GlobalWindows(WindowAssigner):
    """Every record of a key in one window that never ends; give it a trigger
    (``CountTrigger.of(n)``), since the default one never fires."""

    is_event_time = False

    @classmethod
    def create(cls) -> GlobalWindows:
        return cls()

    def assign_windows(self, timestamp: int, processing_time: int) -> list[tuple[int, ...]]:
        return [()]

    def default_trigger(self) -> Trigger:
        return _NeverTrigger()


# ----------------------------------------------------------------------------------- triggers


class TriggerResult(enum.Enum):
    """What a trigger decides for its window."""

    CONTINUE = (False, False)
    FIRE = (True, False)
    """Evaluate the window function on the contents; keep them."""
    PURGE = (False, True)
    """Drop the contents without evaluating them."""
    FIRE_AND_PURGE = (True, True)

    @property
    def fire(self) -> bool:
        return self.value[0]

    @property
    def purge(self) -> bool:
        return self.value[1]


class TriggerContext:
    """What a trigger may use: time, timers and state of its key and window.

    State from :meth:`get_partitioned_state` is kept per key and window (in keyed state, so it is
    checkpointed and rescaled with the key); value, list and reducing descriptors are supported.
    """

    def current_watermark(self) -> int:
        raise NotImplementedError

    def current_processing_time(self) -> int:
        raise NotImplementedError

    def register_event_time_timer(self, timestamp: int) -> None:
        raise NotImplementedError

    def delete_event_time_timer(self, timestamp: int) -> None:
        raise NotImplementedError

    def register_processing_time_timer(self, timestamp: int) -> None:
        raise NotImplementedError

    def delete_processing_time_timer(self, timestamp: int) -> None:
        raise NotImplementedError

    def get_partitioned_state(self, descriptor: Any) -> Any:
        raise NotImplementedError

    def merge_partitioned_state(self, descriptor: Any) -> None:
        """In ``on_merge`` only: combine the merged windows' state of ``descriptor`` (reducing
        state by its reduce function, list state by concatenation) into the new window's."""
        raise NotImplementedError


class Trigger:
    """Decides when a window fires and when its contents are purged (Flink's ``Trigger``)."""

    def on_element(
        self, element: Any, timestamp: int, window: Window, ctx: TriggerContext
    ) -> TriggerResult:
        raise NotImplementedError

    def on_event_time(self, time: int, window: Window, ctx: TriggerContext) -> TriggerResult:
        """An event-time timer of this window registered by the trigger fired."""
        return TriggerResult.CONTINUE

    def on_processing_time(self, time: int, window: Window, ctx: TriggerContext) -> TriggerResult:
        """A processing-time timer of this window registered by the trigger fired."""
        return TriggerResult.CONTINUE

    def can_merge(self) -> bool:
        """Whether the trigger works with merging (session) windows."""
        return False

    def on_merge(self, window: Window, ctx: TriggerContext) -> None:
        """Windows merged into ``window``: merge state, register timers for the new window."""
        msg = f"{type(self).__name__} does not support merging windows"
        raise NotImplementedError(msg)

    def clear(self, window: Window, ctx: TriggerContext) -> None:
        """The window is removed: delete the trigger's timers and state of it."""


class _EndOfWindowTrigger(Trigger):
    """Fires when its time (the watermark, or the processing-time clock) passes the window's
    end: one timer per window, at its ``max_timestamp``."""

    def _now(self, ctx: TriggerContext) -> int:
        raise NotImplementedError

    def _timer(self, ctx: TriggerContext, timestamp: int, register: bool) -> None:
        raise NotImplementedError

    def can_merge(self) -> bool:
        return True

    def on_merge(self, window: Window, ctx: TriggerContext) -> None:
        if window.max_timestamp > self._now(ctx):
            self._timer(ctx, window.max_timestamp, register=True)

    def clear(self, window: Window, ctx: TriggerContext) -> None:
        self._timer(ctx, window.max_timestamp, register=False)

    @classmethod
    def create(cls) -> Any:
        return cls()


class EventTimeTrigger(_EndOfWindowTrigger):
    """Fires when the watermark passes the window's end, and again for each late record within
    the allowed lateness (the default trigger of event-time windows)."""

    def _now(self, ctx: TriggerContext) -> int:
        return ctx.current_watermark()

    def _timer(self, ctx: TriggerContext, timestamp: int, register: bool) -> None:
        if register:
            ctx.register_event_time_timer(timestamp)
        else:
            ctx.delete_event_time_timer(timestamp)

    def on_element(
        self, element: Any, timestamp: int, window: Window, ctx: TriggerContext
    ) -> TriggerResult:
        if window.max_timestamp <= ctx.current_watermark():
            return TriggerResult.FIRE
        ctx.register_event_time_timer(window.max_timestamp)
        return TriggerResult.CONTINUE

    def on_event_time(self, time: int, window: Window, ctx: TriggerContext) -> TriggerResult:
        return TriggerResult.FIRE if time == window.max_timestamp else TriggerResult.CONTINUE


class ProcessingTimeTrigger(_EndOfWindowTrigger):
    """Fires when the processing-time clock passes the window's end (the default trigger of
    processing-time windows)."""

    def _now(self, ctx: TriggerContext) -> int:
        return ctx.current_processing_time()

    def _timer(self, ctx: TriggerContext, timestamp: int, register: bool) -> None:
        if register:
            ctx.register_processing_time_timer(timestamp)
        else:
            ctx.delete_processing_time_timer(timestamp)

    def on_element(
        self, element: Any, timestamp: int, window: Window, ctx: TriggerContext
    ) -> TriggerResult:
        ctx.register_processing_time_timer(window.max_timestamp)
        return TriggerResult.CONTINUE

    def on_processing_time(self, time: int, window: Window, ctx: TriggerContext) -> TriggerResult:
        return TriggerResult.FIRE


def _add(a: int, b: int) -> int:
    return a + b


def _smaller(a: int, b: int) -> int:
    return min(a, b)


class CountTrigger(Trigger):
    """Fires each time the window has ``count`` more elements (keeps the contents: use
    ``PurgingTrigger.of(CountTrigger.of(n))`` for disjoint batches)."""

    _COUNT = ReducingStateDescriptor[int]("count", _add)

    def __init__(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            msg = f"CountTrigger.of() needs a count >= 1, got {count!r}"
            raise ValueError(msg)
        self.count = count

    @classmethod
    def of(cls, count: int) -> CountTrigger:
        return cls(count)

    def on_element(
        self, element: Any, timestamp: int, window: Window, ctx: TriggerContext
    ) -> TriggerResult:
        state = ctx.get_partitioned_state(self._COUNT)
        state.add(1)
        if state.get() >= self.count:
            state.clear()
            return TriggerResult.FIRE
        return TriggerResult.CONTINUE

    def can_merge(self) -> bool:
        return True

    def on_merge(self, window: Window, ctx: TriggerContext) -> None:
        ctx.merge_partitioned_state(self._COUNT)

    def clear(self, window: Window, ctx: TriggerContext) -> None:
        ctx.get_partitioned_state(self._COUNT).clear()

    def __repr__(self) -> str:
        return f"CountTrigger.of({self.count})"


class ContinuousEventTimeTrigger(Trigger):
    """Fires every ``interval`` of event time (aligned to multiples of it) while the window is
    open, and at its end."""

    _NEXT_FIRE = ReducingStateDescriptor[int]("next-fire", _smaller)

    def __init__(self, interval: int | str) -> None:
        self.interval = _positive_ms(interval, "trigger interval")

    @classmethod
    def of(cls, interval: int | str) -> ContinuousEventTimeTrigger:
        return cls(interval)

    def on_element(
        self, element: Any, timestamp: int, window: Window, ctx: TriggerContext
    ) -> TriggerResult:
        if window.max_timestamp <= ctx.current_watermark():
            return TriggerResult.FIRE
        ctx.register_event_time_timer(window.max_timestamp)
        state = ctx.get_partitioned_state(self._NEXT_FIRE)
        if state.get() is None:
            self._register_next(timestamp - timestamp % self.interval, window, ctx, state)
        return TriggerResult.CONTINUE

    def on_event_time(self, time: int, window: Window, ctx: TriggerContext) -> TriggerResult:
        if time == window.max_timestamp:
            return TriggerResult.FIRE
        state = ctx.get_partitioned_state(self._NEXT_FIRE)
        if state.get() == time:
            state.clear()
            self._register_next(time, window, ctx, state)
            return TriggerResult.FIRE
        return TriggerResult.CONTINUE

    def _register_next(self, time: int, window: Window, ctx: TriggerContext, state: Any) -> None:
        next_fire = min(time + self.interval, window.max_timestamp)
        state.add(next_fire)
        ctx.register_event_time_timer(next_fire)

    def can_merge(self) -> bool:
        return True

    def on_merge(self, window: Window, ctx: TriggerContext) -> None:
        ctx.merge_partitioned_state(self._NEXT_FIRE)
        next_fire = ctx.get_partitioned_state(self._NEXT_FIRE).get()
        if next_fire is not None:
            ctx.register_event_time_timer(next_fire)

    def clear(self, window: Window, ctx: TriggerContext) -> None:
        state = ctx.get_partitioned_state(self._NEXT_FIRE)
        next_fire = state.get()
        if next_fire is not None:
            ctx.delete_event_time_timer(next_fire)
        state.clear()

    def __repr__(self) -> str:
        return f"ContinuousEventTimeTrigger.of({self.interval})"


class PurgingTrigger(Trigger):
    """Turns every FIRE of ``trigger`` into FIRE_AND_PURGE: each firing sees only the elements
    since the previous one."""

    def __init__(self, trigger: Trigger) -> None:
        if not isinstance(trigger, Trigger):
            msg = f"PurgingTrigger.of() needs a Trigger, got {type(trigger).__name__}"
            raise TypeError(msg)
        self.trigger = trigger

    @classmethod
    def of(cls, trigger: Trigger) -> PurgingTrigger:
        return cls(trigger)

    @staticmethod
    def _purging(result: TriggerResult) -> TriggerResult:
        return TriggerResult.FIRE_AND_PURGE if result.fire else result

    def on_element(
        self, element: Any, timestamp: int, window: Window, ctx: TriggerContext
    ) -> TriggerResult:
        return self._purging(self.trigger.on_element(element, timestamp, window, ctx))

    def on_event_time(self, time: int, window: Window, ctx: TriggerContext) -> TriggerResult:
        return self._purging(self.trigger.on_event_time(time, window, ctx))

    def on_processing_time(self, time: int, window: Window, ctx: TriggerContext) -> TriggerResult:
        return self._purging(self.trigger.on_processing_time(time, window, ctx))

    def can_merge(self) -> bool:
        return self.trigger.can_merge()

    def on_merge(self, window: Window, ctx: TriggerContext) -> None:
        self.trigger.on_merge(window, ctx)

    def clear(self, window: Window, ctx: TriggerContext) -> None:
        self.trigger.clear(window, ctx)

    def __repr__(self) -> str:
        return f"PurgingTrigger.of({self.trigger!r})"


class _NeverTrigger(Trigger):
    """The default of :class:`GlobalWindows`: a global window fires only by a trigger given."""

    def on_element(
        self, element: Any, timestamp: int, window: Window, ctx: TriggerContext
    ) -> TriggerResult:
        return TriggerResult.CONTINUE

    def can_merge(self) -> bool:
        return True

    def on_merge(self, window: Window, ctx: TriggerContext) -> None:
        return None


# ----------------------------------------------------------------------------------- functions


class WindowContext(Generic[KEY]):
    """What a :class:`ProcessWindowFunction` gets besides the elements."""

    window: Any
    """The window being evaluated (:class:`TimeWindow`: ``start``, ``end`` exclusive, ms)."""

    def current_watermark(self) -> int:
        raise NotImplementedError

    def current_processing_time(self) -> int:
        raise NotImplementedError

    def window_state(self) -> Any:
        """Keyed state of this key *and window* (``.get_state(descriptor)``); clear it in
        ``ProcessWindowFunction.clear``, which runs when the window is removed."""
        raise NotImplementedError

    def global_state(self) -> Any:
        """Keyed state of this key across all its windows (``.get_state(descriptor)``)."""
        raise NotImplementedError


class ProcessWindowFunction(RichFunction, Generic[IN, OUT, KEY]):
    """Evaluates a window: all its elements (or the one aggregated value when combined with
    ``reduce``/``aggregate``), with the key and the window's metadata."""

    def process(
        self, key: KEY, context: WindowContext[KEY], elements: Iterable[IN], out: Collector[OUT]
    ) -> None:
        raise NotImplementedError

    def clear(self, context: WindowContext[KEY]) -> None:
        """The window is removed (its end plus the allowed lateness passed): clear its
        ``window_state()`` here."""


class ProcessAllWindowFunction(RichFunction, Generic[IN, OUT]):
    """A :class:`ProcessWindowFunction` of a non-keyed stream (``window_all``): no key."""

    def process(
        self, context: WindowContext[Any], elements: Iterable[IN], out: Collector[OUT]
    ) -> None:
        raise NotImplementedError

    def clear(self, context: WindowContext[Any]) -> None:
        """The window is removed."""


class _AllWindowAdapter(ProcessWindowFunction[Any, Any, Any]):
    """Runs a :class:`ProcessAllWindowFunction` where a keyed one is expected."""

    def __init__(self, function: ProcessAllWindowFunction[Any, Any]) -> None:
        self.function = function

    def open(self, ctx: Any) -> None:
        self.function.open(ctx)

    def finish(self) -> None:
        self.function.finish()

    def close(self) -> None:
        self.function.close()

    def process(self, key: Any, context: Any, elements: Iterable[Any], out: Any) -> None:
        self.function.process(context, elements, out)

    def clear(self, context: Any) -> None:
        self.function.clear(context)


_AGGREGATE_METHODS = ("create_accumulator", "add", "get_result", "merge")


# ----------------------------------------------------------------------------------- streams


class WindowedStream:
    """A keyed stream grouped into windows; finish it with reduce, aggregate or process."""

    _window_all = False

    def __init__(self, stream: KeyedStream, assigner: WindowAssigner) -> None:
        if not isinstance(assigner, WindowAssigner):
            msg = (
                f"window() needs a WindowAssigner (e.g. TumblingEventTimeWindows.of('10s')), "
                f"got {type(assigner).__name__}"
            )
            raise JobDefinitionError(msg)
        self._stream = stream
        self._assigner = assigner
        self._trigger: Trigger = assigner.default_trigger()
        self._allowed_lateness = 0
        self._late_tag: OutputTag | None = None

    def trigger(self, trigger: Trigger) -> WindowedStream:
        """Replace the assigner's default trigger."""
        if not isinstance(trigger, Trigger):
            msg = f"trigger() needs a Trigger, got {type(trigger).__name__}"
            raise JobDefinitionError(msg)
        if self._assigner.is_merging and not trigger.can_merge():
            msg = (
                f"trigger {trigger!r} does not support merging windows, which "
                f"{self._assigner!r} makes: use a trigger whose can_merge() is True"
            )
            raise JobDefinitionError(msg)
        self._trigger = trigger
        return self

    def allowed_lateness(self, lateness: int | str) -> WindowedStream:
        """Keep event-time windows this long after their end: a late record within it fires the
        window again with the updated result (int ms or a duration like ``"5s"``)."""
        if not self._assigner.is_event_time and duration_ms(lateness, "allowed lateness"):
            msg = "allowed_lateness() applies to event-time windows only"
            raise JobDefinitionError(msg)
        self._allowed_lateness = duration_ms(lateness, "allowed lateness")
        return self

    def side_output_late_data(self, tag: Any) -> WindowedStream:
        """Send records later than the allowed lateness to the side output ``tag`` (an
        ``OutputTag``), read with ``result.get_side_output(tag)``, instead of dropping them."""
        if not isinstance(tag, OutputTag):
            msg = f"side_output_late_data() needs an OutputTag, got {type(tag).__name__}"
            raise JobDefinitionError(msg)
        self._late_tag = tag
        return self

    def reduce(
        self,
        fn: Callable[[Any, Any], Any],
        window_function: ProcessWindowFunction[Any, Any, Any] | None = None,
        name: str | None = None,
    ) -> DataStream:
        """Combine each window's elements with ``fn(accumulated, value)`` as they arrive; emit the
        reduced value (or give it to ``window_function``) when the window fires."""
        _require_sync("reduce()", fn)
        return self._build("reduce", fn, window_function, name, "Window(Reduce)")

    def aggregate(
        self,
        function: Any,
        window_function: ProcessWindowFunction[Any, Any, Any] | None = None,
        name: str | None = None,
    ) -> DataStream:
        """Add each element to the window's accumulator (an ``AggregateFunction``: create_accumulator,
        add, get_result, merge); emit ``get_result`` (or give it to ``window_function``)."""
        missing = [m for m in _AGGREGATE_METHODS if not callable(getattr(function, m, None))]
        if missing:
            msg = (
                f"aggregate() needs an AggregateFunction (create_accumulator, add, get_result, "
                f"merge), got {type(function).__name__} without {', '.join(missing)}"
            )
            raise JobDefinitionError(msg)
        _require_sync("aggregate()", function)
        return self._build("aggregate", function, window_function, name, "Window(Aggregate)")

    def process(self, function: Any, name: str | None = None) -> DataStream:
        """Evaluate each window with ``function`` over all its elements."""
        return self._build("process", None, function, name, "Window(Process)")

    def _build(
        self,
        kind: str,
        function: Any,
        window_function: Any,
        name: str | None,
        default_name: str,
    ) -> DataStream:
        from runtime.api.window_operator import WindowOperator, WindowSpec

        expected: type = ProcessAllWindowFunction if self._window_all else ProcessWindowFunction
        if window_function is not None:
            if not isinstance(window_function, expected):
                role = "" if kind == "process" else " as its window_function"
                msg = (
                    f"{kind}() needs a {expected.__name__}{role}, got "
                    f"{type(window_function).__name__}"
                )
                raise JobDefinitionError(msg)
            _require_sync("window function", window_function)
            if self._window_all:
                window_function = _AllWindowAdapter(cast(Any, window_function))
        elif kind == "process":
            msg = f"process() needs a {expected.__name__}"
            raise JobDefinitionError(msg)
        spec = WindowSpec(
            assigner=self._assigner,
            trigger=self._trigger,
            allowed_lateness_ms=self._allowed_lateness,
            late_tag=self._late_tag,
            kind=kind,
            function=function,
            window_function=window_function,
        )
        stream = self._stream
        key_selector = stream.key_selector

        def factory(op_name: str, uid: str) -> Any:
            return WindowOperator(op_name, uid, spec, key_selector)

        t = stream.job._add(
            "operator",
            name or default_name,
            [stream.transformation],
            operator_factory=factory,
            key_selector=key_selector,
        )
        if self._window_all:
            t.parallelism = 1
            return SingleSubtaskStream(stream.job, t)
        return DataStream(stream.job, t)


def _all_key(value: Any) -> int:
    """The one key of a non-keyed window stream."""
    return 0


class AllWindowedStream(WindowedStream):
    """A non-keyed stream grouped into windows: one window operator subtask sees every record
    (as in Flink, ``window_all`` runs at parallelism 1)."""

    _window_all = True

    def __init__(self, stream: DataStream, assigner: WindowAssigner) -> None:
        super().__init__(stream.key_by(_all_key), assigner)


class SingleSubtaskStream(DataStream):
    """The result of ``window_all``: its operator runs at parallelism 1 only."""

    def set_parallelism(self, parallelism: int) -> DataStream:
        if parallelism != 1:
            msg = (
                f"operator {self.transformation.name!r}: window_all() runs at parallelism 1 "
                f"(every record meets in one window operator), not {parallelism}; use "
                "key_by(...).window(...) to window in parallel"
            )
            raise JobDefinitionError(msg)
        return self
