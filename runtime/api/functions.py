"""User function classes.

Plain callables work everywhere a function is expected. A *rich* function (a subclass of
:class:`RichFunction`) also gets lifecycle hooks, called on its subtask's actor:

- ``open(ctx)`` once before the first record, with a :class:`RuntimeContext`;
- ``finish()`` only on a graceful end (all input ended, or stop ``--drain``), may emit last results
  where the function has a collector;
- ``close()`` always, also on failure and cancel: release resources here.

Every subtask gets its own deep copy of the function object, so attributes are per subtask.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from actors.operator import RestoreContext

if TYPE_CHECKING:
    from actors.timers import TimerService

IN = TypeVar("IN")
OUT = TypeVar("OUT")
KEY = TypeVar("KEY")
ACC = TypeVar("ACC")


@dataclass(frozen=True)
class OutputTag:
    """Names a side output: an operator emits records to it besides its main output, and
    ``stream.get_side_output(tag)`` on the stream that operator produced reads them (e.g. late
    records of a window). Tags are equal when their names are."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]+", self.name):
            msg = f"OutputTag name {self.name!r} must be letters, digits and _ . : - only"
            raise ValueError(msg)


class RuntimeContext:
    """Where a function runs, its job parameters and (on keyed streams) its keyed state."""

    def __init__(
        self,
        operator_name: str,
        subtask_index: int,
        parallelism: int,
        params: dict[str, str],
        keyed_backend: Any = None,
        operator_state: Any = None,
        checkpoint_interval_s: float | None = None,
        restore: RestoreContext | None = None,
    ) -> None:
        self.operator_name = operator_name
        self.restore = restore or RestoreContext()
        """What this attempt restores from, and the user's restore choices (for sinks)."""
        self.checkpoint_interval_s = checkpoint_interval_s
        """The job's periodic checkpoint interval (None when only final checkpoints are taken)."""
        self.subtask_index = subtask_index
        self.parallelism = parallelism
        self.params = params
        self._keyed = keyed_backend
        self._operator_state = operator_state

    def get_state(self, descriptor: Any) -> Any:
        """Keyed state for ``descriptor`` (value, list, map or reducing). Keyed streams only."""
        if self._keyed is None:
            msg = (
                f"operator {self.operator_name!r}: keyed state is only available after key_by(); "
                "use operator state (get_list_state) on non-keyed streams"
            )
            raise RuntimeError(msg)
        return self._keyed.get_state(descriptor)

    def set_state_cleanup_rule(self, rule: Callable[[Any, Any], bool] | None) -> None:
        """Clear all of a key's state in this operator when ``rule(key, state)`` holds (the
        operator-level, rule-based state cleanup). ``state`` is a read-only
        :class:`~state.keyed.KeyedStateView` of the key's state by state name (``state["count"]``);
        reading it never refreshes a TTL. The rule is checked after each record (and timer) of
        the key, and on idle keys a few at a time in the background. Call it in ``open()``;
        keyed streams only."""
        if self._keyed is None:
            msg = (
                f"operator {self.operator_name!r}: a state cleanup rule needs keyed state, which "
                "is only available after key_by()"
            )
            raise RuntimeError(msg)
        self._keyed.set_cleanup_rule(rule)

    def get_list_state(self, name: str) -> Any:
        """Operator list state, split evenly over subtasks on restore."""
        return self._operator_state.get_list_state(name)

    def get_union_list_state(self, name: str) -> Any:
        return self._operator_state.get_union_list_state(name)

    def get_broadcast_state(self, name: str) -> Any:
        return self._operator_state.get_broadcast_state(name)


class RichFunction:
    def open(self, ctx: RuntimeContext) -> None:
        """Called once before the first record."""

    def finish(self) -> None:
        """Called on a graceful end only."""

    def close(self) -> None:
        """Called always, last."""


class MapFunction(RichFunction, Generic[IN, OUT]):
    def map(self, value: IN) -> OUT:
        raise NotImplementedError

    def __call__(self, value: IN) -> OUT:
        return self.map(value)


class FilterFunction(RichFunction, Generic[IN]):
    def filter(self, value: IN) -> bool:
        raise NotImplementedError

    def __call__(self, value: IN) -> bool:
        return self.filter(value)


class FlatMapFunction(RichFunction, Generic[IN, OUT]):
    def flat_map(self, value: IN) -> Iterable[OUT]:
        raise NotImplementedError

    def __call__(self, value: IN) -> Iterable[OUT]:
        return self.flat_map(value)


class ReduceFunction(RichFunction, Generic[IN]):
    def reduce(self, accumulator: IN, value: IN) -> IN:
        raise NotImplementedError

    def __call__(self, accumulator: IN, value: IN) -> IN:
        return self.reduce(accumulator, value)


class AggregateFunction(RichFunction, Generic[IN, ACC, OUT]):
    """An aggregation with an accumulator (Flink's ``AggregateFunction``): records are added to
    the accumulator one at a time, accumulators of merged windows are merged, and the result is
    read from the accumulator. The accumulator is state: msgpack-encodable (see ``state``)."""

    def create_accumulator(self) -> ACC:
        raise NotImplementedError

    def add(self, value: IN, accumulator: ACC) -> ACC:
        raise NotImplementedError

    def get_result(self, accumulator: ACC) -> OUT:
        raise NotImplementedError

    def merge(self, a: ACC, b: ACC) -> ACC:
        """The accumulator of ``a`` and ``b`` together (session windows that merge)."""
        raise NotImplementedError


class Collector(Generic[OUT]):
    """Where a process function emits records; ``timestamp`` defaults to the input's."""

    __slots__ = ("_default_ts", "timestamps", "values")

    # Invariant: ``timestamps`` is None only while no collected record has a timestamp and the
    # default is none, so that collecting on a stream without event time is one append.

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.timestamps: list[int] | None = None
        self._default_ts = _NO_TS

    def collect(self, value: OUT, timestamp: int | None = None) -> None:
        timestamps = self.timestamps
        if timestamps is None:
            if timestamp is None:
                self.values.append(value)
                return
            timestamps = self.timestamps = [_NO_TS] * len(self.values)
        timestamps.append(timestamp if timestamp is not None else self._default_ts)
        self.values.append(value)

    def _set_default_timestamp(self, timestamp: int | None) -> None:
        """Records collected from now on without a timestamp get ``timestamp`` (None: none)."""
        if timestamp is None:
            self._default_ts = _NO_TS
            return
        if self.timestamps is None:
            self.timestamps = [_NO_TS] * len(self.values)
        self._default_ts = timestamp

    def _take(self) -> tuple[list[Any], list[int] | None]:
        values, timestamps = self.values, self.timestamps
        self.values = []
        # The default timestamp stays (what is collected next, e.g. in end_input, still gets it).
        self.timestamps = None if self._default_ts == _NO_TS else []
        return values, timestamps


_NO_TS = -(1 << 63)


class _SideOutputContext:
    """What every process function's context has: the current timestamp and side outputs."""

    __slots__ = ("_sides", "timestamp")

    def __init__(self) -> None:
        self._sides: dict[str, Collector[Any]] = {}
        self.timestamp: int | None = None
        """The current record's (or firing timer's) event timestamp, if the stream has one."""

    def output(self, tag: OutputTag, value: Any) -> None:
        """Emit ``value`` to the side output ``tag`` (read with ``stream.get_side_output(tag)``
        on the stream this function's operator returns), with the current record's timestamp.
        A tag that no stream reads drops its records (counted in the operator's metrics)."""
        if not isinstance(tag, OutputTag):
            msg = f"output() needs an OutputTag as its first argument, got {type(tag).__name__}"
            raise TypeError(msg)
        side = self._sides.get(tag.name)
        if side is None:
            side = self._sides[tag.name] = Collector()
        side.collect(value, self.timestamp)

    def _take_side_outputs(self) -> list[tuple[str, list[Any], list[int] | None]]:
        """What was emitted to each tag since the last call: (tag name, values, timestamps)."""
        if not self._sides:
            return []
        return [(name, *side._take()) for name, side in self._sides.items() if side.values]


class KeyedProcessContext(_SideOutputContext, Generic[KEY]):
    """Passed to ``process_element`` and ``on_timer``: the current key, timestamp and timers,
    and ``output(tag, value)`` for side outputs."""

    __slots__ = ("_timers",)

    def __init__(self, timers: TimerService) -> None:
        super().__init__()
        self._timers = timers

    @property
    def current_key(self) -> Any:
        """The key of the record being processed (or of the timer firing)."""
        return self._timers.current_key()

    def timer_service(self) -> TimerService:
        return self._timers

    def current_watermark(self) -> int:
        return self._timers.current_watermark

    def current_processing_time(self) -> int:
        return self._timers.current_processing_time()


class NonKeyedTimerService:
    """The time service of a non-keyed process function: current processing time and watermark.
    Timers are keyed (they fire for a key, and are checkpointed with it), so registering one
    raises, as in Flink."""

    __slots__ = ("_clock", "_operator_name", "current_watermark")

    def __init__(self, operator_name: str, clock: Any) -> None:
        self._operator_name = operator_name
        self._clock = clock
        self.current_watermark = -(1 << 63)
        """The operator's current event time: the last watermark it received."""

    def current_processing_time(self) -> int:
        return int(self._clock.now_ms())

    def _refuse(self, what: str) -> None:
        msg = (
            f"operator {self._operator_name!r}: cannot {what} on a non-keyed stream: timers "
            "belong to a key; use key_by(...).process(KeyedProcessFunction) to register timers"
        )
        raise RuntimeError(msg)

    def register_event_time_timer(self, timestamp: int) -> None:
        self._refuse("register an event-time timer")

    def register_processing_time_timer(self, timestamp: int) -> None:
        self._refuse("register a processing-time timer")

    def delete_event_time_timer(self, timestamp: int) -> None:
        self._refuse("delete an event-time timer")

    def delete_processing_time_timer(self, timestamp: int) -> None:
        self._refuse("delete a processing-time timer")


class ProcessContext(_SideOutputContext):
    """Passed to :meth:`ProcessFunction.process_element`: the record's timestamp, the time
    service (processing time and watermark, no timers) and ``output(tag, value)``."""

    __slots__ = ("_time",)

    def __init__(self, time_service: NonKeyedTimerService) -> None:
        super().__init__()
        self._time = time_service

    def timer_service(self) -> NonKeyedTimerService:
        return self._time

    def current_watermark(self) -> int:
        return self._time.current_watermark

    def current_processing_time(self) -> int:
        return self._time.current_processing_time()


class ProcessFunction(RichFunction, Generic[IN, OUT]):
    """Processes each record of a non-keyed stream (``stream.process(fn)``) with a collector,
    side outputs (``ctx.output(tag, value)``) and the current processing time and watermark;
    operator state through the runtime context, no keyed state and no timers (key the stream
    and use a :class:`KeyedProcessFunction` for those)."""

    def process_element(self, value: IN, ctx: ProcessContext, out: Collector[OUT]) -> None:
        raise NotImplementedError


class KeyedProcessFunction(RichFunction, Generic[KEY, IN, OUT]):
    """Processes each record of a keyed stream with keyed state, timers and a collector."""

    def process_element(
        self, value: IN, ctx: KeyedProcessContext[KEY], out: Collector[OUT]
    ) -> None:
        raise NotImplementedError

    def on_timer(self, timestamp: int, ctx: KeyedProcessContext[KEY], out: Collector[OUT]) -> None:
        """A timer registered for ``ctx.current_key`` fired."""


class KeyedCoProcessFunction(RichFunction, Generic[KEY, IN, OUT]):
    """Processes two connected keyed streams that share keyed state and timers (e.g. a join of an
    unbounded stream with a bounded side input). Input 1 and input 2 may end at different times:
    ``end_input(i)`` says which ended."""

    def process_element1(
        self, value: Any, ctx: KeyedProcessContext[KEY], out: Collector[OUT]
    ) -> None:
        raise NotImplementedError

    def process_element2(
        self, value: Any, ctx: KeyedProcessContext[KEY], out: Collector[OUT]
    ) -> None:
        raise NotImplementedError

    def on_timer(self, timestamp: int, ctx: KeyedProcessContext[KEY], out: Collector[OUT]) -> None:
        """A timer registered for ``ctx.current_key`` fired."""

    def end_input(self, input_number: int, out: Collector[OUT]) -> None:
        """Input ``input_number`` (1 or 2) delivered its last record."""


ASYNC_ALTERNATIVE = (
    "async functions run in the async I/O operator: use stream.map_async(fn) or "
    "flat_map_async(fn) (capacity, timeout, ordered, retry), or call synchronous code here"
)
"""What to do instead of an async user function; part of every refusal."""

_PLAIN_CALLED = ("__call__", "notify_checkpoint_complete")
"""What the runtime calls on any function object."""

_RICH_CALLED = (
    "__call__",
    "map",
    "filter",
    "flat_map",
    "reduce",
    "create_accumulator",
    "add",
    "get_result",
    "merge",
    "process_element",
    "process_element1",
    "process_element2",
    "process_broadcast_element",
    "map1",
    "map2",
    "flat_map1",
    "flat_map2",
    "on_timer",
    "end_input",
    "process",
    "clear",
    "open",
    "finish",
    "close",
    "notify_checkpoint_complete",
)
"""What the runtime calls on a rich function (the hooks its base classes declare)."""


def _async_kind(fn: Any) -> str | None:
    if inspect.isasyncgenfunction(fn):
        return "an async generator function"
    if inspect.iscoroutinefunction(fn):
        return "an async function"
    return None


def _where(fn: Any) -> str:
    """``qualname (file:line)`` of the function under methods and partials."""
    while True:
        if inspect.ismethod(fn):
            fn = fn.__func__
        elif isinstance(fn, functools.partial):
            fn = fn.func
        else:
            break
    code = getattr(fn, "__code__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    if code is None:
        return str(name)
    return f"{name} ({Path(code.co_filename).name}:{code.co_firstlineno})"


def find_async_callable(fn: Any) -> str | None:
    """Describe the part of ``fn`` that is ``async def``, or ``None`` if the runtime can call it.

    Covers coroutine and async generator functions (also as bound methods or inside
    ``functools.partial``), objects whose ``__call__`` is async, and function objects (rich
    functions, process functions) with an async hook such as ``process_element`` or ``open``.
    """
    target = fn
    while isinstance(target, functools.partial):
        target = target.func
    kind = _async_kind(target)
    if kind is not None:
        prefix = "functools.partial of " if target is not fn else ""
        return f"{prefix}{_where(target)} is {kind}"
    if inspect.isroutine(target) or inspect.isclass(target):
        return None
    for hook in _RICH_CALLED if isinstance(target, RichFunction) else _PLAIN_CALLED:
        method = getattr(type(target), hook, None)
        if method is None:
            continue
        kind = _async_kind(method)
        if kind is not None:
            return f"{_where(method)} is {kind}"
    return None


def is_async_result(result: Any) -> bool:
    """Whether a user function returned something only an event loop can run (a coroutine, a
    future, an async generator) instead of a value."""
    return inspect.isawaitable(result) or inspect.isasyncgen(result)


def close_async_results(results: Iterable[Any]) -> None:
    """Close the coroutines among ``results``, so that dropping them raises no "never awaited"
    warning."""
    for result in results:
        if inspect.iscoroutine(result):
            result.close()
