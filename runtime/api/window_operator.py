"""The window operator (Flink's ``WindowOperator``): windows, triggers and lateness on keyed state.

Everything a window has lives in the operator's keyed state backend, under the record's key, so
it is checkpointed, rescaled by key group and restored like any keyed state:

- ``window-contents``: per key, ``{window: contents}``; the contents are the reduced value, the
  aggregate's accumulator, or the list of elements (``process``). Windows are tuples,
  ``(start, end)`` for time windows and ``()`` for the global window.
- ``session-windows`` (merging assigners only): per key, the set of its session windows, which
  Flink keeps in its ``MergingWindowSet``. Contents are kept under the merged window itself:
  a merge combines the merged windows' contents (reduce function, ``AggregateFunction.merge``,
  or concatenated element lists).
- ``trigger/<name>`` and ``window/<name>``: per key, ``{window: value}`` of the trigger's state
  and of a ``ProcessWindowFunction``'s ``window_state()``.

Timers are the operator's ``TimerService`` timers with the window as namespace: the trigger's
(``EventTimeTrigger``: at the window's ``max_timestamp``) and the cleanup timer at
``max_timestamp + allowed lateness`` (processing time: ``max_timestamp``), which removes the
window's state. A window is late once its cleanup time is at or before the watermark; a record
whose windows are all late goes to the late-data side output, or is dropped and counted in
``late_records_dropped``.

The common case, event-time tumbling or sliding windows with the default trigger, is kept
window-major in memory instead (:class:`_Panes`): a record costs one lookup in its window's pane,
and windows fire and go by window as the watermark passes them, without a timer per key and
window. Its snapshots have the layout above (contents per key, the trigger's and cleanup
timers), so the two ways restore each other's checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.events import MAX_TIMESTAMP, MIN_TIMESTAMP, Watermark
from actors.operator import UserFunctionError
from actors.timers import timers_snapshot
from runtime.api.functions import Collector, OutputTag, RichFunction, is_async_result
from runtime.api.operators import KeyedInputOperator, _async_result_error
from runtime.api.windows import (
    EventTimeTrigger,
    ProcessWindowFunction,
    Trigger,
    TriggerContext,
    TumblingEventTimeWindows,
    WindowAssigner,
    WindowContext,
    max_timestamp_of,
    window_of,
    window_start,
)
from state.keyed import KeyedStateBackend, MapStateDescriptor
from state.serde import SNAPSHOT_SCALAR_TYPES, StateSerializer, check_state_value
from state.snapshot import OperatorSnapshot

_MISSING: Any = object()


def _window_map_to_data(windows: dict[tuple[int, ...], Any]) -> list[list[Any]]:
    return [[*window, value] for window, value in windows.items()]


def _window_map_from_data(data: list[list[Any]]) -> dict[tuple[int, ...], Any]:
    return {tuple(item[:-1]): item[-1] for item in data}


WINDOW_MAP = StateSerializer(_window_map_to_data, _window_map_from_data)
"""A key's ``{window: value}`` in snapshots as ``[[*window, value], ...]``: lists, which msgpack
encodes natively (tuple keys need an extension type each, several times slower)."""

_CONTENTS = MapStateDescriptor[Any, Any]("window-contents", serializer=WINDOW_MAP)
_SESSIONS = MapStateDescriptor[Any, Any]("session-windows", serializer=WINDOW_MAP)


def _swapped(add: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``AggregateFunction.add(value, acc)`` as ``(acc, value)``, the order of reduce functions."""

    def add_to(accumulator: Any, value: Any) -> Any:
        return add(value, accumulator)

    return add_to


@dataclass(frozen=True)
class WindowSpec:
    """What ``keyed.window(...)...`` describes: built into one operator per subtask."""

    assigner: WindowAssigner
    trigger: Trigger
    allowed_lateness_ms: int
    late_tag: OutputTag | None
    kind: str
    """``reduce``, ``aggregate`` or ``process``."""
    function: Any
    """The reduce function or the AggregateFunction (None for ``process``)."""
    window_function: ProcessWindowFunction[Any, Any, Any] | None


class _Scope:
    """The window that trigger and window-function state and timers refer to right now."""

    __slots__ = ("merged", "window")

    def __init__(self) -> None:
        self.window: tuple[int, ...] = ()
        self.merged: list[tuple[int, ...]] = []


class _WindowScopedState:
    """Keyed state per key *and window*: a map state of the key, keyed by the scope's window.
    Offers the methods of value, list and reducing state, per its descriptor's kind."""

    __slots__ = ("_descriptor", "_map", "_owner", "_scope")

    def __init__(self, map_state: Any, scope: _Scope, descriptor: Any, owner: str) -> None:
        self._map = map_state
        self._scope = scope
        self._descriptor = descriptor
        self._owner = owner

    def _put(self, window: tuple[int, ...], value: Any) -> None:
        # Checked here: the map state's own check is off, it has a serializer (WINDOW_MAP).
        if type(value) not in SNAPSHOT_SCALAR_TYPES:
            check_state_value(value, self._owner, self._descriptor.kind, self._descriptor.name)
        self._map.put(window, value)

    # value state
    def value(self) -> Any:
        return self._map.get(self._scope.window, getattr(self._descriptor, "default", None))

    def update(self, value: Any) -> None:
        if value is None or (self._descriptor.kind == "list" and not value):
            self.clear()
        else:
            self._put(self._scope.window, list(value) if self._descriptor.kind == "list" else value)

    # reducing and list state
    def get(self) -> Any:
        value = self._map.get(self._scope.window)
        if self._descriptor.kind == "list":
            return list(value or ())
        return value

    def add(self, value: Any) -> None:
        window = self._scope.window
        current = self._map.get(window, _MISSING)
        if self._descriptor.kind == "list":
            self._put(window, [value] if current is _MISSING else [*current, value])
        elif self._descriptor.kind == "reducing":
            merged = value if current is _MISSING else self._descriptor.reduce_fn(current, value)
            self._put(window, merged)
        else:
            msg = f"add() is not a method of {self._descriptor.kind} state"
            raise TypeError(msg)

    def clear(self) -> None:
        self._map.remove(self._scope.window)

    def merge_from(self, windows: list[tuple[int, ...]]) -> None:
        """Fold the state of ``windows`` into the scope's window and remove theirs."""
        kind = self._descriptor.kind
        if kind not in ("list", "reducing"):
            msg = f"{kind} state cannot be merged: use reducing or list state in merging windows"
            raise TypeError(msg)
        target = self._scope.window
        for window in windows:
            if window == target:
                continue
            value = self._map.get(window, _MISSING)
            if value is _MISSING:
                continue
            self._map.remove(window)
            current = self._map.get(target, _MISSING)
            if current is _MISSING:
                self._put(target, value)
            elif kind == "list":
                self._put(target, [*current, *value])
            else:
                self._put(target, self._descriptor.reduce_fn(current, value))


class _ScopedStates:
    """``get_state(descriptor)`` for state per key and window, under a name prefix."""

    def __init__(self, operator: WindowOperator, prefix: str) -> None:
        self._operator = operator
        self._prefix = prefix
        self._states: dict[str, _WindowScopedState] = {}

    def get_state(self, descriptor: Any) -> _WindowScopedState:
        state = self._states.get(descriptor.name)
        if state is None:
            if descriptor.kind not in ("value", "list", "reducing"):
                msg = (
                    f"operator {self._operator.context.subtask_label}: per-window state may be "
                    f"value, list or reducing state, not {descriptor.kind} state"
                )
                raise TypeError(msg)
            backend = self._operator.keyed_backend
            assert backend is not None
            map_state = backend.get_state(
                MapStateDescriptor[Any, Any](
                    f"{self._prefix}/{descriptor.name}", serializer=WINDOW_MAP
                )
            )
            state = self._states[descriptor.name] = _WindowScopedState(
                map_state, self._operator._scope, descriptor, backend.owner
            )
        return state


class _TriggerContext(TriggerContext):
    __slots__ = ("_clock", "_scope", "_states", "_timers")

    def __init__(self, operator: WindowOperator) -> None:
        assert operator.timers is not None
        self._timers = operator.timers
        self._clock = operator.context.clock
        self._scope = operator._scope
        self._states = _ScopedStates(operator, "trigger")

    def current_watermark(self) -> int:
        return self._timers.current_watermark

    def current_processing_time(self) -> int:
        return self._clock.now_ms()

    def register_event_time_timer(self, timestamp: int) -> None:
        self._timers.register_event_time_timer(timestamp, self._scope.window)

    def delete_event_time_timer(self, timestamp: int) -> None:
        self._timers.delete_event_time_timer(timestamp, self._scope.window)

    def register_processing_time_timer(self, timestamp: int) -> None:
        self._timers.register_processing_time_timer(timestamp, self._scope.window)

    def delete_processing_time_timer(self, timestamp: int) -> None:
        self._timers.delete_processing_time_timer(timestamp, self._scope.window)

    def get_partitioned_state(self, descriptor: Any) -> Any:
        return self._states.get_state(descriptor)

    def merge_partitioned_state(self, descriptor: Any) -> None:
        self._states.get_state(descriptor).merge_from(self._scope.merged)


class _WindowContext(WindowContext[Any]):
    __slots__ = ("_operator", "_states", "window")

    def __init__(self, operator: WindowOperator) -> None:
        self._operator = operator
        self._states = _ScopedStates(operator, "window")
        self.window: Any = None

    def current_watermark(self) -> int:
        assert self._operator.timers is not None
        return self._operator.timers.current_watermark

    def current_processing_time(self) -> int:
        return self._operator.context.clock.now_ms()

    def window_state(self) -> Any:
        if self._operator.spec.assigner.is_merging:
            msg = (
                f"operator {self._operator.context.subtask_label}: window_state() is not "
                "available with merging (session) windows; use global_state()"
            )
            raise RuntimeError(msg)
        return self._states

    def global_state(self) -> Any:
        return self._operator.runtime_context


class WindowOperator(KeyedInputOperator):
    """Assigns each record of a keyed stream to windows and evaluates them when their trigger
    fires (see the module docstring for where its state lives)."""

    def __init__(
        self, name: str, uid: str, spec: WindowSpec, key_selector: Callable[[Any], Any] | None
    ) -> None:
        super().__init__(name, uid, None, key_selector)
        # Each subtask gets its own copy, so attributes of the functions are per subtask.
        self.spec = copy.deepcopy(spec)
        self._scope = _Scope()
        assigner = self.spec.assigner
        self._event_time = assigner.is_event_time
        self._lateness = self.spec.allowed_lateness_ms if assigner.is_event_time else 0
        self._fast = (
            type(self.spec.trigger) is EventTimeTrigger
            and assigner.is_event_time
            and not assigner.is_merging
        )
        self._tumbling = self._fast and type(assigner) is TumblingEventTimeWindows

    def _rich_functions(self) -> list[Any]:
        return [
            f
            for f in (self.spec.function, self.spec.window_function)
            if isinstance(f, RichFunction)
        ]

    async def open(self) -> None:
        assert self.keyed_backend is not None
        backend = self.keyed_backend
        self._contents = backend.get_state(_CONTENTS)
        self._table: dict[Any, dict[Any, Any]] = self._contents._values
        self._panes = _Panes(self)
        self._key_groups: dict[Any, int] = {}
        if self._fast:
            self._load_panes()
        self._sessions = backend.get_state(_SESSIONS) if self.spec.assigner.is_merging else None
        self._trigger_ctx = _TriggerContext(self)
        self._window_ctx = _WindowContext(self)
        self._out: Collector[Any] = Collector()
        self._late_values: list[Any] = []
        self._late_timestamps: list[int] = []
        await super().open()
        if backend.has_cleanup_rule:
            msg = (
                "state cleanup rules are not supported in windows: a rule would clear a key's "
                "window state behind its windows; clear the state in ProcessWindowFunction.clear() "
                "or give it a TTL (StateTtlConfig)"
            )
            raise self.user_error(ValueError(msg))

    # ------------------------------------------------------------------------------ records

    async def process_keyed_batch(
        self,
        values: list[Any],
        timestamps: list[int] | None,
        keys: list[Any] | None,
        input_index: int = 0,
    ) -> None:
        """Add the buffer to its windows with the records' keys (see :meth:`_buffer_keys`)."""
        if not values:
            return
        if timestamps is None and self._event_time:
            msg = (
                f"operator {self.context.subtask_label}: event-time windows "
                f"({type(self.spec.assigner).__name__}) need record timestamps; call "
                "assign_timestamps_and_watermarks() before key_by(), or use processing-time "
                "windows"
            )
            raise RuntimeError(msg)
        assert self.key_selector is not None
        keys = self._buffer_keys(values, keys, self.key_selector)
        try:
            if self._tumbling:
                assert timestamps is not None
                self._panes.add_tumbling(values, timestamps, keys)
            elif self._fast:
                assert timestamps is not None
                self._panes.add(values, timestamps, keys)
            else:
                self._add_with_trigger(values, timestamps, keys)
        except UserFunctionError:
            raise
        except Exception as exc:
            raise self.user_error(exc, values) from exc
        assert self.keyed_backend is not None
        self.keyed_backend.cleanup_incrementally()  # state with a TTL: a bounded step
        await self._emit_fired()
        await self._emit_late()

    def _load_panes(self) -> None:
        """Move restored window contents into the panes; a restored (key, window) without its
        trigger timer at the window's end already fired (the snapshot's timers say so)."""
        timers = self.timers
        assert timers is not None
        fired_before = {(key, window) for window, key in self._panes.load(self._contents._values)}
        for timestamp, key, window in timers.event_timer_entries():
            if window is not None and timestamp == window[1] - 1:
                fired_before.discard((key, window))
        self._panes.mark_fired(fired_before)
        self._contents._values.clear()
        timers.clear()  # the panes fire and clean up by themselves

    async def snapshot_state(self, checkpoint_id: int) -> OperatorSnapshot | None:
        if not self._fast:
            return await super().snapshot_state(checkpoint_id)
        assert self.timers is not None
        # The snapshot has the layout of the timer-driven path (contents per key, the trigger's
        # and cleanup timers), so either path restores it.
        table, timers = self._panes.to_keyed(self.timers.current_watermark)
        self._contents._values = table
        try:
            snapshot = await super().snapshot_state(checkpoint_id)
        finally:
            self._contents._values = {}
        if snapshot is None:
            return None
        # Key groups of the keys still in windows, kept for the next snapshot.
        known = self._key_groups
        timers_part = timers_snapshot(timers, self.context.max_parallelism, known)
        self._key_groups = {key: known[key] for key in table if key in known}
        return dataclasses.replace(snapshot, timers=timers_part)

    def _verify_first_key(self, key_of: Callable[[Any], Any], value: Any) -> None:
        super()._verify_first_key(key_of, value)
        assert self.keyed_backend is not None
        if not self.keyed_backend.restored_key_types:
            self._panes.clear()  # --allow-non-restored-state dropped the restored state

    def _add_with_trigger(
        self, values: list[Any], timestamps: list[int] | None, keys: list[Any]
    ) -> None:
        """Any assigner and trigger (Flink's ``WindowOperator.processElement``)."""
        backend = self.keyed_backend
        timers = self.timers
        assert backend is not None and timers is not None
        spec = self.spec
        table = self._table
        assign = spec.assigner.assign_windows
        trigger = spec.trigger
        ctx = self._trigger_ctx
        scope = self._scope
        event_time = self._event_time
        lateness = self._lateness
        new_contents, add_to = self._accumulate()
        processing_time = self.context.clock.now_ms()
        merging = spec.assigner.is_merging
        unchecked = True
        for index, (value, key) in enumerate(zip(values, keys, strict=True)):
            timestamp = timestamps[index] if timestamps is not None else processing_time
            backend.current_key = key
            watermark = timers.current_watermark
            skipped = True
            for assigned in assign(timestamp, processing_time):
                window = self._merge_session(key, assigned) if merging else assigned
                if event_time and max_timestamp_of(window) + lateness <= watermark:
                    if merging:
                        self._retire_session(window)
                    continue
                skipped = False
                per_key = table.get(key)
                if per_key is None:
                    per_key = table[key] = {}
                contents = per_key.get(window, _MISSING)
                contents = per_key[window] = (
                    new_contents(value) if contents is _MISSING else add_to(contents, value)
                )
                if unchecked:
                    unchecked = False
                    self._check_contents(contents)
                scope.window = window
                result = trigger.on_element(value, timestamp, window_of(window), ctx)
                if result.fire:
                    self._fire(key, window, contents)
                if result.purge:
                    self._purge(key, window)
                self._register_cleanup_timer(window)
            if skipped and event_time and timestamp + lateness <= watermark:
                self._late_values.append(value)
                self._late_timestamps.append(timestamp)

    def _accumulate(self) -> tuple[Callable[[Any], Any], Callable[[Any, Any], Any]]:
        """The window function's (first contents of a window, add a value to contents)."""
        kind = self.spec.kind
        function = self.spec.function
        if kind == "reduce":
            return (lambda value: value), function
        if kind == "aggregate":
            create, add = function.create_accumulator, function.add
            return (lambda value: add(value, create())), _swapped(add)

        def append(elements: list[Any], value: Any) -> list[Any]:
            elements.append(value)
            return elements

        return (lambda value: [value]), append

    def _merge_contents(self, a: Any, b: Any) -> Any:
        kind = self.spec.kind
        if kind == "reduce":
            return self.spec.function(a, b)
        if kind == "aggregate":
            return self.spec.function.merge(a, b)
        return [*a, *b]

    def _check_contents(self, contents: Any) -> None:
        """Once per buffer: is the window's contents a value a snapshot can hold?"""
        if is_async_result(contents):
            raise _async_result_error(self, f"{self.spec.kind} function", [contents])
        if type(contents) not in SNAPSHOT_SCALAR_TYPES:
            assert self.keyed_backend is not None
            check_state_value(contents, self.keyed_backend.owner, "map", _CONTENTS.name)

    # ------------------------------------------------------------------------------ sessions

    def _merge_session(self, key: Any, new: tuple[int, ...]) -> tuple[int, ...]:
        """Add ``new`` to the key's session windows, merging it with those it intersects
        (Flink's ``MergingWindowSet.addWindow``); the window the record belongs to."""
        assert self._sessions is not None
        sessions: dict[Any, Any] = self._sessions._values.setdefault(key, {})
        start, end = new
        overlapping = sorted(w for w in sessions if start <= w[1] and end >= w[0])
        if not overlapping:
            sessions[new] = True
            return new
        result = (min(start, overlapping[0][0]), max(end, *(w[1] for w in overlapping)))
        if overlapping == [result]:
            return result
        timers = self.timers
        assert timers is not None
        if self._event_time and result[1] - 1 + self._lateness <= timers.current_watermark:
            msg = (
                f"operator {self.context.subtask_label}: merging windows {overlapping} into "
                f"{result} would end a window before the current watermark "
                f"{timers.current_watermark}"
            )
            raise RuntimeError(msg)
        for window in overlapping:
            del sessions[window]
        sessions[result] = True
        per_key = self._table.get(key)
        if per_key is not None:
            merged = _MISSING
            for window in overlapping:
                contents = per_key.pop(window, _MISSING)
                if contents is not _MISSING:
                    merged = (
                        contents if merged is _MISSING else self._merge_contents(merged, contents)
                    )
            if merged is not _MISSING:
                per_key[result] = merged
        scope = self._scope
        ctx = self._trigger_ctx
        trigger = self.spec.trigger
        scope.window, scope.merged = result, overlapping
        trigger.on_merge(window_of(result), ctx)
        scope.merged = []
        for window in overlapping:
            if window == result:
                continue
            scope.window = window
            trigger.clear(window_of(window), ctx)
            self._delete_cleanup_timer(window)
        scope.window = result
        return result

    def _retire_session(self, window: tuple[int, ...]) -> None:
        assert self._sessions is not None and self.keyed_backend is not None
        sessions = self._sessions._values.get(self.keyed_backend.current_key)
        if sessions is not None:
            sessions.pop(window, None)
            if not sessions:
                del self._sessions._values[self.keyed_backend.current_key]

    # ------------------------------------------------------------------------------ time

    def _cleanup_time(self, window: tuple[int, ...]) -> int:
        max_timestamp = max_timestamp_of(window)
        if self._event_time:
            return min(max_timestamp + self._lateness, MAX_TIMESTAMP)
        return max_timestamp

    def _register_cleanup_timer(self, window: tuple[int, ...]) -> None:
        cleanup = self._cleanup_time(window)
        if cleanup == MAX_TIMESTAMP:
            return  # the global window: never cleaned up
        assert self.timers is not None
        if self._event_time:
            self.timers.register_event_time_timer(cleanup, window)
        else:
            self.timers.register_processing_time_timer(cleanup, window)

    def _delete_cleanup_timer(self, window: tuple[int, ...]) -> None:
        cleanup = self._cleanup_time(window)
        assert self.timers is not None
        if self._event_time:
            self.timers.delete_event_time_timer(cleanup, window)
        else:
            self.timers.delete_processing_time_timer(cleanup, window)

    async def process_watermark(self, watermark: Watermark) -> None:
        timers = self.timers
        assert timers is not None
        if self._fast:
            previous = timers.current_watermark
            if watermark.timestamp > previous:
                timers.current_watermark = watermark.timestamp
                try:
                    self._panes.on_watermark(previous, watermark.timestamp)
                except UserFunctionError:
                    raise
                except Exception as exc:
                    raise self.user_error(exc) from exc
                await self._emit_fired()
            await self.output.emit_watermark(watermark)
            return
        # Firing may register timers that are already due (e.g. at MAX_WATERMARK): loop.
        while True:
            due = timers.due_event_timer_entries(watermark.timestamp)
            if not due:
                break
            self._on_timers(due, event_time=True)
            await self._emit_fired()
        await self.output.emit_watermark(watermark)

    async def fire_processing_timers(self, now_ms: int) -> None:
        assert self.timers is not None
        due = self.timers.due_processing_timer_entries(now_ms)
        if due:
            self._on_timers(due, event_time=False)
            await self._emit_fired()

    def _on_timers(self, due: list[tuple[int, Any, Any]], event_time: bool) -> None:
        """Flink's ``WindowOperator.onEventTime``/``onProcessingTime`` for each due timer."""
        backend = self.keyed_backend
        assert backend is not None
        table = self._table
        trigger = self.spec.trigger
        ctx = self._trigger_ctx
        scope = self._scope
        cleans = event_time is self._event_time
        sessions = self._sessions
        try:
            for timestamp, key, window in due:
                backend.current_key = key
                if sessions is not None and window not in sessions._values.get(key, ()):
                    continue  # merged into another window meanwhile
                windows = table.get(key)
                contents = _MISSING if windows is None else windows.get(window, _MISSING)
                scope.window = window
                api_window = window_of(window)
                result = (
                    trigger.on_event_time(timestamp, api_window, ctx)
                    if event_time
                    else trigger.on_processing_time(timestamp, api_window, ctx)
                )
                if result.fire and contents is not _MISSING:
                    self._fire(key, window, contents)
                if result.purge:
                    self._purge(key, window)
                if cleans and timestamp == self._cleanup_time(window):
                    self._clear_all_state(key, window)
        except UserFunctionError:
            raise
        except Exception as exc:
            raise self.user_error(exc) from exc

    # ------------------------------------------------------------------------------ results

    def _fire(self, key: Any, window: tuple[int, ...], contents: Any) -> None:
        """Evaluate the window function on ``contents``; results carry the window's
        max timestamp."""
        spec = self.spec
        out = self._out
        max_timestamp = max_timestamp_of(window)
        kind = spec.kind
        result = spec.function.get_result(contents) if kind == "aggregate" else contents
        window_function = spec.window_function
        if window_function is None:
            out.collect(result, max_timestamp)
            return
        ctx = self._window_ctx
        ctx.window = window_of(window)
        self._scope.window = window
        out._set_default_timestamp(max_timestamp)
        returned = window_function.process(  # type: ignore[func-returns-value]
            key, ctx, list(result) if kind == "process" else [result], out
        )
        if returned is not None and is_async_result(returned):
            raise _async_result_error(self, "process() of the window function", [returned])

    def _purge(self, key: Any, window: tuple[int, ...]) -> None:
        per_key = self._table.get(key)
        if per_key is not None:
            per_key.pop(window, None)
            if not per_key:
                del self._table[key]

    def _clear_all_state(self, key: Any, window: tuple[int, ...]) -> None:
        """The window's cleanup time came: contents, trigger state and window state go."""
        self._purge(key, window)
        self._scope.window = window
        api_window = window_of(window)
        self.spec.trigger.clear(api_window, self._trigger_ctx)
        self._clear_window_function(window)
        if self._sessions is not None:
            self._retire_session(window)

    def _clear_window_function(self, window: tuple[int, ...]) -> None:
        window_function = self.spec.window_function
        if window_function is not None:
            self._scope.window = window
            self._window_ctx.window = window_of(window)
            window_function.clear(self._window_ctx)

    async def _emit_fired(self) -> None:
        values, timestamps = self._out._take()
        if values:
            if is_async_result(values[0]):
                raise _async_result_error(self, "window function", values, verb="collected")
            await self.output.emit(values, timestamps)

    async def _emit_late(self) -> None:
        values = self._late_values
        if not values:
            return
        timestamps = self._late_timestamps
        self._late_values, self._late_timestamps = [], []
        tag = self.spec.late_tag
        if tag is None:
            self.metrics.late_records_dropped += len(values)
        else:
            await self.emit_side(tag.name, values, timestamps)


class _Panes:
    """The contents of event-time windows with the default trigger (``EventTimeTrigger``),
    window-major: ``{window: {key: contents}}``. A window's records mostly arrive together, so
    a record costs one lookup of its key in the current window's pane; and every key of a window
    fires at the same watermark, so the panes fire and clean up by window, without a timer per
    key and window. Firing order is Flink's timers' order: by window end, then by the first
    element's arrival per key.

    ``fired`` holds restored (key, window) pairs that had fired already (within the allowed
    lateness when the snapshot was taken): they fire again only for a new element.
    """

    __slots__ = ("_fired", "_next_due", "_operator", "_panes", "_unchecked")

    def __init__(self, operator: WindowOperator) -> None:
        self._operator = operator
        self._panes: dict[Any, dict[Any, Any]] = {}
        self._fired: dict[Any, set[Any]] = {}
        self._next_due = MAX_TIMESTAMP
        """The lowest watermark at which some window fires or is cleaned up."""
        self._unchecked = True

    def clear(self) -> None:
        self._panes.clear()
        self._fired.clear()
        self._next_due = MAX_TIMESTAMP

    def _due(self, window: tuple[int, ...], watermark: int) -> int:
        """The watermark at which ``window`` next needs the panes: its end while it has not
        fired, then its cleanup time."""
        max_timestamp = window[1] - 1
        return max_timestamp if max_timestamp > watermark else self._operator._cleanup_time(window)

    def _new_pane(self, window: tuple[int, ...], watermark: int) -> dict[Any, Any]:
        pane: dict[Any, Any] = {}
        self._panes[window] = pane
        due = self._due(window, watermark)
        if due < self._next_due:
            self._next_due = due
        return pane

    def _batch(
        self,
    ) -> tuple[
        WindowOperator, KeyedStateBackend, int, Callable[[Any], Any], Callable[[Any, Any], Any]
    ]:
        """What adding a buffer needs: the operator, its backend, the watermark, and the window
        function's first contents and add (the first new contents of the buffer is checked)."""
        operator = self._operator
        backend, timers = operator.keyed_backend, operator.timers
        assert backend is not None and timers is not None
        self._unchecked = True
        return (operator, backend, timers.current_watermark, *operator._accumulate())

    def _first(self, contents: Any) -> Any:
        if self._unchecked:
            self._unchecked = False
            self._operator._check_contents(contents)
        return contents

    def add_tumbling(self, values: list[Any], timestamps: list[int], keys: list[Any]) -> None:
        """Tumbling windows: one per record, computed here (consecutive records mostly share
        it, so its bounds and pane are reused)."""
        operator, backend, watermark, new_contents, add_to = self._batch()
        assigner = operator.spec.assigner
        size: int = getattr(assigner, "size")  # noqa: B009
        offset: int = getattr(assigner, "offset")  # noqa: B009
        lateness = operator._lateness
        # An AggregateFunction's add is called directly: one call per record, not two.
        add = operator.spec.function.add if operator.spec.kind == "aggregate" else None
        late_values = operator._late_values
        late_timestamps = operator._late_timestamps
        panes = self._panes
        fired = self._fired
        missing = _MISSING
        start = window_start(timestamps[0], offset, size) - size  # not the first record's
        end = start + size
        window: tuple[int, int] = (start, end)
        pane: dict[Any, Any] = {}
        fired_before: set[Any] | None = None
        live = on_time = False
        for value, timestamp, key in zip(values, timestamps, keys, strict=True):
            if not start <= timestamp < end:
                start = timestamp - (timestamp - offset) % size
                end = start + size
                window = (start, end)
                live = end - 1 + lateness > watermark
                on_time = end - 1 > watermark
                if live:
                    pane = panes.get(window) or self._new_pane(window, watermark)
                    fired_before = fired.get(window) if fired else None
            if not live:
                if timestamp + lateness <= watermark:
                    late_values.append(value)
                    late_timestamps.append(timestamp)
                continue
            contents = pane.get(key, missing)
            if contents is missing:
                contents = pane[key] = self._first(new_contents(value))
            elif add is not None:
                contents = pane[key] = add(value, contents)
            else:
                contents = pane[key] = add_to(contents, value)
            if on_time:
                if fired_before:
                    fired_before.discard(key)  # a new element: it fires again at the end
                continue
            # Within the allowed lateness: the window fires again with this record.
            backend.current_key = key
            operator._fire(key, window, contents)

    def add(self, values: list[Any], timestamps: list[int], keys: list[Any]) -> None:
        """Sliding (or any other non-merging) windows: the assigner's windows per record."""
        operator, backend, watermark, new_contents, add_to = self._batch()
        assign = operator.spec.assigner.assign_windows
        lateness = operator._lateness
        late_values, late_timestamps = operator._late_values, operator._late_timestamps
        panes, fired, missing = self._panes, self._fired, _MISSING
        for value, timestamp, key in zip(values, timestamps, keys, strict=True):
            late = True
            for window in assign(timestamp, 0):
                max_timestamp = window[1] - 1
                if max_timestamp + lateness <= watermark:
                    continue
                late = False
                pane = panes.get(window) or self._new_pane(window, watermark)
                contents = pane.get(key, missing)
                if contents is missing:
                    contents = pane[key] = self._first(new_contents(value))
                else:
                    contents = pane[key] = add_to(contents, value)
                if max_timestamp > watermark:
                    if fired and window in fired:
                        fired[window].discard(key)
                    continue
                # Within the allowed lateness: the window fires again with this record.
                backend.current_key = key
                operator._fire(key, window, contents)
            if late and timestamp + lateness <= watermark:
                late_values.append(value)
                late_timestamps.append(timestamp)

    def on_watermark(self, previous: int, watermark: int) -> None:
        """Fire the windows whose end the watermark passed, then drop those past their
        cleanup time (end + allowed lateness)."""
        if watermark < self._next_due:
            return
        operator = self._operator
        backend = operator.keyed_backend
        assert backend is not None
        fire = operator._fire
        panes = self._panes
        for window in sorted(panes, key=_window_end):
            pane = panes[window]
            max_timestamp = window[1] - 1
            if previous < max_timestamp <= watermark:
                fired_before = self._fired.pop(window, None)
                for key, contents in pane.items():
                    if fired_before is None or key not in fired_before:
                        backend.current_key = key
                        fire(key, window, contents)
            if self._operator._cleanup_time(window) <= watermark:
                del panes[window]
                self._fired.pop(window, None)
                if operator.spec.window_function is not None:
                    for key in pane:
                        backend.current_key = key
                        operator._clear_window_function(window)
        self._next_due = min(
            (self._due(window, watermark) for window in panes), default=MAX_TIMESTAMP
        )

    def load(self, table: dict[Any, dict[Any, Any]]) -> list[tuple[Any, Any]]:
        """Take restored contents (per key, per window); the (window, key) pairs taken."""
        taken = []
        panes = self._panes
        for key, windows in table.items():
            for window, contents in windows.items():
                pane = panes.get(window)
                if pane is None:
                    pane = self._new_pane(window, MIN_TIMESTAMP)
                pane[key] = contents
                taken.append((window, key))
        return taken

    def mark_fired(self, pairs: set[tuple[Any, Any]]) -> None:
        for key, window in pairs:
            self._fired.setdefault(window, set()).add(key)

    def to_keyed(self, watermark: int) -> tuple[dict[Any, dict[Any, Any]], list[Any]]:
        """The contents per key and window, and the timers the timer-driven path would have
        for them (``timers_snapshot`` entries): a window's cleanup timer, and its trigger timer
        unless it fired already."""
        table: dict[Any, dict[Any, Any]] = {}
        timers: list[tuple[str, int, Any, Any]] = []
        lateness = self._operator._lateness
        for window, pane in self._panes.items():
            max_timestamp = window[1] - 1
            cleanup = self._operator._cleanup_time(window)
            pending = max_timestamp > watermark
            fired_before = self._fired.get(window, ())
            for key, contents in pane.items():
                windows = table.get(key)
                if windows is None:
                    windows = table[key] = {}
                windows[window] = contents
                if lateness:
                    timers.append(("e", cleanup, key, window))
                if pending and key not in fired_before:
                    timers.append(("e", max_timestamp, key, window))
        return table, timers


def _window_end(window: tuple[int, ...]) -> int:
    return window[1]
