"""Joins of two streams on event time, with Flink's semantics.

**Interval join** (``left.key_by(k).interval_join(right.key_by(k)).between(lower, upper)``):
a left record at ``l`` and a right record of the same key at ``r`` are joined when
``l + lower <= r <= l + upper`` (bounds made exclusive with ``lower_bound_exclusive()`` /
``upper_bound_exclusive()``; ``lower`` may be negative). Each side is buffered in the operator's
keyed state, a map state ``{timestamp: [records]}`` per key (``left-buffer`` and
``right-buffer``), so it is checkpointed, rescaled and restored like any keyed state. A record
registers a cleanup timer (namespace ``left`` or ``right``) at the time after which no record
of the other side can join it any more; when the watermark reaches it, that timestamp's records
leave the buffer. A record behind the watermark when it arrives is late, as in Flink: it goes to
the late-data side output of its side if one is set, else it is dropped and counted in the
operator's ``late_records_dropped``. Results carry the larger of the two timestamps.

**Window join** (``a.join(b).where(k1).equal_to(k2).window(assigner).apply(fn)``) and
**window co-group** (``a.co_group(b)...apply(fn)``) are built as Flink builds them: both inputs
are tagged (``(0, record)``, ``(1, record)``), united, keyed by their key and windowed; the window
function splits a window's elements by tag and joins them pairwise (or hands both lists to the
co-group function). Everything the window operator does (tumbling, sliding and session windows,
triggers, allowed lateness, checkpoints) therefore applies as is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from actors.events import Watermark
from actors.operator import UserFunctionError
from actors.timers import TimerService
from runtime.api.durations import duration_ms
from runtime.api.functions import (
    Collector,
    OutputTag,
    RichFunction,
    _SideOutputContext,
    is_async_result,
)
from runtime.api.operators import _ProcessFunctionOperator
from runtime.api.windows import ProcessWindowFunction, WindowContext
from state.keyed import MapStateDescriptor
from state.serde import SNAPSHOT_SCALAR_TYPES, check_state_value

if TYPE_CHECKING:
    from runtime.api.streams import DataStream, KeyedStream
    from runtime.api.windows import Trigger, WindowAssigner, WindowedStream

IN1 = TypeVar("IN1")
IN2 = TypeVar("IN2")
OUT = TypeVar("OUT")

LEFT_BUFFER = MapStateDescriptor[int, list[Any]]("left-buffer")
RIGHT_BUFFER = MapStateDescriptor[int, list[Any]]("right-buffer")
_CLEANUP_NAMESPACES = ("left", "right")


# ------------------------------------------------------------------------------ interval join


class IntervalJoinContext(_SideOutputContext):
    """Passed to ``ProcessJoinFunction.process_element``: the two records' timestamps, the
    result's (``timestamp``, the larger of both), the current key and watermark, and
    ``output(tag, value)`` for side outputs."""

    __slots__ = ("_timers", "current_key", "left_timestamp", "right_timestamp")

    def __init__(self, timers: TimerService) -> None:
        super().__init__()
        self._timers = timers
        self.current_key: Any = None
        self.left_timestamp = 0
        self.right_timestamp = 0

    def current_watermark(self) -> int:
        return self._timers.current_watermark


class ProcessJoinFunction(RichFunction, Generic[IN1, IN2, OUT]):
    """Called once per joined pair of an interval join (Flink's ``ProcessJoinFunction``)."""

    def process_element(
        self, left: IN1, right: IN2, ctx: IntervalJoinContext, out: Collector[OUT]
    ) -> None:
        raise NotImplementedError


def _signed_duration_ms(value: int | str, what: str) -> int:
    """A join bound: int milliseconds or a duration string, either of which may be negative."""
    if isinstance(value, str) and value.strip().startswith("-"):
        return -duration_ms(value.strip()[1:], what)
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        return -duration_ms(-value, what)
    return duration_ms(value, what)


class IntervalJoinOperator(_ProcessFunctionOperator):
    """Flink's ``IntervalJoinOperator`` on the keyed two-input path: input 0 is the left side,
    input 1 the right. ``lower`` and ``upper`` are inclusive (exclusive bounds were moved by one
    millisecond when the join was described)."""

    keyed = True
    _ctx: IntervalJoinContext

    def __init__(
        self,
        name: str,
        uid: str,
        function: ProcessJoinFunction[Any, Any, Any],
        left_key: Callable[[Any], Any],
        right_key: Callable[[Any], Any],
        lower: int,
        upper: int,
        late_tags: tuple[OutputTag | None, OutputTag | None] = (None, None),
    ) -> None:
        super().__init__(name, uid, function, left_key)
        self._selectors = (left_key, right_key)
        self.lower = lower
        self.upper = upper
        self._late_tags = late_tags

    async def open(self) -> None:
        assert self.timers is not None and self.keyed_backend is not None
        self._ctx = IntervalJoinContext(self.timers)
        self._out = Collector()
        backend = self.keyed_backend
        self._buffers = (backend.get_state(LEFT_BUFFER), backend.get_state(RIGHT_BUFFER))
        await super().open()

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        if not values:
            return
        if timestamps is None:
            side = _CLEANUP_NAMESPACES[input_index]
            msg = (
                f"operator {self.context.subtask_label}: the interval join needs event "
                f"timestamps on its {side} input; call assign_timestamps_and_watermarks() on "
                "that stream before key_by()"
            )
            raise RuntimeError(msg)
        key_of = self._selectors[input_index]
        if self._check_first_key:
            self._verify_first_key(key_of, values[0])
        assert self.keyed_backend is not None and self.timers is not None
        backend, timers = self.keyed_backend, self.timers
        ctx, out = self._ctx, self._out
        own, other = self._buffers[input_index], self._buffers[1 - input_index]
        is_left = input_index == 0
        # The other side's timestamps that join a record at ``ts``: ts + low .. ts + high.
        low, high = (self.lower, self.upper) if is_left else (-self.upper, -self.lower)
        # After ts + high no record of the other side can join this one (it would be late).
        cleanup_delay = high if high > 0 else 0
        namespace = _CLEANUP_NAMESPACES[input_index]
        watermark = timers.current_watermark
        join = self.function.process_element
        owner = backend.owner
        scalars = SNAPSHOT_SCALAR_TYPES
        late_values: list[Any] = []
        late_timestamps: list[int] = []
        try:
            for value, ts in zip(values, timestamps, strict=True):
                if ts < watermark:
                    late_values.append(value)
                    late_timestamps.append(ts)
                    continue
                key = key_of(value)
                backend.current_key = key
                ctx.current_key = key
                bucket = own.get(ts)
                if bucket is None:
                    own.put(ts, [value])
                else:
                    if type(value) not in scalars:
                        check_state_value(value, owner, "map", own._descriptor.name)
                    bucket.append(value)
                for other_ts, others in other.items():
                    if other_ts < ts + low or other_ts > ts + high:
                        continue
                    result_ts = ts if ts > other_ts else other_ts
                    ctx.timestamp = result_ts
                    out._set_default_timestamp(result_ts)
                    if is_left:
                        ctx.left_timestamp, ctx.right_timestamp = ts, other_ts
                        for other_value in others:
                            returned = join(value, other_value, ctx, out)
                            if returned is not None:
                                self._check_returned(returned, value)
                    else:
                        ctx.left_timestamp, ctx.right_timestamp = other_ts, ts
                        for other_value in others:
                            returned = join(other_value, value, ctx, out)
                            if returned is not None:
                                self._check_returned(returned, value)
                timers.register_event_time_timer(ts + cleanup_delay, namespace)
            backend.cleanup_incrementally()
        except UserFunctionError:
            raise
        except Exception as exc:
            raise self.user_error(exc, values) from exc
        await self._emit_collected(join)
        if late_values:
            tag = self._late_tags[input_index]
            if tag is None:
                self.metrics.late_records_dropped += len(late_values)
            else:
                await self.emit_side(tag.name, late_values, late_timestamps)

    def _check_returned(self, returned: Any, record: Any) -> None:
        if is_async_result(returned):
            raise self._returned_awaitable(self.function.process_element, returned, record)

    async def process_watermark(self, watermark: Watermark) -> None:
        assert self.timers is not None and self.keyed_backend is not None
        backend = self.keyed_backend
        left, right = self._buffers
        lower, upper = self.lower, self.upper
        for timestamp, key, namespace in self.timers.due_event_timer_entries(watermark.timestamp):
            backend.current_key = key
            # The buffered timestamp whose cleanup timer this is (the inverse of the delay).
            if namespace == "left":
                left.remove(timestamp - upper if upper > 0 else timestamp)
            else:
                right.remove(timestamp + lower if lower < 0 else timestamp)
        await self.output.emit_watermark(watermark)


class IntervalJoin:
    """``left.interval_join(right)``: give the bounds with :meth:`between`."""

    def __init__(self, left: KeyedStream, right: KeyedStream) -> None:
        self._left = left
        self._right = right

    def between(self, lower: int | str, upper: int | str) -> IntervalJoined:
        """Join a left record at ``l`` with the right records at ``l + lower`` through
        ``l + upper`` (both inclusive; int ms or durations like ``"-2s"``, ``"500ms"``)."""
        from runtime.api.streams import JobDefinitionError

        try:
            low = _signed_duration_ms(lower, "interval join lower bound")
            high = _signed_duration_ms(upper, "interval join upper bound")
        except ValueError as exc:
            raise JobDefinitionError(str(exc)) from None
        if low > high:
            msg = (
                f"interval join: the lower bound ({lower!r}) must not be above the upper bound "
                f"({upper!r})"
            )
            raise JobDefinitionError(msg)
        return IntervalJoined(self._left, self._right, low, high)


class IntervalJoined:
    """An interval join with its bounds; finish it with :meth:`process`."""

    def __init__(self, left: KeyedStream, right: KeyedStream, lower: int, upper: int) -> None:
        self._left = left
        self._right = right
        self._lower = lower
        self._upper = upper
        self._lower_exclusive = False
        self._upper_exclusive = False
        self._late_tags: list[OutputTag | None] = [None, None]

    def lower_bound_exclusive(self) -> IntervalJoined:
        """Leave out right records exactly at ``l + lower``."""
        self._lower_exclusive = True
        return self

    def upper_bound_exclusive(self) -> IntervalJoined:
        """Leave out right records exactly at ``l + upper``."""
        self._upper_exclusive = True
        return self

    def side_output_left_late_data(self, tag: OutputTag) -> IntervalJoined:
        """Send left records that arrive behind the watermark to the side output ``tag``
        instead of dropping them."""
        return self._late_tag(0, tag)

    def side_output_right_late_data(self, tag: OutputTag) -> IntervalJoined:
        """Send right records that arrive behind the watermark to the side output ``tag``."""
        return self._late_tag(1, tag)

    def _late_tag(self, side: int, tag: OutputTag) -> IntervalJoined:
        from runtime.api.streams import JobDefinitionError

        if not isinstance(tag, OutputTag):
            msg = f"the late-data side output of an interval join needs an OutputTag, got {tag!r}"
            raise JobDefinitionError(msg)
        self._late_tags[side] = tag
        return self

    def process(
        self, fn: ProcessJoinFunction[Any, Any, Any], name: str | None = None
    ) -> DataStream:
        """Call ``fn.process_element(left, right, ctx, out)`` for every joined pair."""
        from runtime.api.streams import (
            JobDefinitionError,
            _function_name,
            _require_sync,
            keyed_two_input,
        )

        if not isinstance(fn, ProcessJoinFunction):
            msg = f"interval join process() needs a ProcessJoinFunction, got {type(fn).__name__}"
            raise JobDefinitionError(msg)
        _require_sync("interval join process()", fn)
        left, right = self._left, self._right
        lower = self._lower + (1 if self._lower_exclusive else 0)
        upper = self._upper - (1 if self._upper_exclusive else 0)
        keys = (left.key_selector, right.key_selector)
        late_tags = (self._late_tags[0], self._late_tags[1])
        fn_name = _function_name(fn)
        label = name or (f"IntervalJoin({fn_name})" if fn_name else "IntervalJoin")

        def factory(op_name: str, uid: str) -> Any:
            return IntervalJoinOperator(op_name, uid, fn, keys[0], keys[1], lower, upper, late_tags)

        return keyed_two_input(left, right, label, factory)


# ------------------------------------------------------------------------------ window join


class JoinFunction(Generic[IN1, IN2, OUT]):
    """Joins one pair of a window join: ``join(first, second)`` returns the result (a plain
    function of two arguments does the same)."""

    def join(self, first: IN1, second: IN2) -> OUT:
        raise NotImplementedError


class CoGroupFunction(Generic[IN1, IN2, OUT]):
    """Gets all of a key's records of one window from both inputs (either list may be empty)
    and collects any number of results: ``co_group(firsts, seconds, out)``."""

    def co_group(self, first: list[IN1], second: list[IN2], out: Collector[OUT]) -> None:
        raise NotImplementedError


class _Tag:
    """Tags a record with the input it came from, for the union of a window join."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, value: Any) -> tuple[int, Any]:
        return (self.side, value)


class _TaggedKey:
    """The key of a tagged record: its own input's key selector (a class, not a closure, so that
    the job graph's fingerprint does not depend on where it was defined)."""

    def __init__(self, first: Callable[[Any], Any], second: Callable[[Any], Any]) -> None:
        self._selectors = (first, second)

    def __call__(self, tagged: Any) -> Any:
        return self._selectors[tagged[0]](tagged[1])


class _CoGroupWindowFunction(ProcessWindowFunction[Any, Any, Any]):
    """Splits a window's tagged elements by input and hands both lists to ``co_group``."""

    def __init__(self, co_group: Callable[[list[Any], list[Any], Collector[Any]], Any]) -> None:
        self._co_group = co_group

    def process(
        self, key: Any, context: WindowContext[Any], elements: Iterable[Any], out: Collector[Any]
    ) -> None:
        firsts: list[Any] = []
        seconds: list[Any] = []
        for side, value in elements:
            (firsts if side == 0 else seconds).append(value)
        self._co_group(firsts, seconds, out)


class _PairwiseJoin:
    """A join function as a co-group: every pair of the window's two lists, in arrival order."""

    def __init__(self, join: Callable[[Any, Any], Any]) -> None:
        self._join = join

    def __call__(self, firsts: list[Any], seconds: list[Any], out: Collector[Any]) -> None:
        join = self._join
        for first in firsts:
            for second in seconds:
                out.collect(join(first, second))


class CoGroupedStreams:
    """``a.join(b)`` or ``a.co_group(b)``: name each input's key with :meth:`where` and
    :meth:`equal_to`, then the windows with ``window(assigner)``."""

    def __init__(self, first: DataStream, second: DataStream, kind: str) -> None:
        from runtime.api.streams import JobDefinitionError

        if first.job is not second.job:
            msg = f"{kind}() of streams from different jobs"
            raise JobDefinitionError(msg)
        self._first = first
        self._second = second
        self._kind = kind

    def where(self, key_selector: Callable[[Any], Any]) -> _Where:
        """The key of the first input's records."""
        from runtime.api.streams import _require_sync

        _require_sync(f"{self._kind}().where()", key_selector)
        return _Where(self, key_selector)


class _Where:
    def __init__(self, streams: CoGroupedStreams, first_key: Callable[[Any], Any]) -> None:
        self._streams = streams
        self._first_key = first_key

    def equal_to(self, key_selector: Callable[[Any], Any]) -> _EqualTo:
        """The key of the second input's records: records with equal keys meet."""
        from runtime.api.streams import _require_sync

        _require_sync(f"{self._streams._kind}().equal_to()", key_selector)
        return _EqualTo(self._streams, self._first_key, key_selector)


class _EqualTo:
    def __init__(
        self,
        streams: CoGroupedStreams,
        first_key: Callable[[Any], Any],
        second_key: Callable[[Any], Any],
    ) -> None:
        self._streams = streams
        self._keys = (first_key, second_key)

    def window(self, assigner: WindowAssigner) -> WindowedJoin:
        """Join the records of each key that fall into the same window of ``assigner``."""
        return WindowedJoin(self._streams, self._keys, assigner)


class WindowedJoin:
    """A window join or co-group with its keys and windows; finish it with :meth:`apply`."""

    def __init__(
        self,
        streams: CoGroupedStreams,
        keys: tuple[Callable[[Any], Any], Callable[[Any], Any]],
        assigner: WindowAssigner,
    ) -> None:
        self._streams = streams
        self._keys = keys
        self._assigner = assigner
        self._trigger: Trigger | None = None
        self._allowed_lateness: int | str = 0

    def trigger(self, trigger: Trigger) -> WindowedJoin:
        """Replace the assigner's default trigger."""
        self._trigger = trigger
        return self

    def allowed_lateness(self, lateness: int | str) -> WindowedJoin:
        """Keep windows this long after their end; a late record fires the window again."""
        self._allowed_lateness = lateness
        return self

    def _windowed(self) -> WindowedStream:
        """The tagged union of both inputs, keyed and windowed (only made by ``apply``, so that
        a join never applied leaves nothing in the job)."""
        from runtime.api.windows import WindowedStream

        streams = self._streams
        label = streams._kind.title().replace("_", "")
        first = streams._first.map(_Tag(0), name=f"{label}: tag first input")
        second = streams._second.map(_Tag(1), name=f"{label}: tag second input")
        keyed = first.union(second).key_by(_TaggedKey(*self._keys))
        windowed = WindowedStream(keyed, self._assigner).allowed_lateness(self._allowed_lateness)
        return windowed if self._trigger is None else windowed.trigger(self._trigger)

    def apply(self, fn: Any, name: str | None = None) -> DataStream:
        """Evaluate each window and key. A join takes a :class:`JoinFunction` or a function of
        ``(first, second)`` returning one result per pair; a co-group takes a
        :class:`CoGroupFunction` or a function of ``(firsts, seconds, out)``. Results carry the
        window's max timestamp."""
        from runtime.api.streams import JobDefinitionError, _function_name, _require_sync

        kind = self._streams._kind
        target: Any
        if kind == "join":
            target = fn.join if isinstance(fn, JoinFunction) else fn
            expected = "a JoinFunction or a function of (first, second)"
        else:
            target = fn.co_group if isinstance(fn, CoGroupFunction) else fn
            expected = "a CoGroupFunction or a function of (firsts, seconds, out)"
        if not callable(target):
            msg = f"{kind}().apply() needs {expected}, got {type(fn).__name__}"
            raise JobDefinitionError(msg)
        _require_sync(f"{kind}().apply()", target)
        co_group: Callable[[list[Any], list[Any], Collector[Any]], Any] = (
            _PairwiseJoin(target) if kind == "join" else target
        )
        fn_name = _function_name(fn)
        kind_label = kind.title().replace("_", "")
        label = name or (f"Window{kind_label}({fn_name})" if fn_name else f"Window{kind_label}")
        return self._windowed().process(_CoGroupWindowFunction(co_group), name=label)
