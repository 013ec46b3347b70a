"""Async I/O (Flink's ``AsyncDataStream``): user functions that await a service per record.

``stream.map_async(fn)`` and ``flat_map_async(fn)`` run :class:`AsyncWaitOperator`: each record
starts a request (an asyncio task running ``fn(value)``), at most ``capacity`` of them at once per
subtask. When the operator is full, its ``process_batch`` waits (the task takes no more input, so
backpressure reaches the sources through the credits) for a request to come back.

The actor rule holds: requests run on the event loop, but their outcome comes back to the task as
a callback (``StreamTask.run_on_task``), and only there does the operator emit, fail or call the
timeout hook.

- ``ordered=True``: results leave in input order. ``ordered=False``: as they complete, but never
  across a watermark: the records between two watermarks form a segment, and a watermark leaves
  only once every request before it has (Flink's unordered queue).
- Checkpoints do not wait for requests (but a barrier, like a record, waits while the operator is
  full, as in Flink with aligned checkpoints): the inputs of the requests still pending (and the results
  that completed but wait for their turn) go into operator list state; a restore re-issues them.
  On a keyed stream they go into keyed list state under each request's key, so a rescaled job
  re-issues each request in the subtask of its key.
- A request longer than ``timeout`` calls the function's ``timeout(value)`` hook (default: the task
  fails naming the operator, subtask and record); an exception fails the task (the restart strategy
  takes over) unless the :class:`AsyncRetryStrategy` retries it.
- The end of input with drain (FLIP-147) waits in ``finish()`` for every request; a stop without
  drain leaves them pending for the savepoint.
- Keyed streams: the function may read and write keyed state before and after its awaits; every
  step of a request's coroutine runs with the request's key as the current key (not the steps of
  tasks it starts itself, e.g. with ``asyncio.gather``: those must not touch keyed state). A
  request re-issued after a restore runs from its start again, so what it wrote before its first
  await was in the checkpoint and is written once more: keep such writes idempotent.
"""

from __future__ import annotations

import asyncio
import collections.abc
import inspect
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from actors.events import Watermark
from actors.operator import UserFunctionError
from actors.timers import Cancellable
from runtime.api.functions import RichFunction
from runtime.api.operators import UserFunctionOperator
from state.keyed import ListStateDescriptor
from state.snapshot import OperatorSnapshot

IN = TypeVar("IN")
OUT = TypeVar("OUT")

IN_FLIGHT_STATE = "async-in-flight"
"""The state holding the requests pending at a checkpoint (operator list state; keyed list state
on a keyed stream)."""


class AsyncFunction(RichFunction, Generic[IN, OUT]):
    """A rich function for ``map_async``/``flat_map_async``: ``open``/``close`` as every rich
    function, ``async def invoke(value)`` per record, and ``timeout(value)`` for a request that
    took longer than the operator's timeout: what it returns is emitted instead (for
    ``flat_map_async`` an iterable); by default the task fails."""

    async def invoke(self, value: IN) -> OUT:
        raise NotImplementedError

    def timeout(self, value: IN) -> OUT:
        raise AsyncTimeoutError


class AsyncTimeoutError(TimeoutError):
    """A request of an async operator took longer than its timeout, and no hook handled it."""


@dataclass(frozen=True)
class AsyncRetryStrategy:
    """When and how often a failed request is tried again, as Flink's ``AsyncRetryStrategies``.

    A request is retried while it made fewer than ``max_attempts`` attempts and its exception
    satisfies ``retry_on_exception`` (any ``Exception`` by default) or its result satisfies
    ``retry_on_result`` (none by default); the last result is emitted even if it still satisfies
    it, the last exception fails the task. The wait before attempt *n+1* is
    ``delay * multiplier**(n-1)``, at most ``max_delay``. The operator's timeout covers all
    attempts. Durations are int milliseconds or strings such as ``"100ms"``.
    """

    max_attempts: int
    delay: int | str = 0
    multiplier: float = 1.0
    max_delay: int | str | None = None
    retry_on_exception: Callable[[BaseException], bool] | None = None
    retry_on_result: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        from runtime.api.durations import duration_ms
        from runtime.api.streams import JobDefinitionError

        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            msg = f"AsyncRetryStrategy: max_attempts must be an int, got {self.max_attempts!r}"
            raise JobDefinitionError(msg)
        if self.max_attempts < 1:
            msg = f"AsyncRetryStrategy: max_attempts must be >= 1, got {self.max_attempts}"
            raise JobDefinitionError(msg)
        if self.multiplier < 1.0:
            msg = f"AsyncRetryStrategy: multiplier must be >= 1, got {self.multiplier}"
            raise JobDefinitionError(msg)
        duration_ms(self.delay, "AsyncRetryStrategy delay")
        if self.max_delay is not None:
            duration_ms(self.max_delay, "AsyncRetryStrategy max_delay")

    @classmethod
    def fixed_delay(
        cls,
        max_attempts: int,
        delay: int | str,
        *,
        retry_on_exception: Callable[[BaseException], bool] | None = None,
        retry_on_result: Callable[[Any], bool] | None = None,
    ) -> AsyncRetryStrategy:
        """Up to ``max_attempts`` attempts, ``delay`` apart."""
        return cls(max_attempts, delay, 1.0, None, retry_on_exception, retry_on_result)

    @classmethod
    def exponential_backoff(
        cls,
        max_attempts: int,
        initial_delay: int | str,
        max_delay: int | str,
        multiplier: float = 2.0,
        *,
        retry_on_exception: Callable[[BaseException], bool] | None = None,
        retry_on_result: Callable[[Any], bool] | None = None,
    ) -> AsyncRetryStrategy:
        """Up to ``max_attempts`` attempts, waiting ``initial_delay``, then ``multiplier`` times
        longer each time, at most ``max_delay``."""
        return cls(
            max_attempts, initial_delay, multiplier, max_delay, retry_on_exception, retry_on_result
        )

    def delay_ms(self, attempts_made: int) -> int:
        """The wait after ``attempts_made`` failed attempts (1 for the first retry)."""
        from runtime.api.durations import duration_ms

        wait = duration_ms(self.delay, "delay") * self.multiplier ** (attempts_made - 1)
        if self.max_delay is not None:
            wait = min(wait, duration_ms(self.max_delay, "max_delay"))
        return round(wait)

    def should_retry_exception(self, exc: BaseException, attempts_made: int) -> bool:
        if attempts_made >= self.max_attempts:
            return False
        test = self.retry_on_exception
        return isinstance(exc, Exception) if test is None else bool(test(exc))

    def should_retry_result(self, result: Any, attempts_made: int) -> bool:
        test = self.retry_on_result
        return attempts_made < self.max_attempts and test is not None and bool(test(result))


def describe_async_function(fn: Any) -> str | None:
    """Why ``fn`` cannot be the function of ``map_async``, or None when it can."""
    if isinstance(fn, AsyncFunction):
        cls = type(fn)
        if not inspect.iscoroutinefunction(cls.invoke):
            return f"{cls.__name__}.invoke must be an async def method"
        for hook in ("open", "finish", "close", "timeout"):
            if inspect.iscoroutinefunction(getattr(cls, hook)):
                return (
                    f"{cls.__name__}.{hook} is an async function; only invoke() is awaited, "
                    f"{hook}() runs on the task and must be a plain def"
                )
        return None
    if inspect.iscoroutinefunction(fn):
        return None
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's, not the instance's
    if not inspect.isroutine(fn) and call is not None and inspect.iscoroutinefunction(call):
        return None
    return (
        f"{getattr(fn, '__qualname__', type(fn).__name__)} is not an async def function or an "
        "AsyncFunction; use map()/flat_map() for synchronous code"
    )


_PENDING: Any = object()


class _Request:
    """One record's request, from its start until its results left the operator."""

    __slots__ = ("attempts", "key", "outcome", "runner", "segment", "timer", "timestamp", "value")

    def __init__(self, value: Any, timestamp: int | None, key: Any) -> None:
        self.value = value
        self.timestamp = timestamp
        self.key = key
        self.outcome: Any = _PENDING
        """The list of results once the request completed (on the task)."""
        self.attempts = 0
        self.runner: asyncio.Task[None] | None = None
        self.timer: Cancellable | None = None
        self.segment: _Segment | None = None


class _Segment:
    """Unordered mode: the requests between two watermarks, and the watermark that ends them."""

    __slots__ = ("requests", "watermark")

    def __init__(self) -> None:
        self.requests: dict[int, _Request] = {}
        self.watermark: Watermark | None = None


class _KeyedSteps(collections.abc.Coroutine[Any, Any, Any]):
    """A coroutine that runs every step of ``inner`` with ``key`` as the backend's current key
    (keyed state read or written after an await is the request's key's, while other requests of
    other keys interleave), and puts the task's key back in between."""

    __slots__ = ("_backend", "_inner", "_key")

    def __init__(self, inner: Any, backend: Any, key: Any) -> None:
        self._inner = inner
        self._backend = backend
        self._key = key

    def send(self, value: Any) -> Any:
        backend = self._backend
        previous, backend.current_key = backend.current_key, self._key
        try:
            return self._inner.send(value)
        finally:
            backend.current_key = previous

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        backend = self._backend
        previous, backend.current_key = backend.current_key, self._key
        try:
            if val is None and tb is None:
                return self._inner.throw(typ)
            return self._inner.throw(val if val is not None else typ)
        finally:
            backend.current_key = previous

    def close(self) -> None:
        self._inner.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def __iter__(self) -> Any:
        return self


class _Batch:
    """Results on their way out, cut where records with and without timestamps meet."""

    __slots__ = ("stamps", "values")

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.stamps: list[int] | None = None

    async def add(self, output: Any, results: list[Any], timestamp: int | None) -> None:
        if self.values and (timestamp is None) != (self.stamps is None):
            await self.flush(output)
        if not self.values:
            self.stamps = [] if timestamp is not None else None
        self.values.extend(results)
        if self.stamps is not None:
            assert timestamp is not None
            self.stamps.extend([timestamp] * len(results))

    async def flush(self, output: Any) -> None:
        if self.values:
            values, stamps = self.values, self.stamps
            self.values, self.stamps = [], None
            await output.emit(values, stamps)


class AsyncWaitOperator(UserFunctionOperator):
    """Runs an async user function per record with at most ``capacity`` requests pending (see
    the module docstring). ``flat``: each request returns an iterable of results."""

    def __init__(
        self,
        name: str,
        uid: str,
        function: Any,
        key_selector: Callable[[Any], Any] | None,
        *,
        capacity: int,
        timeout_ms: int,
        ordered: bool,
        retry: AsyncRetryStrategy | None,
        flat: bool,
    ) -> None:
        super().__init__(name, uid, function, key_selector)
        self.keyed = key_selector is not None
        self.capacity = capacity
        self.timeout_ms = timeout_ms
        self.ordered = ordered
        self.retry = retry
        self.flat = flat
        self._ordered_queue: deque[_Request | Watermark] = deque()
        """Ordered mode: pending requests and the watermarks between them, in input order."""
        self._segments: deque[_Segment] = deque([_Segment()])
        """Unordered mode: the last segment is open (no watermark yet)."""
        self._pending = 0
        """Requests started whose results have not left yet (what ``capacity`` bounds)."""
        self._task: Any = None
        self._invoke: Callable[[Any], Awaitable[Any]]
        self._timeout_hook: Callable[[Any], Any] | None = None

    async def open(self) -> None:
        await super().open()
        ctx = self.context
        task = ctx.scheduler
        if task is None or not hasattr(task, "run_on_task"):
            msg = f"operator {ctx.subtask_label}: async I/O needs to run in a stream task"
            raise RuntimeError(msg)
        self._task = task
        function = self.function
        if isinstance(function, AsyncFunction):
            self._invoke = function.invoke
            if type(function).timeout is not AsyncFunction.timeout:
                self._timeout_hook = function.timeout
        else:
            self._invoke = function
        self._reissue_restored()

    def _in_flight_state(self) -> Any:
        """Where a checkpoint keeps the pending requests: operator list state, or on a keyed
        stream keyed list state of each request's key (restored by the key's subtask, at any
        parallelism), filled for the snapshot only."""
        if self.keyed_backend is not None:
            return self.keyed_backend.get_state(ListStateDescriptor(IN_FLIGHT_STATE))
        return self.operator_state.get_list_state(IN_FLIGHT_STATE)

    def _take_restored_entries(self) -> list[dict[str, Any]]:
        state = self._in_flight_state()
        backend = self.keyed_backend
        if backend is None:
            entries: list[dict[str, Any]] = state.get()
            state.clear()
            return entries
        entries = []
        for key in list(backend.keys(IN_FLIGHT_STATE)):
            backend.current_key = key
            entries.extend(state.get())
            state.clear()
        entries.sort(key=lambda entry: entry["seq"])  # their order at the checkpoint
        return entries

    def _reissue_restored(self) -> None:
        """Re-issue the requests a restored checkpoint held; completed ones wait for their turn
        again without a new call."""
        completed = False
        for entry in self._take_restored_entries():
            value = entry["value"]
            key = self._key_of(value) if self.keyed else None
            request = self._enqueue(value, entry["timestamp"], key)
            if "results" in entry:
                request.outcome = list(entry["results"])
                completed = True
            else:
                self._start(request)
        if completed:
            self._task.run_on_task(self._emit_ready, self)

    def _key_of(self, value: Any) -> Any:
        assert self.key_selector is not None
        try:
            return self.key_selector(value)
        except Exception as exc:
            raise self.user_error(exc, [value]) from exc

    # ---------------------------------------------------------------- input

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        if self._check_first_key and values:
            assert self.key_selector is not None
            self._verify_first_key(self.key_selector, values[0])
        task = self._task
        for index, value in enumerate(values):
            while self._pending >= self.capacity:
                await task.yield_to_callbacks(self)
            key = self._key_of(value) if self.keyed else None
            timestamp = timestamps[index] if timestamps is not None else None
            self._start(self._enqueue(value, timestamp, key))

    async def process_watermark(self, watermark: Watermark) -> None:
        """Forwarded once every request before it has emitted (both modes)."""
        if self.ordered:
            queue = self._ordered_queue
            if not queue:
                await self.output.emit_watermark(watermark)
            elif type(queue[-1]) is Watermark:
                queue[-1] = watermark  # no request between them: the later one says it all
            else:
                queue.append(watermark)
            return
        segments = self._segments
        tail = segments[-1]
        if tail.requests:
            tail.watermark = watermark
            segments.append(_Segment())
        elif len(segments) > 1:
            segments[-2].watermark = watermark
        else:
            await self.output.emit_watermark(watermark)

    def _enqueue(self, value: Any, timestamp: int | None, key: Any) -> _Request:
        request = _Request(value, timestamp, key)
        self._pending += 1
        if self.ordered:
            self._ordered_queue.append(request)
        else:
            segment = self._segments[-1]
            segment.requests[id(request)] = request
            request.segment = segment
        return request

    def _start(self, request: _Request) -> None:
        request.runner = asyncio.get_running_loop().create_task(self._run(request))
        if self.timeout_ms > 0:
            clock = self.context.clock
            request.timer = clock.call_at(
                clock.now_ms() + self.timeout_ms,
                lambda: self._post(self._timed_out, request),
            )

    # ---------------------------------------------------------------- requests (on the loop)

    async def _run(self, request: _Request) -> None:
        """The request's attempts, off the task; the outcome goes back to it as a callback."""
        retry = self.retry
        backend = self.keyed_backend
        while True:
            request.attempts += 1
            try:
                call: Any = self._invoke(request.value)
                if backend is not None:
                    call = _KeyedSteps(call, backend, request.key)
                result = await call
            except Exception as exc:
                if retry is not None and retry.should_retry_exception(exc, request.attempts):
                    await self._sleep_ms(retry.delay_ms(request.attempts))
                    continue
                self._post(self._failed, request, exc)
                return
            if retry is not None and retry.should_retry_result(result, request.attempts):
                await self._sleep_ms(retry.delay_ms(request.attempts))
                continue
            self._post(self._completed, request, result)
            return

    async def _sleep_ms(self, ms: int) -> None:
        """Wait on the task's clock (a test's manual clock moves retries too)."""
        if ms <= 0:
            await asyncio.sleep(0)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        clock = self.context.clock

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        handle = clock.call_at(clock.now_ms() + ms, wake)
        try:
            await woken
        finally:
            handle.cancel()

    def _post(self, callback: Callable[..., Awaitable[None]], *args: Any) -> None:
        async def run() -> None:
            await callback(*args)

        self._task.run_on_task(run, self)

    # ---------------------------------------------------------------- outcomes (on the task)

    async def _completed(self, request: _Request, result: Any) -> None:
        if request.outcome is not _PENDING:
            return  # it timed out first
        self._settle(request, self._results_of(request, result))
        await self._emit_ready(request)

    async def _failed(self, request: _Request, exc: BaseException) -> None:
        if request.outcome is not _PENDING:
            return
        attempts = f"{request.attempts} attempt{'s' if request.attempts != 1 else ''}"
        raise self._request_error(
            request, f"failed after {attempts}: {type(exc).__name__}: {exc}", exc
        )

    async def _timed_out(self, request: _Request) -> None:
        if request.outcome is not _PENDING:
            return
        if request.runner is not None:
            request.runner.cancel()
        hook = self._timeout_hook
        if hook is None:
            from runtime.api.durations import format_duration

            exc = AsyncTimeoutError(f"timed out after {format_duration(self.timeout_ms / 1000)}")
            raise self._request_error(
                request,
                f"timed out after {format_duration(self.timeout_ms / 1000)} "
                f"({request.attempts} attempt{'s' if request.attempts != 1 else ''}); pass a "
                "longer timeout= to map_async(), or handle it in the timeout(value) hook of an "
                "AsyncFunction",
                exc,
            )
        backend = self.keyed_backend
        if backend is not None:
            backend.current_key = request.key
        try:
            result = hook(request.value)
        except Exception as exc:
            raise self._request_error(
                request, f"its timeout() hook raised {type(exc).__name__}: {exc}", exc
            ) from exc
        self._settle(request, self._results_of(request, result))
        await self._emit_ready(request)

    def _results_of(self, request: _Request, result: Any) -> list[Any]:
        if not self.flat:
            return [result]
        if isinstance(result, str | bytes) or not isinstance(result, Iterable):
            exc = TypeError(f"returned {type(result).__name__}, not an iterable of results")
            raise self._request_error(request, f"of flat_map_async() {exc}", exc)
        return list(result)

    def _settle(self, request: _Request, results: list[Any]) -> None:
        request.outcome = results
        request.runner = None
        if request.timer is not None:
            request.timer.cancel()
            request.timer = None

    def _request_error(
        self, request: _Request, what: str, cause: BaseException
    ) -> UserFunctionError:
        ctx = self.context
        text = repr(request.value)
        if len(text) > 200:
            text = text[:197] + "..."
        msg = f"operator {ctx.subtask_label}: the async request for record {text} {what}"
        return UserFunctionError(msg, ctx.operator_name, ctx.subtask_index, cause)

    async def _emit_ready(self, completed: _Request | None = None) -> None:
        """Emit what may leave now: in ordered mode the completed requests (and watermarks) at
        the head; in unordered mode ``completed`` if it is in the first segment, and each
        watermark whose segment emptied, with the completed requests of the segment after it."""
        batch = _Batch()
        output = self.output
        if self.ordered:
            queue = self._ordered_queue
            while queue:
                head = queue[0]
                if type(head) is Watermark:
                    await batch.flush(output)
                    queue.popleft()
                    await output.emit_watermark(head)
                    continue
                assert isinstance(head, _Request)
                if head.outcome is _PENDING:
                    break
                queue.popleft()
                self._pending -= 1
                await batch.add(output, head.outcome, head.timestamp)
            await batch.flush(output)
            return
        segments = self._segments
        if completed is not None and completed.segment is segments[0]:
            del segments[0].requests[id(completed)]
            self._pending -= 1
            await batch.add(output, completed.outcome, completed.timestamp)
        elif completed is None:
            await self._emit_completed_of(segments[0], batch)
        while len(segments) > 1 and not segments[0].requests:
            watermark = segments.popleft().watermark
            assert watermark is not None
            await batch.flush(output)
            await output.emit_watermark(watermark)
            await self._emit_completed_of(segments[0], batch)
        await batch.flush(output)

    async def _emit_completed_of(self, segment: _Segment, batch: _Batch) -> None:
        done = [r for r in segment.requests.values() if r.outcome is not _PENDING]
        for request in done:
            del segment.requests[id(request)]
            self._pending -= 1
            await batch.add(self.output, request.outcome, request.timestamp)

    # ---------------------------------------------------------------- end, checkpoints, close

    async def finish(self) -> None:
        """FLIP-147: every pending request emits before the function's ``finish()``."""
        while self._pending:
            await self._task.yield_to_callbacks(self)
        await super().finish()

    def _pending_requests(self) -> list[_Request]:
        if self.ordered:
            return [r for r in self._ordered_queue if isinstance(r, _Request)]
        return [r for segment in self._segments for r in segment.requests.values()]

    async def snapshot_state(self, checkpoint_id: int) -> OperatorSnapshot | None:
        requests = self._pending_requests()
        entries: list[dict[str, Any]] = []
        for seq, request in enumerate(requests):
            entry = {"seq": seq, "value": request.value, "timestamp": request.timestamp}
            if request.outcome is not _PENDING:
                entry["results"] = request.outcome
            entries.append(entry)
        state = self._in_flight_state()
        backend = self.keyed_backend
        if backend is None:
            state.update(entries)
            return await super().snapshot_state(checkpoint_id)
        previous = backend.current_key
        try:
            for request, entry in zip(requests, entries, strict=True):
                backend.current_key = request.key
                state.add(entry)
            return await super().snapshot_state(checkpoint_id)
        finally:
            for request in requests:
                backend.current_key = request.key
                state.clear()
            backend.current_key = previous

    async def close(self) -> None:
        for request in self._pending_requests():
            if request.runner is not None:
                request.runner.cancel()
            if request.timer is not None:
                request.timer.cancel()
        await super().close()
