"""Built-in operators: map, filter, flat_map, keyed reduce, keyed process, timestamps/watermarks.

Each operator calls its user function over a whole buffer in one comprehension or tight loop.
User exceptions are wrapped in :class:`~actors.operator.UserFunctionError` naming the operator,
subtask and record.

A user function that returns an awaitable (a sync function wrapping an ``async def`` one; async
functions themselves are refused when the job is built) fails the task: the runtime never awaits
results. To cost nothing per record, the check looks at the first result of each buffer (for a
process function: the first record it collects, and every return, which must be ``None`` anyway).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from actors.events import MAX_TIMESTAMP, Watermark, WatermarkStatus
from actors.operator import ChainedOutput, StreamOperator, UserFunctionError
from actors.timers import TimerService
from runtime.api.functions import (
    ASYNC_ALTERNATIVE,
    Collector,
    KeyedProcessContext,
    NonKeyedTimerService,
    ProcessContext,
    RichFunction,
    RuntimeContext,
    _SideOutputContext,
    close_async_results,
    is_async_result,
)
from runtime.api.watermarks import WatermarkEmitter, WatermarkStrategy
from state.keyed import IncompatibleStateError, KeyedStateBackend, ValueStateDescriptor
from state.operator import OperatorStateStore
from state.serde import SNAPSHOT_SCALAR_TYPES, check_state_value
from state.snapshot import OperatorSnapshot, RestoredState

_NO_RECORD: Any = object()


def _async_result_error(
    operator: StreamOperator,
    role: str,
    results: Iterable[Any],
    record: Any = _NO_RECORD,
    verb: str = "returned",
) -> UserFunctionError:
    """The task failure for a user function that returned (or collected: ``verb``) an awaitable;
    closes the coroutines among ``results`` (the first of which is the offending one)."""
    results = list(results)
    returned = type(results[0]).__name__
    close_async_results(results)
    on = "" if record is _NO_RECORD else f" for record {_short(record)}"
    msg = (
        f"the {role} {verb} a {returned}{on} instead of a value; the runtime does not await "
        f"what user functions return: {ASYNC_ALTERNATIVE}"
    )
    return operator.user_error(TypeError(msg))


def _at(values: list[Any], value: Any, result: Any) -> tuple[int, Any]:
    """Where ``result``, computed from ``value`` of ``values`` by a one-to-one operator, is in
    that operator's output buffer: (index, result)."""
    index = next(i for i, v in enumerate(values) if v is value)
    return index, result


def _method_role(method: Callable[..., Any]) -> str:
    return f"{getattr(method, '__name__', 'method')}() of the process function"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UserFunctionOperator(StreamOperator):
    """An operator around one user function, with its rich-function hooks and state."""

    keyed = False

    def __init__(
        self,
        name: str,
        uid: str,
        function: Any,
        key_selector: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(name, uid)
        # Each subtask gets its own copy, so attributes of a rich function are per subtask.
        self.function: Any = (
            copy.deepcopy(function) if isinstance(function, RichFunction) else function
        )
        self.key_selector = key_selector
        self.keyed_backend: KeyedStateBackend | None = None
        self.operator_state: OperatorStateStore
        self.timers: TimerService | None = None
        self.runtime_context: RuntimeContext

    async def initialize_state(self, restored: RestoredState | None) -> None:
        ctx = self.context
        self.operator_state = OperatorStateStore(ctx.subtask_label)
        if self.keyed:
            self.keyed_backend = KeyedStateBackend(
                f"operator {ctx.operator_name!r} (uid {ctx.operator_uid}, subtask "
                f"{ctx.subtask_index + 1}/{ctx.parallelism})",
                ctx.key_groups,
                ctx.max_parallelism,
                ctx.restore.allow_non_restored_state,
                ctx.clock.now_ms,
            )
            backend = self.keyed_backend
            self.timers = TimerService(lambda: backend.current_key, ctx.clock, ctx.scheduler)
        if restored is not None:
            if restored.operator is not None:
                self.operator_state.restore(restored.operator)
            if self.keyed_backend is not None and restored.keyed:
                self.keyed_backend.restore(list(restored.keyed))
            if self.timers is not None and restored.timers:
                key_groups = ctx.key_groups
                self.timers.restore(list(restored.timers), lambda kg: kg in key_groups)
        self._check_first_key = bool(
            self.keyed_backend is not None and self.keyed_backend.restored_key_types
        )
        self.runtime_context = RuntimeContext(
            ctx.operator_name,
            ctx.subtask_index,
            ctx.parallelism,
            ctx.params,
            self.keyed_backend,
            self.operator_state,
            ctx.checkpoint_interval_s,
            ctx.restore,
        )

    def _buffer_keys(
        self, values: list[Any], keys: list[Any] | None, key_of: Callable[[Any], Any]
    ) -> list[Any]:
        """The records' keys: ``keys`` when the partitioner carried them (computed with
        ``key_of``), else computed here (an error names the record); the run's first key is
        checked against the restored state first."""
        if self._check_first_key and values:
            self._verify_first_key(key_of, values[0])
        if keys is not None:
            return keys
        try:
            return [key_of(value) for value in values]
        except Exception as exc:
            raise self.user_error(exc, values) from exc

    def _verify_first_key(self, key_of: Callable[[Any], Any], value: Any) -> None:
        """Once per subtask, at the first keyed record: does its key's type match the restored
        state's (a changed key selector would orphan all of it)? Drops timers with the state."""
        self._check_first_key = False
        assert self.keyed_backend is not None
        try:
            key = key_of(value)
        except Exception as exc:
            raise self.user_error(exc, [value]) from exc
        if self.keyed_backend.check_first_key(key) and self.timers is not None:
            self.timers.clear()

    async def open(self) -> None:
        for function in self._rich_functions():
            try:
                result = function.open(self.runtime_context)
            except IncompatibleStateError:
                raise
            except Exception as exc:
                raise self.user_error(exc) from exc
            self._check_hook_result("open()", result)

    async def finish(self) -> None:
        for function in self._rich_functions():
            try:
                result = function.finish()
            except Exception as exc:
                raise self.user_error(exc) from exc
            self._check_hook_result("finish()", result)

    async def close(self) -> None:
        for function in self._rich_functions():
            self._check_hook_result("close()", function.close())

    def _rich_functions(self) -> list[Any]:
        """The operator's rich functions, typed loosely: their hooks are declared ``-> None``
        but user code may still return an awaitable from them, which is checked."""
        return [self.function] if isinstance(self.function, RichFunction) else []

    def _check_hook_result(self, hook: str, result: Any) -> None:
        if result is not None and is_async_result(result):
            raise _async_result_error(self, f"{hook} hook of the function", [result])

    async def snapshot_state(self, checkpoint_id: int) -> OperatorSnapshot | None:
        snapshot = OperatorSnapshot(
            keyed=self.keyed_backend.snapshot() if self.keyed_backend is not None else None,
            operator=self.operator_state.snapshot() or None,
            timers=(
                self.timers.snapshot(self.context.max_parallelism)
                if self.timers is not None
                else None
            ),
        )
        return snapshot if snapshot.parts() else None

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        hook = getattr(self.function, "notify_checkpoint_complete", None)
        if hook is not None:
            self._check_hook_result("notify_checkpoint_complete()", hook(checkpoint_id))


class MapOperator(UserFunctionOperator):
    """``map(fn)``. Chained into a filter in the same task, the two run as one loop over the
    buffer, so that the records the filter drops are freed at once; each keeps its metrics, its
    errors (naming the operator and the record) and its check for awaitables."""

    _fused_filter: FilterOperator | None = None

    async def open(self) -> None:
        await super().open()
        output = self.output
        if type(output) is ChainedOutput and type(output.next_operator) is FilterOperator:
            self._fused_filter = output.next_operator

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        fused = self._fused_filter
        if fused is not None and values:
            await self._map_and_filter(values, timestamps, fused)
            return
        await self._map_values(self.function, "map function", values, timestamps)

    async def _map_and_filter(
        self, values: list[Any], timestamps: list[int] | None, after: FilterOperator
    ) -> None:
        """``process_batch`` of this map and then of the filter ``after``, in one loop."""
        fn, keep = self.function, after.function
        # The first record alone, so that an awaitable is caught before the filter gets it.
        value = values[0]
        try:
            mapped = fn(value)
        except Exception as exc:
            raise self.user_error(exc, values) from exc
        if is_async_result(mapped):
            raise _async_result_error(self, "map function", [mapped], value)
        try:
            kept = keep(mapped)
        except Exception as exc:
            raise after.user_error(exc, failed_at=(0, mapped)) from exc
        if is_async_result(kept):
            raise _async_result_error(after, "filter function", [kept], mapped)
        out = [mapped] if kept else []
        append = out.append
        out_ts: list[int] | None = None
        # One try around the loop (per-call ones cost more): ``mapped`` is reset before each
        # map call, so an exception with ``mapped`` still reset came from the map function.
        pending = mapped = _NO_RECORD
        try:
            if timestamps is None:
                for value in values[1:]:
                    mapped = pending
                    mapped = fn(value)
                    if keep(mapped):
                        append(mapped)
            else:
                out_ts = [timestamps[0]] if kept else []
                append_ts = out_ts.append
                for value, ts in zip(values[1:], timestamps[1:], strict=True):
                    mapped = pending
                    mapped = fn(value)
                    if keep(mapped):
                        append(mapped)
                        append_ts(ts)
        except Exception as exc:
            if mapped is pending:
                raise self.user_error(exc, values) from exc
            raise after.user_error(exc, failed_at=_at(values, value, mapped)) from exc
        n = len(values)
        self.metrics.records_out += n
        after.metrics.records_in += n
        await after.output.emit(out, out_ts)

    async def _map_values(
        self, fn: Callable[[Any], Any], role: str, values: list[Any], timestamps: list[int] | None
    ) -> None:
        try:
            out = [fn(value) for value in values]
        except Exception as exc:
            raise self.user_error(exc, values) from exc
        if out and is_async_result(out[0]):
            raise _async_result_error(self, role, out, values[0])
        await self.output.emit(out, timestamps)


class FilterOperator(UserFunctionOperator):
    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        fn = self.function
        if not values:
            return
        try:
            # The first record alone, so that an awaitable is caught before it counts as true.
            value = values[0]
            first = fn(value)
            if is_async_result(first):
                raise _async_result_error(self, "filter function", [first], value)
            if timestamps is None:
                out = [value] if first else []
                out += [value for value in values[1:] if fn(value)]
                await self.output.emit(out, None)
                return
            keep = [first]
            keep += [fn(value) for value in values[1:]]
        except UserFunctionError:
            raise
        except Exception as exc:
            raise self.user_error(exc, values) from exc
        await self.output.emit(
            [v for v, k in zip(values, keep, strict=True) if k],
            [t for t, k in zip(timestamps, keep, strict=True) if k],
        )


class FlatMapOperator(UserFunctionOperator):
    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        await self._flat_map_values(self.function, "flat_map function", values, timestamps)

    async def _flat_map_values(
        self,
        fn: Callable[[Any], Iterable[Any]],
        role: str,
        values: list[Any],
        timestamps: list[int] | None,
    ) -> None:
        if not values:
            return
        try:
            # The first record alone, so that an awaitable is caught before it is iterated.
            value = values[0]
            first = fn(value)
            if is_async_result(first):
                raise _async_result_error(self, role, [first], value)
            out = list(first)
            if out and is_async_result(out[0]):
                raise _async_result_error(self, role, out, value)
            if timestamps is None:
                out += [result for value in values[1:] for result in fn(value)]
                await self.output.emit(out, None)
                return
            out_ts: list[int] = [timestamps[0]] * len(out)
            for value, ts in zip(values[1:], timestamps[1:], strict=True):
                results = list(fn(value))
                out.extend(results)
                out_ts.extend([ts] * len(results))
        except UserFunctionError:
            raise
        except Exception as exc:
            raise self.user_error(exc, values) from exc
        await self.output.emit(out, out_ts)


class MapBatchesOperator(UserFunctionOperator):
    """``map_batches(fn)``: one call of ``fn`` per buffer, with a list of the buffer's records;
    it returns a list of as many results, in order, each keeping its input's timestamp."""

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        out = self._call_batch_function("map_batches function", values)
        if len(out) != len(values):
            msg = (
                f"the map_batches function returned {len(out)} records for a batch of "
                f"{len(values)}: it must return one result per record, in order (each keeps "
                "its record's timestamp); use flat_map_batches for any other number"
            )
            raise self.user_error(ValueError(msg))
        await self.output.emit(out, timestamps)

    def _call_batch_function(self, role: str, values: list[Any]) -> list[Any]:
        """``fn`` called with a copy of the buffer's records (a buffer may be shared, a user's
        function may change its argument), checked to return a list of values."""
        try:
            out = self.function(list(values))
        except Exception as exc:
            raise self.user_error(exc) from exc
        if is_async_result(out):
            raise _async_result_error(self, role, [out])
        if type(out) is not list:
            msg = f"the {role} returned a {type(out).__name__}; it must return a list"
            raise self.user_error(TypeError(msg))
        if out and is_async_result(out[0]):
            raise _async_result_error(self, role, out, verb="returned a list holding")
        return out


class FlatMapBatchesOperator(MapBatchesOperator):
    """``flat_map_batches(fn)``: one call of ``fn`` per buffer; it returns a list of any number
    of results, which all get the buffer's latest timestamp (none without event time)."""

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        out = self._call_batch_function("flat_map_batches function", values)
        if timestamps is None or not out:
            await self.output.emit(out, None)
            return
        await self.output.emit(out, [max(timestamps)] * len(out))


class KeyedInputOperator(UserFunctionOperator):
    """A keyed operator of one input that takes the keys the partitioner carried; a buffer
    without them (``process_batch``) comes to :meth:`process_keyed_batch` with ``keys`` None."""

    keyed = True

    def carried_key_selector(self, input_index: int) -> Callable[[Any], Any] | None:
        return self.key_selector

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        await self.process_keyed_batch(values, timestamps, None, input_index)

    async def process_keyed_batch(
        self,
        values: list[Any],
        timestamps: list[int] | None,
        keys: list[Any] | None,
        input_index: int = 0,
    ) -> None:
        raise NotImplementedError


class _RunningValueOperator(KeyedInputOperator):
    """A keyed operator with one running value per key in the value state ``_STATE``, whose
    dict it uses directly: one lookup and one store per record."""

    _STATE: ValueStateDescriptor[Any]

    async def open(self) -> None:
        await super().open()
        assert self.keyed_backend is not None
        self._backend = self.keyed_backend
        self._table = self.keyed_backend.get_state(self._STATE)._values

    async def process_keyed_batch(
        self,
        values: list[Any],
        timestamps: list[int] | None,
        keys: list[Any] | None,
        input_index: int = 0,
    ) -> None:
        """Run the buffer with the records' keys (see :meth:`_buffer_keys`)."""
        assert self.key_selector is not None
        keys = self._buffer_keys(values, keys, self.key_selector)
        await self._run_buffer(values, timestamps, keys)

    async def _run_buffer(self, values: list[Any], ts: list[int] | None, keys: list[Any]) -> None:
        """Update the state (``self._table``) with the buffer's records and emit the results."""
        raise NotImplementedError


class KeyedReduceOperator(_RunningValueOperator):
    """Keeps the running reduction per key and emits it after every record (like Flink)."""

    _STATE = ValueStateDescriptor[Any]("reduce")

    async def _run_buffer(self, values: list[Any], ts: list[int] | None, keys: list[Any]) -> None:
        fn = self.function
        table, backend = self._table, self._backend
        missing = _MISSING
        out: list[Any] = []
        append = out.append
        scalars = SNAPSHOT_SCALAR_TYPES
        # Checked without a cost per record: the first value of each new key, and the first
        # result of the reduce function in each buffer (is it a value, can a snapshot hold it).
        unchecked = True
        check_rule = backend.has_cleanup_rule
        try:
            for value, key in zip(values, keys, strict=True):
                current = table.get(key, missing)
                if current is not missing:
                    value = fn(current, value)
                    if unchecked:
                        unchecked = False
                        self._check_result(value)
                elif type(value) not in scalars:
                    self._check_result(value)
                table[key] = value
                append(value)
                if check_rule:
                    backend.check_cleanup_rule(key)
            backend.cleanup_incrementally()
        except UserFunctionError:
            raise
        except Exception as exc:
            raise self.user_error(exc, values) from exc
        await self.output.emit(out, ts)

    def _check_result(self, value: Any) -> None:
        if is_async_result(value):
            raise _async_result_error(self, "reduce function", [value])
        assert self.keyed_backend is not None
        check_state_value(value, self.keyed_backend.owner, "value", self._STATE.name)


_MISSING: Any = object()


class KeyedAggregateOperator(_RunningValueOperator):
    """Runs an ``AggregateFunction`` as a rolling aggregation: one accumulator per key (keyed
    value state ``accumulator``), ``get_result`` emitted after every record (like Flink's
    ``KeyedStream.aggregate`` outside windows)."""

    _STATE = ValueStateDescriptor[Any]("accumulator")

    async def _run_buffer(self, values: list[Any], ts: list[int] | None, keys: list[Any]) -> None:
        fn = self.function
        table, backend = self._table, self._backend
        create, add, get_result = fn.create_accumulator, fn.add, fn.get_result
        missing = _MISSING
        out: list[Any] = []
        append = out.append
        check_rule = backend.has_cleanup_rule
        # Checked once per buffer, without a cost per record: the first accumulator (is it a
        # value, can a snapshot hold it) and the first result (is it a value).
        unchecked = True
        try:
            for value, key in zip(values, keys, strict=True):
                accumulator = table.get(key, missing)
                if accumulator is missing:
                    accumulator = create()
                accumulator = add(value, accumulator)
                result = get_result(accumulator)
                if unchecked:
                    unchecked = False
                    self._check(accumulator, result, value)
                table[key] = accumulator
                append(result)
                if check_rule:
                    backend.check_cleanup_rule(key)
            backend.cleanup_incrementally()
        except UserFunctionError:
            raise
        except Exception as exc:
            raise self.user_error(exc, values) from exc
        await self.output.emit(out, ts)

    def _check(self, accumulator: Any, result: Any, record: Any) -> None:
        for role, produced in (("add()", accumulator), ("get_result()", result)):
            if is_async_result(produced):
                raise _async_result_error(
                    self, f"{role} of the aggregate function", [produced], record
                )
        assert self.keyed_backend is not None
        check_state_value(accumulator, self.keyed_backend.owner, "value", self._STATE.name)


class _ProcessFunctionOperator(UserFunctionOperator):
    """What the operators of process functions share: the collector and the context's side
    outputs, emitted once per buffer (or per batch of timers)."""

    _ctx: _SideOutputContext
    _out: Collector[Any]

    async def _emit_collected(
        self, method: Callable[..., Any], ctx: _SideOutputContext | None = None
    ) -> None:
        """Emit what ``method`` collected and emitted to side outputs through ``ctx`` (default:
        the operator's context); like the other operators, the first record of each buffer is
        checked for an awaitable (an ``async def`` function called without await)."""
        emitted, emitted_ts = self._out._take()
        if emitted and is_async_result(emitted[0]):
            raise _async_result_error(self, _method_role(method), emitted, verb="collected")
        await self.output.emit(emitted, emitted_ts)
        for tag, values, timestamps in (ctx or self._ctx)._take_side_outputs():
            if is_async_result(values[0]):
                raise _async_result_error(
                    self, _method_role(method), values, verb=f"emitted to side output {tag!r}"
                )
            await self.emit_side(tag, values, timestamps)

    async def _process_unkeyed(
        self,
        values: list[Any],
        timestamps: list[int] | None,
        process: Callable[[Any, Any, Any], Any],
        ctx: _SideOutputContext,
    ) -> None:
        """Call ``process(value, ctx, out)`` per record, with no key, and emit what it produced."""
        out = self._out
        try:
            if timestamps is None:
                ctx.timestamp = None
                out._set_default_timestamp(None)
                for value in values:
                    result = process(value, ctx, out)
                    if result is not None and is_async_result(result):
                        raise self._returned_awaitable(process, result, value)
            elif values:
                out._set_default_timestamp(timestamps[0])
                for value, ts in zip(values, timestamps, strict=True):
                    ctx.timestamp = ts
                    out._default_ts = ts
                    result = process(value, ctx, out)
                    if result is not None and is_async_result(result):
                        raise self._returned_awaitable(process, result, value)
        except UserFunctionError:
            raise
        except Exception as exc:
            raise self.user_error(exc, values) from exc
        await self._emit_collected(process, ctx)

    def _returned_awaitable(
        self, method: Callable[..., Any], result: Any, record: Any = None
    ) -> UserFunctionError:
        role = _method_role(method)
        if record is None:
            return _async_result_error(self, role, [result])
        return _async_result_error(self, role, [result], record)


class ProcessOperator(_ProcessFunctionOperator):
    """Runs a ``ProcessFunction`` on a non-keyed stream: a collector, side outputs, the current
    processing time and watermark; no keyed state, no timers."""

    async def open(self) -> None:
        self._time = NonKeyedTimerService(self.context.operator_name, self.context.clock)
        self._ctx = ProcessContext(self._time)
        self._out = Collector()
        await super().open()

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        await self._process_unkeyed(values, timestamps, self.function.process_element, self._ctx)

    async def process_watermark(self, watermark: Watermark) -> None:
        time_service = self._time
        time_service.current_watermark = max(time_service.current_watermark, watermark.timestamp)
        await self.output.emit_watermark(watermark)


class KeyedProcessOperator(_ProcessFunctionOperator):
    """Runs a ``KeyedProcessFunction``: keyed state, event/processing-time timers, a collector."""

    keyed = True
    _ctx: KeyedProcessContext[Any]

    async def open(self) -> None:
        assert self.timers is not None
        self._ctx = KeyedProcessContext(self.timers)
        self._out = Collector()
        await super().open()

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        assert self.key_selector is not None
        await self._process_elements(
            values, timestamps, self.key_selector, self.function.process_element
        )

    def carried_key_selector(self, input_index: int) -> Callable[[Any], Any] | None:
        # Input 0 is the keyed one (input 1 of a keyed broadcast operator is the broadcast side).
        return self.key_selector if input_index == 0 else None

    async def process_keyed_batch(
        self, values: list[Any], timestamps: list[int] | None, keys: list[Any], input_index: int
    ) -> None:
        assert self.key_selector is not None
        await self._process_elements(
            values, timestamps, self.key_selector, self.function.process_element, keys
        )

    async def _process_elements(
        self,
        values: list[Any],
        timestamps: list[int] | None,
        key_of: Callable[[Any], Any],
        process: Callable[[Any, Any, Any], Any],
        keys: list[Any] | None = None,
    ) -> None:
        """Call ``process`` per record with its key set on the state backend and the context;
        ``keys``: the records' keys when the partitioner computed them with ``key_of``."""
        assert self.keyed_backend is not None
        backend = self.keyed_backend
        ctx = self._ctx
        out = self._out
        keys = self._buffer_keys(values, keys, key_of)
        check_rule = backend.has_cleanup_rule
        try:
            if timestamps is None:
                ctx.timestamp = None
                out._set_default_timestamp(None)
                for value, key in zip(values, keys, strict=True):
                    backend.current_key = key
                    result = process(value, ctx, out)
                    if result is not None and is_async_result(result):
                        raise self._returned_awaitable(process, result, value)
                    if check_rule:
                        backend.check_cleanup_rule(key)
            elif values:
                out._set_default_timestamp(timestamps[0])
                for value, key, ts in zip(values, keys, timestamps, strict=True):
                    backend.current_key = key
                    ctx.timestamp = ts
                    out._default_ts = ts
                    result = process(value, ctx, out)
                    if result is not None and is_async_result(result):
                        raise self._returned_awaitable(process, result, value)
                    if check_rule:
                        backend.check_cleanup_rule(key)
            backend.cleanup_incrementally()
        except UserFunctionError:
            raise
        except Exception as exc:
            raise self.user_error(exc, values) from exc
        await self._emit_collected(process)

    async def _fire(self, due: list[tuple[int, Any]], event_time: bool) -> None:
        if not due:
            return
        assert self.keyed_backend is not None
        backend = self.keyed_backend
        ctx = self._ctx
        out = self._out
        on_timer = self.function.on_timer
        check_rule = backend.has_cleanup_rule
        try:
            for timestamp, key in due:
                backend.current_key = key
                ctx.timestamp = timestamp if event_time else None
                out._set_default_timestamp(ctx.timestamp)
                result = on_timer(timestamp, ctx, out)
                if result is not None and is_async_result(result):
                    raise self._returned_awaitable(on_timer, result)
                if check_rule:
                    backend.check_cleanup_rule(key)
        except UserFunctionError:
            raise
        except Exception as exc:
            raise self.user_error(exc) from exc
        await self._emit_collected(on_timer)

    async def process_watermark(self, watermark: Watermark) -> None:
        assert self.timers is not None
        # Timers may register new timers that are already due (e.g. at MAX_WATERMARK): loop.
        while True:
            due = self.timers.due_event_timers(watermark.timestamp)
            if not due:
                break
            await self._fire(due, event_time=True)
        await self.output.emit_watermark(watermark)

    async def fire_processing_timers(self, now_ms: int) -> None:
        assert self.timers is not None
        await self._fire(self.timers.due_processing_timers(now_ms), event_time=False)


class KeyedCoProcessOperator(KeyedProcessOperator):
    """Runs a ``KeyedCoProcessFunction`` on two keyed inputs sharing state and timers."""

    def __init__(
        self,
        name: str,
        uid: str,
        function: Any,
        key_selector: Callable[[Any], Any] | None = None,
        second_key_selector: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(name, uid, function, key_selector)
        self._selectors = (key_selector, second_key_selector)

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        fn = self.function
        key_of = self._selectors[input_index]
        assert key_of is not None
        process = fn.process_element1 if input_index == 0 else fn.process_element2
        await self._process_elements(values, timestamps, key_of, process)

    def carried_key_selector(self, input_index: int) -> Callable[[Any], Any] | None:
        return self._selectors[input_index]

    async def process_keyed_batch(
        self, values: list[Any], timestamps: list[int] | None, keys: list[Any], input_index: int
    ) -> None:
        fn = self.function
        key_of = self._selectors[input_index]
        assert key_of is not None
        process = fn.process_element1 if input_index == 0 else fn.process_element2
        await self._process_elements(values, timestamps, key_of, process, keys)

    async def end_input(self, input_index: int) -> None:
        end_input = self.function.end_input
        try:
            result = end_input(input_index + 1, self._out)
        except Exception as exc:
            raise self.user_error(exc) from exc
        if result is not None and is_async_result(result):
            raise self._returned_awaitable(end_input, result)
        await self._emit_collected(end_input)


class TimestampsAndWatermarksOperator(StreamOperator):
    """Assigns event timestamps and emits watermarks by a :class:`WatermarkStrategy`: after each
    buffer and every ``auto_watermark_interval_ms`` (so that idleness is noticed without records).

    Upstream watermarks are replaced by its own, except the end of input. An upstream that is
    idle sends no records, so the operator is idle too until it is active again (Flink ignores
    the upstream status here; forwarding it keeps a source subtask without splits from stalling
    event time behind an assigner).
    """

    def __init__(self, name: str, uid: str, strategy: WatermarkStrategy) -> None:
        super().__init__(name, uid)
        self.strategy = strategy
        self._emitter: WatermarkEmitter

    async def open(self) -> None:
        self._emitter = WatermarkEmitter(self, self.strategy)
        self._emitter.add_stream(None)
        self._emitter.start_periodic()

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        if not values:
            return
        await self._emitter.emit_records(None, values, timestamps, self.output)

    async def process_watermark(self, watermark: Watermark) -> None:
        if watermark.timestamp == MAX_TIMESTAMP:
            self._emitter.ended = True
            await self.output.emit_watermark(watermark)

    async def process_watermark_status(self, status: WatermarkStatus) -> None:
        self._emitter.mark_all(status.idle)
        await self._emitter.flush(self.output)
