"""The source API that connectors implement, and the operator that runs a source in a task.

A :class:`Source` is split into *splits* (a file, a Kafka partition, a slice of a collection), listed
on the coordinator when the job starts and assigned deterministically and evenly to the source's
subtasks. Each subtask runs a :class:`SourceReader` over its splits. A split is plain data
(msgpack-encodable) that carries its own read position; readers report their splits, positions
included, at every checkpoint, and the runtime keeps them as the source operator's list state, so a
restore (at any parallelism) resumes every split exactly where the checkpoint was taken.
"""

from __future__ import annotations

import time
from typing import Any, Generic, TypeVar

from actors.events import MAX_TIMESTAMP, WATERMARK_ACTIVE, WATERMARK_IDLE, Watermark
from actors.operator import RestoreContext
from actors.task import InputStatus, SourceOperatorBase
from runtime.api.watermarks import WatermarkEmitter, WatermarkStrategy
from state.operator import OperatorStateStore
from state.snapshot import OperatorSnapshot, RestoredState

T = TypeVar("T")

SPLITS_STATE = "splits"
DEFAULT_SOURCE_BATCH = 1024


class SourceReaderContext:
    """What a reader gets: its subtask, job parameters, and a way to say data is available."""

    def __init__(
        self,
        source_name: str,
        subtask_index: int,
        parallelism: int,
        params: dict[str, str],
        notify_available: Any,
        restore: RestoreContext | None = None,
    ) -> None:
        self.source_name = source_name
        self.subtask_index = subtask_index
        self.parallelism = parallelism
        self.params = params
        self.notify_available = notify_available
        """Call (from the event loop) when ``poll`` would now return data after returning None."""
        self.restore = restore or RestoreContext()
        """What this attempt restores from (splits given to ``add_splits`` may come from it)."""


class EndOfInput:
    """Returned by :meth:`SourceReader.poll` when every split is exhausted (bounded sources)."""


END_OF_INPUT = EndOfInput()


class SourceReader(Generic[T]):
    """Reads the splits of one subtask. All methods run on the subtask's actor and must not block."""

    watermarks_per_split = False
    """True when every poll returns records of one split only and :meth:`split_of_last_poll`
    names it: a watermark strategy then runs per split (Kafka: per partition). Otherwise the
    subtask's records are one stream for it."""

    def split_of_last_poll(self) -> Any:
        """The id (``Source.split_id``) of the split the records of the last poll came from."""
        return None

    def add_splits(self, splits: list[Any]) -> None:
        raise NotImplementedError

    def poll(self, max_records: int) -> list[T] | tuple[list[T], list[int]] | EndOfInput | None:
        """Up to ``max_records`` records (optionally with their timestamps), ``None`` if nothing
        is available right now, or ``END_OF_INPUT`` when this reader will never produce more."""
        raise NotImplementedError

    def snapshot_splits(self) -> list[Any]:
        """The assigned splits with their current positions (just after the last polled record)."""
        raise NotImplementedError

    def describe_position(self) -> str | None:
        """Where the last polled batch came from, for error messages (e.g. ``file.txt:120-180``)."""
        return None

    def current_watermark(self) -> int | None:
        """A watermark the reader can vouch for after the last poll, or None (used only when the
        source has no watermark strategy)."""
        return None

    async def close(self) -> None:
        """Release resources; always called."""

    async def notify_checkpoint_complete(self, checkpoint_id: int, splits: list[Any]) -> None:
        """``splits`` as snapshotted for ``checkpoint_id`` are now durable (e.g. commit offsets)."""

    async def prepare_snapshot(self) -> None:
        """Called before ``snapshot_splits``: finish anything the snapshot must cover."""

    async def start(self) -> None:
        """Start background I/O (e.g. fetching); called once after the splits were added."""


class Source(Generic[T]):
    """Base class of sources. Subclasses list their splits and create readers."""

    bounded = True
    rate: float = 0.0
    """Records per second per subtask, 0 for unlimited (for demos and watched runs)."""

    def name(self) -> str:
        return type(self).__name__

    def create_splits(self, parallelism: int) -> list[Any]:
        """Called once on the coordinator when the job starts; ``parallelism`` is the source's."""
        raise NotImplementedError

    def create_reader(self, context: SourceReaderContext) -> SourceReader[T]:
        raise NotImplementedError

    async def discover_splits(self, parallelism: int) -> list[Any]:
        """The splits at job start, on the coordinator; sources that need I/O override this."""
        return self.create_splits(parallelism)

    watermark_strategy: WatermarkStrategy | None = None
    """The strategy applied per split (see ``SourceReader.watermarks_per_split``) unless
    ``job.from_source(source, watermark_strategy=...)`` gives one."""

    discovery_interval_s: float | None = None
    """How often to look for new splits while running (None: never)."""

    async def discover_new_splits(self, known: list[Any]) -> list[Any]:
        """Splits that appeared since ``known`` was listed (e.g. new Kafka partitions)."""
        return []

    def assign_split(self, split: Any, index: int, parallelism: int) -> int:
        """The subtask that reads ``split`` (the ``index``-th split listed); must be deterministic."""
        return index % parallelism

    def split_id(self, split: Any) -> Any:
        """What identifies a split regardless of its position (to tell new splits from known)."""
        return split.get("split") if isinstance(split, dict) else split


def contiguous_splits(count: int, parallelism: int) -> list[dict[str, int]]:
    """``parallelism`` splits over positions ``0..count-1``, contiguous and near-equal in size:
    ``{"split": i, "start": a, "end": b, "next": a}`` (``next`` is the read position)."""
    bounds = [count * i // parallelism for i in range(parallelism + 1)]
    return [
        {"split": i, "start": bounds[i], "end": bounds[i + 1], "next": bounds[i]}
        for i in range(parallelism)
    ]


def assign_splits(
    source: Source[Any], splits: list[Any], parallelism: int, subtask_index: int
) -> list[Any]:
    """The splits that ``subtask_index`` reads, by the source's deterministic assignment."""
    return [
        split
        for i, split in enumerate(splits)
        if source.assign_split(split, i, parallelism) == subtask_index
    ]


class SourceOperator(SourceOperatorBase):
    """Runs a :class:`SourceReader` as the head of a source task.

    With a watermark strategy, each split gets a generator and the subtask's watermark is the
    minimum over its active splits (see :class:`~runtime.api.watermarks.WatermarkEmitter`),
    emitted after each poll and every ``auto_watermark_interval_ms``. A subtask without any
    split is idle (announced when it opens) until splits are added.
    """

    def __init__(
        self,
        name: str,
        uid: str,
        source: Source[Any],
        initial_splits: list[Any],
        watermark_strategy: WatermarkStrategy | None = None,
    ) -> None:
        super().__init__(name, uid)
        self.source = source
        self.initial_splits = initial_splits
        self.watermark_strategy = watermark_strategy or source.watermark_strategy
        self._emitter: WatermarkEmitter | None = None
        self._has_splits = False
        self._idle_sent = False
        self._status_changed = False
        self.reader: SourceReader[Any]
        self._operator_state: OperatorStateStore
        self._rate = float(source.rate or 0.0)
        self._tokens = 0.0
        self._last_refill = 0.0
        self._last_snapshot: dict[int, list[Any]] = {}

    async def initialize_state(self, restored: RestoredState | None) -> None:
        ctx = self.context
        self._operator_state = OperatorStateStore(ctx.subtask_label)
        if restored is not None and restored.operator is not None:
            self._operator_state.restore(restored.operator)
            splits = self._operator_state.get_list_state(SPLITS_STATE).get()
        else:
            splits = list(self.initial_splits)
        wakeup = ctx.scheduler.wakeup if ctx.scheduler is not None else None
        self.reader = self.source.create_reader(
            SourceReaderContext(
                self.name,
                ctx.subtask_index,
                ctx.parallelism,
                ctx.params,
                wakeup.set if wakeup is not None else (lambda: None),
                ctx.restore,
            )
        )
        if self.watermark_strategy is not None:
            self._emitter = WatermarkEmitter(self, self.watermark_strategy)
        self._add_splits(splits)
        self._last_refill = time.monotonic()

    async def open(self) -> None:
        await self.reader.start()
        if self._emitter is not None:
            self._emitter.start_periodic()
        await self._flush_status()

    def add_splits(self, splits: list[Any]) -> None:
        self._add_splits(splits)
        self._status_changed = True

    def _add_splits(self, splits: list[Any]) -> None:
        self.reader.add_splits(splits)
        if splits:
            self._has_splits = True
        emitter = self._emitter
        if emitter is not None:
            if self.reader.watermarks_per_split:
                for split in splits:
                    emitter.add_stream(self.source.split_id(split))
            elif splits:
                emitter.add_stream(None)

    async def _flush_status(self) -> None:
        """Idle while the subtask has no split (with a strategy, the emitter knows it too)."""
        self._status_changed = False
        if self._emitter is not None:
            await self._emitter.flush(self.output)
        elif self._has_splits == self._idle_sent:
            self._idle_sent = not self._has_splits
            await self.output.emit_watermark_status(
                WATERMARK_IDLE if self._idle_sent else WATERMARK_ACTIVE
            )

    async def process_watermark(self, watermark: Watermark) -> None:
        if watermark.timestamp == MAX_TIMESTAMP and self._emitter is not None:
            self._emitter.ended = True
        await self.output.emit_watermark(watermark)

    async def emit_next(self) -> InputStatus:
        limit = DEFAULT_SOURCE_BATCH
        if self._rate > 0:
            now = time.monotonic()
            self._tokens = min(
                self._tokens + (now - self._last_refill) * self._rate, max(1.0, self._rate / 10)
            )
            self._last_refill = now
            limit = min(limit, int(self._tokens))
            if limit <= 0:
                return InputStatus.NOTHING_AVAILABLE
        if self._status_changed:
            await self._flush_status()
        polled = self.reader.poll(limit)
        if polled is None:
            return InputStatus.NOTHING_AVAILABLE
        if isinstance(polled, EndOfInput):
            return InputStatus.END_OF_INPUT
        if isinstance(polled, tuple):
            values, timestamps = polled
        else:
            values, timestamps = polled, None
        if self._rate > 0:
            self._tokens -= len(values)
        emitter = self._emitter
        if emitter is not None:
            if values:
                stream = (
                    self.reader.split_of_last_poll() if self.reader.watermarks_per_split else None
                )
                await emitter.emit_records(stream, values, timestamps, self.output)
            return InputStatus.MORE_AVAILABLE
        if values:
            await self.output.emit(values, timestamps)
        watermark = self.reader.current_watermark()
        if watermark is not None:
            await self.output.emit_watermark(Watermark(watermark))
        return InputStatus.MORE_AVAILABLE

    def next_poll_delay(self) -> float | None:
        if self._rate > 0 and self._tokens < 1:
            return max(0.001, (1 - self._tokens) / self._rate)
        return None

    def describe_position(self) -> str | None:
        return self.reader.describe_position()

    async def snapshot_state(self, checkpoint_id: int) -> OperatorSnapshot | None:
        await self.reader.prepare_snapshot()
        splits = self.reader.snapshot_splits()
        self._operator_state.get_list_state(SPLITS_STATE).update(splits)
        self._last_snapshot[checkpoint_id] = splits
        return OperatorSnapshot(operator=self._operator_state.snapshot())

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        splits = self._last_snapshot.pop(checkpoint_id, None)
        for old in [c for c in self._last_snapshot if c < checkpoint_id]:
            del self._last_snapshot[old]
        if splits is not None:
            await self.reader.notify_checkpoint_complete(checkpoint_id, splits)

    async def notify_checkpoint_aborted(self, checkpoint_id: int) -> None:
        self._last_snapshot.pop(checkpoint_id, None)

    async def close(self) -> None:
        reader = getattr(self, "reader", None)
        if reader is not None:
            await reader.close()
