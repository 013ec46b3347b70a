"""Watermark strategies: where event timestamps come from and how watermarks follow them.

As in Flink, a :class:`WatermarkStrategy` makes a :class:`WatermarkGenerator` for each stream of
records it watches: each split of a source (``KafkaSource(watermark_strategy=...)`` per partition,
``job.from_source(source, watermark_strategy=...)``), or each subtask of
``assign_timestamps_and_watermarks(strategy)``. A generator sees every record (``on_event``) and
is asked periodically (``on_periodic_emit``, every ``--auto-watermark-interval``, and after each
buffer) for its watermark; it reports through a :class:`WatermarkOutput`, which can also mark the
stream idle (it no longer holds back the watermark of the others) and active again.

``with_idleness(timeout)``: a stream that received no record for ``timeout`` of processing time is
idle. While idle, a bounded-out-of-orderness watermark keeps following processing time from its
last record (``max timestamp + time since that record - out-of-orderness - 1``): once all traffic
stops, event time still advances, so the last windows fire instead of waiting for the next record.
The price, as for idleness in Flink: records that arrive after a long silence with older
timestamps than that are late.

Durations are int milliseconds or duration strings (``"5s"``, ``"250ms"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from actors.events import MIN_TIMESTAMP, WATERMARK_ACTIVE, WATERMARK_IDLE, Watermark
from actors.operator import Output, StreamOperator, UserFunctionError
from actors.timers import Clock
from runtime.api.durations import duration_ms
from runtime.api.functions import ASYNC_ALTERNATIVE, close_async_results, is_async_result

TimestampAssigner = Callable[[Any, "int | None"], int]
"""``fn(value, record_timestamp)``: the record's event time in ms; ``record_timestamp`` is the
timestamp the source gave it (a Kafka record's), None if it has none."""


class WatermarkOutput(Protocol):
    """Where a generator reports (synchronously; the operator sends what changed after it)."""

    def emit_watermark(self, timestamp: int) -> None:
        """No record with a timestamp ``<= timestamp`` follows; lower ones than before are ignored.
        It does not end idleness: call :meth:`mark_active` for that."""
        ...

    def mark_idle(self) -> None:
        """The stream emits no records for now: it stops holding back the watermark."""
        ...

    def mark_active(self) -> None:
        """The stream has records again."""
        ...


class WatermarkGenerator:
    """Generates the watermarks of one stream of records (Flink's ``WatermarkGenerator``).

    Subclasses override :meth:`on_event` and/or :meth:`on_periodic_emit`; both run on the task's
    actor and must not block.
    """

    def on_event(self, event: Any, timestamp: int, output: WatermarkOutput) -> None:
        """Called for every record, with its event timestamp."""

    def on_events(self, events: list[Any], timestamps: list[int], output: WatermarkOutput) -> None:
        """Called per buffer of records; calls :meth:`on_event` for each (override for speed)."""
        for event, timestamp in zip(events, timestamps, strict=True):
            self.on_event(event, timestamp, output)

    def on_periodic_emit(self, output: WatermarkOutput) -> None:
        """Called every ``--auto-watermark-interval`` and after each buffer."""

    def watermark_after_silence(self, silent_ms: int) -> int | None:
        """The watermark once no record came for ``silent_ms`` of processing time and the stream
        is idle (see :meth:`WatermarkStrategy.with_idleness`); None: it stays where it is."""
        return None


class BoundedOutOfOrdernessWatermarks(WatermarkGenerator):
    """Records arrive at most ``max_out_of_orderness_ms`` later (in event time) than the highest
    timestamp seen: the watermark is that timestamp minus the bound, minus 1."""

    def __init__(self, max_out_of_orderness_ms: int) -> None:
        self.max_out_of_orderness_ms = max_out_of_orderness_ms
        self.max_timestamp = MIN_TIMESTAMP + max_out_of_orderness_ms + 1

    def on_event(self, event: Any, timestamp: int, output: WatermarkOutput) -> None:
        if timestamp > self.max_timestamp:
            self.max_timestamp = timestamp

    def on_events(self, events: list[Any], timestamps: list[int], output: WatermarkOutput) -> None:
        if timestamps:
            highest = max(timestamps)
            if highest > self.max_timestamp:
                self.max_timestamp = highest

    def on_periodic_emit(self, output: WatermarkOutput) -> None:
        output.emit_watermark(self.max_timestamp - self.max_out_of_orderness_ms - 1)

    def watermark_after_silence(self, silent_ms: int) -> int | None:
        if self.max_timestamp == MIN_TIMESTAMP + self.max_out_of_orderness_ms + 1:
            return None  # no record yet: nothing to follow
        return self.max_timestamp + silent_ms - self.max_out_of_orderness_ms - 1


class WatermarksWithIdleness(WatermarkGenerator):
    """Wraps a generator: after ``idle_timeout_ms`` of processing time without a record the stream
    is marked idle (and its watermark follows :meth:`WatermarkGenerator.watermark_after_silence`);
    the next record marks it active again."""

    def __init__(self, generator: WatermarkGenerator, idle_timeout_ms: int, clock: Clock) -> None:
        if idle_timeout_ms <= 0:
            msg = f"idle timeout must be positive, got {idle_timeout_ms} ms"
            raise ValueError(msg)
        self.generator = generator
        self.idle_timeout_ms = idle_timeout_ms
        self.clock = clock
        self.last_activity_ms = clock.now_ms()
        self.idle = False

    def on_event(self, event: Any, timestamp: int, output: WatermarkOutput) -> None:
        self._activity(output)
        self.generator.on_event(event, timestamp, output)

    def on_events(self, events: list[Any], timestamps: list[int], output: WatermarkOutput) -> None:
        self._activity(output)
        self.generator.on_events(events, timestamps, output)

    def _activity(self, output: WatermarkOutput) -> None:
        self.last_activity_ms = self.clock.now_ms()
        if self.idle:
            self.idle = False
            output.mark_active()

    def on_periodic_emit(self, output: WatermarkOutput) -> None:
        silent_ms = self.clock.now_ms() - self.last_activity_ms
        if silent_ms < self.idle_timeout_ms:
            self.generator.on_periodic_emit(output)
            return
        if not self.idle:
            self.idle = True
            output.mark_idle()
        following = self.generator.watermark_after_silence(silent_ms)
        if following is not None:
            output.emit_watermark(following)


def _bounded(max_out_of_orderness_ms: int) -> Callable[[], WatermarkGenerator]:
    return lambda: BoundedOutOfOrdernessWatermarks(max_out_of_orderness_ms)


@dataclass(frozen=True)
class WatermarkStrategy:
    """How one stream gets event timestamps and watermarks (Flink's ``WatermarkStrategy``).

    Build one with :meth:`for_bounded_out_of_orderness`, :meth:`for_monotonous_timestamps` or
    :meth:`for_generator`, then refine with :meth:`with_timestamp_assigner` and
    :meth:`with_idleness` (each returns a new strategy).
    """

    generator_factory: Callable[[], WatermarkGenerator]
    """Makes one generator per stream watched (split or subtask)."""
    timestamp_assigner: TimestampAssigner | None = None
    """``fn(value, record_timestamp)``; None: the timestamps the source gave the records."""
    idle_timeout_ms: int | None = None

    @staticmethod
    def for_bounded_out_of_orderness(max_out_of_orderness: int | str) -> WatermarkStrategy:
        """Watermarks trail the highest timestamp seen by ``max_out_of_orderness`` (ms or "2s")."""
        bound = duration_ms(max_out_of_orderness, "max out-of-orderness")
        return WatermarkStrategy(_bounded(bound))

    @staticmethod
    def for_monotonous_timestamps() -> WatermarkStrategy:
        """Timestamps never decrease: the watermark is the highest timestamp seen, minus 1."""
        return WatermarkStrategy(_bounded(0))

    @staticmethod
    def for_generator(factory: Callable[[], WatermarkGenerator]) -> WatermarkStrategy:
        """Your own :class:`WatermarkGenerator`, one made by ``factory()`` per stream."""
        return WatermarkStrategy(factory)

    def with_timestamp_assigner(self, assigner: TimestampAssigner) -> WatermarkStrategy:
        """Event time from ``assigner(value, record_timestamp)`` instead of the source's."""
        from runtime.api.streams import _require_sync

        _require_sync("with_timestamp_assigner()", assigner)
        return dataclasses.replace(self, timestamp_assigner=assigner)

    def with_idleness(self, idle_timeout: int | str) -> WatermarkStrategy:
        """A stream without records for ``idle_timeout`` (processing time) is idle (see the
        module docstring)."""
        timeout = duration_ms(idle_timeout, "idle timeout")
        if timeout <= 0:
            msg = f"with_idleness(): the idle timeout must be positive, got {idle_timeout!r}"
            raise ValueError(msg)
        return dataclasses.replace(self, idle_timeout_ms=timeout)

    def create_watermark_generator(self, clock: Clock) -> WatermarkGenerator:
        """A generator for one stream; ``clock`` is the task's processing time."""
        generator = self.generator_factory()
        if self.idle_timeout_ms is not None:
            return WatermarksWithIdleness(generator, self.idle_timeout_ms, clock)
        return generator


class _StreamOutput:
    """What the generator of one stream (split) reported: its watermark and whether it is idle."""

    __slots__ = ("idle", "watermark")

    def __init__(self) -> None:
        self.watermark = MIN_TIMESTAMP
        self.idle = False

    def emit_watermark(self, timestamp: int) -> None:
        if timestamp > self.watermark:
            self.watermark = timestamp

    def mark_idle(self) -> None:
        self.idle = True

    def mark_active(self) -> None:
        self.idle = False


class WatermarkEmitter:
    """An operator's watermarks from a strategy, over one or more streams (a source subtask's
    splits; one stream for ``assign_timestamps_and_watermarks``), as Flink's
    ``WatermarkOutputMultiplexer`` combines them.

    The combined watermark is the minimum over the active streams; with every stream idle (or no
    stream at all) the operator is idle and its watermark the maximum over the streams, which an
    idle stream may still raise (see :class:`WatermarksWithIdleness`). :meth:`flush` sends what
    changed: ACTIVE before a watermark, IDLE after one, never a watermark lower than one sent.
    """

    def __init__(self, operator: StreamOperator, strategy: WatermarkStrategy) -> None:
        self.operator = operator
        self.strategy = strategy
        self._streams: dict[Any, tuple[WatermarkGenerator, _StreamOutput]] = {}
        self.sent_watermark = MIN_TIMESTAMP
        self.sent_idle = False
        self.ended = False
        """After the end of input (``MAX_WATERMARK``) nothing more is sent."""

    def add_stream(self, stream_id: Any) -> None:
        if stream_id not in self._streams:
            generator = self.strategy.create_watermark_generator(self.operator.context.clock)
            self._streams[stream_id] = (generator, _StreamOutput())

    def timestamps(self, values: list[Any], timestamps: list[int] | None) -> list[int]:
        """The event timestamps of ``values``: the assigner's, or the source's own."""
        assigner = self.strategy.timestamp_assigner
        if assigner is None:
            if timestamps is None:
                op = self.operator
                msg = (
                    f"operator {op.context.subtask_label}: the watermark strategy has no "
                    "timestamp assigner and the records carry no timestamp; use "
                    "WatermarkStrategy....with_timestamp_assigner(lambda value, ts: ...)"
                )
                raise op.user_error(TypeError(msg))
            return timestamps
        try:
            # The first record alone, so that an awaitable is caught before int() drops it.
            value = values[0]
            first = assigner(value, None if timestamps is None else timestamps[0])
            if is_async_result(first):
                close_async_results([first])
                msg = (
                    f"the timestamp assigner returned a {type(first).__name__} for record "
                    f"{value!r:.120} instead of a value; the runtime does not await what user "
                    f"functions return: {ASYNC_ALTERNATIVE}"
                )
                raise self.operator.user_error(TypeError(msg))
            if timestamps is None:
                stamps = [int(first)]
                stamps += [int(assigner(value, None)) for value in values[1:]]
            else:
                stamps = [int(first)]
                stamps += [
                    int(assigner(value, ts))
                    for value, ts in zip(values[1:], timestamps[1:], strict=True)
                ]
        except UserFunctionError:
            raise
        except Exception as exc:
            raise self.operator.user_error(exc, values) from exc
        return stamps

    async def emit_records(
        self, stream_id: Any, values: list[Any], timestamps: list[int] | None, output: Output
    ) -> None:
        """Emit a buffer of one stream (``values`` not empty) through ``output`` with its event
        timestamps (:meth:`timestamps`), in the order receivers rely on: ACTIVE before the records
        if the stream just became active, its watermark (and IDLE) after them. The generator sees
        the records, then its periodic emit runs, so a watermark follows every buffer."""
        stamps = self.timestamps(values, timestamps)
        self.add_stream(stream_id)
        generator, stream_output = self._streams[stream_id]
        try:
            generator.on_events(values, stamps, stream_output)
            generator.on_periodic_emit(stream_output)
        except Exception as exc:
            raise self.operator.user_error(exc, values) from exc
        await self._flush_status_only(output)
        await output.emit(values, stamps)
        await self.flush(output)

    def on_periodic_emit(self) -> None:
        try:
            for generator, output in self._streams.values():
                generator.on_periodic_emit(output)
        except Exception as exc:
            raise self.operator.user_error(exc) from exc

    def mark_all(self, idle: bool) -> None:
        """The input of every stream became idle (or active): for an operator whose upstream
        announced it, since no record can come from an idle input."""
        for _, output in self._streams.values():
            output.idle = idle

    def start_periodic(self) -> None:
        """Emit every ``auto_watermark_interval_ms`` of the task's clock (from ``open()``)."""
        ctx = self.operator.context
        if ctx.auto_watermark_interval_ms > 0 and ctx.scheduler is not None:
            due = ctx.clock.now_ms() + ctx.auto_watermark_interval_ms
            ctx.scheduler.schedule_processing_callback(due, self._periodic)

    async def _periodic(self, timestamp_ms: int) -> None:
        if self.ended:
            return
        self.on_periodic_emit()
        await self.flush(self.operator.output)
        self.start_periodic()

    async def _flush_status_only(self, output: Output) -> None:
        """ACTIVE, if a stream became active since IDLE was sent (before records: receivers
        must see the status before the records and the watermark after them)."""
        if self.ended or not self.sent_idle:
            return
        if any(not o.idle for _, o in self._streams.values()):
            self.sent_idle = False
            await output.emit_watermark_status(WATERMARK_ACTIVE)

    async def flush(self, output: Output) -> None:
        """Send what changed: ACTIVE, then the watermark, then IDLE."""
        if self.ended:
            return
        outputs = [o for _, o in self._streams.values()]
        active = [o.watermark for o in outputs if not o.idle]
        idle = not active
        if active:
            watermark = min(active)
        else:
            watermark = max((o.watermark for o in outputs), default=MIN_TIMESTAMP)
        if not idle and self.sent_idle:
            self.sent_idle = False
            await output.emit_watermark_status(WATERMARK_ACTIVE)
        if watermark > self.sent_watermark:
            self.sent_watermark = watermark
            await output.emit_watermark(Watermark(watermark))
        if idle and not self.sent_idle:
            self.sent_idle = True
            await output.emit_watermark_status(WATERMARK_IDLE)
