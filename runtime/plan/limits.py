"""Bounded runs of an unbounded job: stop after N records reached the sinks, or after a duration.

``run_job(build, max_records=N, timeout=...)`` checks what the user asked for in
:class:`RunLimits`; the job master ends the job when a limit is reached, through its stop with
drain (FLIP-147: the sources end, ``finish()`` runs everywhere, a final checkpoint commits what the
sinks received). Records are counted where they enter the sink operators: every sink operator of
a job whose subtasks run in this process is wrapped in a :class:`RecordLimitedSink` sharing one
:class:`SinkRecordLimit`, so exactly ``max_records`` records reach the sinks in total (over all
sinks and subtasks): the ones still on their way when the limit was reached (in channels, or
emitted by ``finish()`` on the drain) are not written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.events import Watermark, WatermarkStatus
from actors.operator import OperatorContext, Output, StreamOperator
from runtime.api.durations import duration_ms
from state.snapshot import OperatorSnapshot, RestoredState


@dataclass(frozen=True)
class RunLimits:
    """When a bounded run of a job ends by itself (None: no such limit)."""

    max_records: int | None = None
    """Records that reach the sinks, in total over every sink and subtask."""
    timeout_ms: int | None = None
    """Processing time (the job's clock) from the start of the run."""

    @classmethod
    def from_arguments(cls, max_records: int | None, timeout: int | str | None) -> RunLimits:
        """The limits of ``run_job(max_records=..., timeout=...)``; raises ValueError naming the
        argument for a count that is not a positive int and a timeout that is not a positive
        duration (int milliseconds or a string with a unit, ``"10s"``)."""
        if max_records is not None and (
            isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1
        ):
            msg = (
                f"run_job max_records: expected a positive int (records that reach the sinks), "
                f"got {max_records!r}"
            )
            raise ValueError(msg)
        timeout_ms = None
        if timeout is not None:
            timeout_ms = duration_ms(timeout, "run_job timeout")
            if timeout_ms == 0:
                msg = (
                    f"run_job timeout: must be longer than 0, got {timeout!r} "
                    "(leave it out to run without a timeout)"
                )
                raise ValueError(msg)
        return cls(max_records, timeout_ms)

    @property
    def any(self) -> bool:
        return self.max_records is not None or self.timeout_ms is not None


class SinkRecordLimit:
    """The count of records that reached the sinks, shared by every :class:`RecordLimitedSink` of
    a job in this process (one event loop: no locking). ``on_reached`` is called once, when the
    count reaches ``limit``.

    Each sink subtask notes its count in every checkpoint it takes, so that a restart from a
    checkpoint counts on from what that checkpoint committed (:meth:`rewind`)."""

    def __init__(self, limit: int, on_reached: Callable[[], None]) -> None:
        self.limit = limit
        self.on_reached = on_reached
        self.delivered = 0
        """Records passed to the sinks so far (since the restored checkpoint)."""
        self.discarded = 0
        """Records that came to a sink after the limit and were not written."""
        self._by_subtask: dict[tuple[str, int], int] = {}
        self._noted: dict[tuple[str, int], list[tuple[int, int]]] = {}
        """Per sink subtask, (checkpoint id, its count then), oldest first."""

    @property
    def reached(self) -> bool:
        return self.delivered >= self.limit

    def take(self, subtask: tuple[str, int], wanted: int) -> int:
        """How many of ``wanted`` records the sink subtask ``subtask`` (uid, index) may write."""
        granted = min(wanted, self.limit - self.delivered)
        if granted <= 0:
            self.discarded += wanted
            return 0
        self.delivered += granted
        self._by_subtask[subtask] = self._by_subtask.get(subtask, 0) + granted
        self.discarded += wanted - granted
        if self.reached:
            self.on_reached()
        return granted

    def note_checkpoint(self, subtask: tuple[str, int], checkpoint_id: int) -> None:
        self._noted.setdefault(subtask, []).append(
            (checkpoint_id, self._by_subtask.get(subtask, 0))
        )

    def forget_before(self, checkpoint_id: int) -> None:
        """Checkpoint ``checkpoint_id`` completed: no restart goes back before it any more."""
        for subtask, noted in self._noted.items():
            covered = [entry for entry in noted if entry[0] <= checkpoint_id]
            if len(covered) > 1:
                self._noted[subtask] = noted[len(covered) - 1 :]

    def rewind(self, checkpoint_id: int | None) -> None:
        """A new attempt restores ``checkpoint_id`` (None: starts afresh): count from what each
        sink subtask had written when it took that checkpoint (or its last one before it)."""
        by_subtask: dict[tuple[str, int], int] = {}
        if checkpoint_id is not None:
            for subtask, noted in self._noted.items():
                counts = [count for cid, count in noted if cid <= checkpoint_id]
                if counts:
                    by_subtask[subtask] = counts[-1]
        self._by_subtask = by_subtask
        self.delivered = sum(by_subtask.values())


class RecordLimitedSink(StreamOperator):
    """A sink operator whose input stops at the job's :class:`SinkRecordLimit`: the records past
    it are not passed on (nor counted in its ``records_in``); everything else is the wrapped
    operator's own (its name, uid, metrics, state and lifecycle)."""

    def __init__(self, sink: StreamOperator, limit: SinkRecordLimit) -> None:
        super().__init__(sink.name, sink.uid)
        self.sink = sink
        self.limit = limit
        self.chaining_allowed = sink.chaining_allowed
        self.metrics = sink.metrics

    def __getattr__(self, name: str) -> Any:
        # What tests and tools read of a particular sink operator (its writer, its batches).
        sink = self.__dict__.get("sink")
        if sink is None:
            raise AttributeError(name)
        return getattr(sink, name)

    def setup(
        self,
        context: OperatorContext,
        output: Output,
        side_outputs: dict[str, Output] | None = None,
    ) -> None:
        self.sink.setup(context, output, side_outputs)
        self.context = self.sink.context
        self.output = self.sink.output
        self.side_outputs = self.sink.side_outputs

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        granted = self._grant(values)
        if granted < len(values):
            values = values[:granted]
            timestamps = timestamps[:granted] if timestamps is not None else None
        if values:
            await self.sink.process_batch(values, timestamps, input_index)

    def carried_key_selector(self, input_index: int) -> Callable[[Any], Any] | None:
        return self.sink.carried_key_selector(input_index)

    async def process_keyed_batch(
        self, values: list[Any], timestamps: list[int] | None, keys: list[Any], input_index: int
    ) -> None:
        granted = self._grant(values)
        if granted:
            await self.sink.process_keyed_batch(
                values[:granted],
                timestamps[:granted] if timestamps is not None else None,
                keys[:granted],
                input_index,
            )

    def _grant(self, values: list[Any]) -> int:
        """How many of ``values`` the limit lets through (the rest are not counted as in)."""
        wanted = len(values)
        granted = self.limit.take((self.uid, self.context.subtask_index), wanted)
        if granted < wanted:
            # Counted on arrival by whoever handed them over: the sink never received these.
            self.metrics.records_in -= wanted - granted
        return granted

    async def initialize_state(self, restored: RestoredState | None) -> None:
        await self.sink.initialize_state(restored)

    async def open(self) -> None:
        await self.sink.open()

    async def process_watermark(self, watermark: Watermark) -> None:
        await self.sink.process_watermark(watermark)

    async def process_watermark_status(self, status: WatermarkStatus) -> None:
        await self.sink.process_watermark_status(status)

    async def fire_processing_timers(self, now_ms: int) -> None:
        await self.sink.fire_processing_timers(now_ms)

    async def emit_side(self, tag: str, values: list[Any], timestamps: list[int] | None) -> None:
        await self.sink.emit_side(tag, values, timestamps)

    async def end_input(self, input_index: int) -> None:
        await self.sink.end_input(input_index)

    async def finish(self) -> None:
        await self.sink.finish()

    async def close(self) -> None:
        await self.sink.close()

    async def snapshot_state(self, checkpoint_id: int) -> OperatorSnapshot | None:
        self.limit.note_checkpoint((self.uid, self.context.subtask_index), checkpoint_id)
        return await self.sink.snapshot_state(checkpoint_id)

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        self.limit.forget_before(checkpoint_id)
        await self.sink.notify_checkpoint_complete(checkpoint_id)

    async def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        await self.sink.notify_checkpoint_aborted(checkpoint_id)

    def user_error(
        self,
        exc: BaseException,
        values: list[Any] | None = None,
        failed_at: tuple[int, Any] | None = None,
    ) -> Any:
        return self.sink.user_error(exc, values, failed_at)
