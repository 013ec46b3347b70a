"""Kafka source on aiokafka: partitions as splits, offsets in operator state.

Each topic partition is a split ``{"topic", "partition", "offset", "stop"}``: ``offset`` is the next
offset to read (``None`` until the start position is resolved), ``stop`` the offset at which a
bounded read ends (``None`` when unbounded). Splits live in the source operator's list state, so a
restore seeks every partition to exactly where the checkpoint was taken, at any parallelism. Offsets
are also committed to the consumer group after a checkpoint completes, for lag tools only.

Reading: one consumer per subtask, with manually assigned partitions. A background fetch loop fills
a small bounded queue of fetched batches; the task polls it. The consumer hands out the record
objects of each fetched record batch, not a ``ConsumerRecord`` per record
(:mod:`connectors.kafka.record_batches`). When the task cannot emit (no credit
downstream) it stops polling, the queue fills and the fetch loop stops fetching: memory stays bounded
whatever the lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
import re
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from actors.infrastructure import InfrastructureError
from connectors.kafka import record_batches
from connectors.kafka.clients import (
    KafkaClients,
    finish_then_cancel,
    missing_topics,
    start_client,
    stop_client,
)
from runtime.api.sources import END_OF_INPUT, EndOfInput, Source, SourceReader, SourceReaderContext
from runtime.api.watermarks import WatermarkStrategy
from state.keygroups import stable_hash

log = logging.getLogger(__name__)

# Generous fetch limits: a fetch cut in the middle of a record batch can stall some brokers.
FETCH_MAX_BYTES = 64 * 1024 * 1024
PARTITION_FETCH_MAX_BYTES = 16 * 1024 * 1024
FETCH_MAX_WAIT_MS = 100
"""How long a fetch may wait at the broker for data (Kafka's default: 500 ms). Apache Kafka answers
as soon as there is data, so this only sets how often an idle source asks again. Tansu 0.6 waits
after every read, data or not (half the wait, then the rest if it found nothing): with 500 ms each
fetch took 250-500 ms, and a job's source stood idle about a seventh of a Kafka ETL benchmark run
waiting for it (1.0-1.5 s of 7-10 s; 0.2-0.35 s with 100 ms). ``client_options`` overrides it."""
MAX_QUEUED_BATCHES = 4
FETCH_CHUNKS = 4
"""Items one ``getmany`` of the fetch loop takes: chunks of at most ``record_batches.CHUNK_RECORDS``
(512) records, so a queued batch holds at most 2,048 records."""


class DeserializationError(ValueError):
    """A record could not be deserialised; names topic, partition and offset."""


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """A Kafka record with its metadata (``record_format="record"``)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: Any
    value: Any
    headers: tuple[tuple[str, bytes], ...]


def _deserializer(kind: str | Callable[[bytes], Any]) -> Callable[[bytes | None], Any]:
    if callable(kind):
        return kind  # type: ignore[return-value]
    if kind == "json":
        return lambda b: None if b is None else orjson.loads(b)
    if kind == "text":
        return lambda b: None if b is None else b.decode("utf-8")
    if kind == "bytes":
        return lambda b: b
    if kind == "msgpack":
        return lambda b: None if b is None else msgpack.unpackb(b, raw=False)
    msg = f"unknown deserializer {kind!r}: use json, text, bytes, msgpack or a function"
    raise ValueError(msg)


def _value_deserializer(kind: str | Callable[[bytes], Any]) -> Callable[[bytes], Any] | None:
    """The deserialiser of values known to be present, without the check for a missing one
    (None: the bytes are the values)."""
    if callable(kind):
        return kind
    if kind == "json":
        return orjson.loads
    if kind == "text":
        return bytes.decode  # UTF-8
    if kind == "bytes":
        return None
    if kind == "msgpack":
        return functools.partial(msgpack.unpackb, raw=False)
    return _deserializer(kind)  # refuses the unknown kind


_offset = operator.attrgetter("offset")


class KafkaSource(Source[Any]):
    """Reads topics (by name or regex ``pattern``) in parallel, exactly once with checkpoints.

    - ``start``: where partitions without restored state begin: ``"earliest"``, ``"latest"``,
      ``"committed"`` (the group's offsets, falling back to ``reset``), or ``("timestamp", ms)``.
    - ``bounded``: stop at the end offsets seen at start (or ``stop_offsets``), then end the job's
      input through the FLIP-147 protocol.
    - ``deserializer``: ``"json"``, ``"text"``, ``"bytes"``, ``"msgpack"`` or a function of the value
      bytes. ``record_format="record"`` emits :class:`KafkaRecord` with key, headers, timestamp,
      topic, partition and offset; ``"value"`` (default) just the value.
    - ``on_error``: a record that fails to deserialise ``"fail"``s the job with an error naming
      topic, partition and offset (default), is ``"skip"``ped and counted, or is sent raw to
      ``dead_letter_topic`` (``"dead-letter"``).
    - ``tombstones``: what a record with a key and a null value (a deletion marker on compacted
      topics) becomes: ``"skip"`` (default: not emitted, counted in ``tombstones_skipped``, the
      first one logged at INFO), ``"emit"`` (a :class:`KafkaRecord` whose ``value`` is None; needs
      ``record_format="record"``, as a value deserialiser cannot represent a missing value), or
      ``"fail"`` (the job fails naming topic, partition and offset). Deserialisers never see a
      missing value, so ``on_error`` does not apply to tombstones.
    - ``watermark_strategy``: a :class:`~runtime.WatermarkStrategy` applied per partition (event
      time from the Kafka record timestamps unless it has a timestamp assigner); the subtask's
      watermark is the minimum over its active partitions, idle ones (``with_idleness``) do not
      hold it back, and a subtask without partitions is idle.
    - ``out_of_orderness_ms`` (older form): the same as
      ``WatermarkStrategy.for_bounded_out_of_orderness(out_of_orderness_ms)
      .with_idleness(idle_timeout_ms)``.
    - ``discovery_interval_s``: look for new partitions this often while running (unbounded only).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topics: list[str] | str | None = None,
        *,
        pattern: str | None = None,
        group_id: str | None = None,
        start: str | tuple[str, int] = "earliest",
        reset: str = "earliest",
        bounded: bool = False,
        stop_offsets: dict[tuple[str, int], int] | None = None,
        deserializer: str | Callable[[bytes], Any] = "json",
        key_deserializer: str | Callable[[bytes], Any] = "bytes",
        record_format: str = "value",
        on_error: str = "fail",
        dead_letter_topic: str | None = None,
        watermark_strategy: WatermarkStrategy | None = None,
        out_of_orderness_ms: int | None = None,
        idle_timeout_ms: int = 30_000,
        discovery_interval_s: float | None = 10.0,
        rate: float = 0.0,
        tombstones: str = "skip",
        client_options: dict[str, Any] | None = None,
    ) -> None:
        if topics is None and pattern is None:
            msg = "KafkaSource needs topics or a pattern"
            raise ValueError(msg)
        if on_error not in ("fail", "skip", "dead-letter"):
            msg = f"on_error must be fail, skip or dead-letter, got {on_error!r}"
            raise ValueError(msg)
        if on_error == "dead-letter" and not dead_letter_topic:
            msg = "on_error='dead-letter' needs dead_letter_topic"
            raise ValueError(msg)
        if record_format not in ("value", "record"):
            msg = f"record_format must be value or record, got {record_format!r}"
            raise ValueError(msg)
        if tombstones not in ("skip", "emit", "fail"):
            msg = f"tombstones must be skip, emit or fail, got {tombstones!r}"
            raise ValueError(msg)
        if tombstones == "emit" and record_format != "record":
            msg = (
                "tombstones='emit' needs record_format='record': a bare value cannot tell a "
                "tombstone (its key, no value) from a record whose value deserialises to None"
            )
            raise ValueError(msg)
        client_deserializers = sorted(
            {"value_deserializer", "key_deserializer"} & set(client_options or {})
        )
        if client_deserializers:
            # The reader's consumer hands out raw record batches (record_batches), and the source
            # deserialises each record itself, so that a bad one is failed, skipped or
            # dead-lettered at its offset: a client-side deserializer would be left out.
            msg = (
                f"KafkaSource: client_options cannot set {' or '.join(client_deserializers)}; "
                "give deserializer= / key_deserializer= (a name or a function of the bytes)"
            )
            raise ValueError(msg)
        self.bootstrap_servers = bootstrap_servers
        self.topics = [topics] if isinstance(topics, str) else topics
        self.pattern = re.compile(pattern) if pattern else None
        self.group_id = group_id
        self.start = start
        self.reset = reset
        self.bounded = bounded
        self.stop_offsets = stop_offsets
        self.deserializer = deserializer
        self.key_deserializer = key_deserializer
        self.record_format = record_format
        self.on_error = on_error
        self.dead_letter_topic = dead_letter_topic
        if watermark_strategy is not None and out_of_orderness_ms is not None:
            msg = (
                "KafkaSource: give watermark_strategy or out_of_orderness_ms, not both "
                "(a strategy has its own bound: WatermarkStrategy.for_bounded_out_of_orderness)"
            )
            raise ValueError(msg)
        if watermark_strategy is None and out_of_orderness_ms is not None:
            watermark_strategy = WatermarkStrategy.for_bounded_out_of_orderness(out_of_orderness_ms)
            if idle_timeout_ms:
                watermark_strategy = watermark_strategy.with_idleness(idle_timeout_ms)
        self.watermark_strategy = watermark_strategy
        self.discovery_interval_s = None if bounded else discovery_interval_s
        self.rate = rate
        self.clients = KafkaClients(bootstrap_servers, client_options, owner=self.name())
        """Creates every client of this source (see :mod:`connectors.kafka.clients`)."""
        self.skipped = 0
        """Records skipped by ``on_error="skip"`` across all subtasks of this process."""
        self.tombstones = tombstones
        self.tombstones_skipped = 0
        """Tombstones skipped by ``tombstones="skip"`` across all subtasks of this process."""

    def name(self) -> str:
        return f"Kafka({','.join(self.topics or [self.pattern.pattern if self.pattern else '?'])})"

    def consumer(self, purpose: str, **required: Any) -> AIOKafkaConsumer:
        """A consumer with this source's client options; offsets are never auto-committed."""
        defaults = {
            "fetch_max_bytes": FETCH_MAX_BYTES,
            "max_partition_fetch_bytes": PARTITION_FETCH_MAX_BYTES,
            "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
            "auto_offset_reset": self.reset if self.reset in ("earliest", "latest") else "earliest",
        }
        return self.clients.consumer(purpose, defaults, enable_auto_commit=False, **required)

    # ---------------------------------------------------------------- split discovery

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        topics = await consumer.topics()
        if self.topics is not None:
            wanted = [t for t in self.topics if t in topics]
            missing = [t for t in self.topics if t not in topics]
            if missing:
                raise InfrastructureError(missing_topics(missing, self.bootstrap_servers))
        else:
            assert self.pattern is not None
            wanted = sorted(t for t in topics if self.pattern.fullmatch(t))
        result = []
        for topic in sorted(wanted):
            for partition in sorted(consumer.partitions_for_topic(topic) or ()):
                result.append(TopicPartition(topic, partition))
        return result

    async def discover_splits(self, parallelism: int) -> list[Any]:
        # Run to the end even when cancelled, so that every connection it opened is closed.
        return await finish_then_cancel(self._discover_splits())

    async def _discover_splits(self) -> list[Any]:
        consumer = self.consumer("split discovery")
        try:
            await start_client(consumer)
            partitions = await self._partitions(consumer)
            return await self._new_splits(consumer, partitions)
        finally:
            await stop_client(consumer)

    async def discover_new_splits(self, known: list[Any]) -> list[Any]:
        # Run to the end even when cancelled (a job that ends cancels its periodic discovery),
        # so that every connection it opened is closed.
        return await finish_then_cancel(self._discover_new_splits(known))

    async def _discover_new_splits(self, known: list[Any]) -> list[Any]:
        known_ids = {self.split_id(s) for s in known}
        consumer = self.consumer("partition discovery")
        try:
            await start_client(consumer)
            partitions = [
                tp
                for tp in await self._partitions(consumer)
                if (tp.topic, tp.partition) not in known_ids
            ]
            # A partition created while the job runs is read from its beginning.
            return [
                {"topic": tp.topic, "partition": tp.partition, "offset": 0, "stop": None}
                for tp in partitions
            ]
        finally:
            await stop_client(consumer)

    async def _new_splits(
        self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]
    ) -> list[Any]:
        stops: dict[TopicPartition, int | None] = dict.fromkeys(partitions)
        ends: dict[TopicPartition, int] | None = None
        if self.bounded:
            if self.stop_offsets is not None:
                for tp in partitions:
                    stops[tp] = self.stop_offsets.get((tp.topic, tp.partition), 0)
            else:
                ends = await confirmed_end_offsets(consumer, partitions, self)
                stops.update(ends)
        starts = await self._start_offsets(consumer, partitions, ends)
        from_timestamp = (
            int(self.start[1])
            if isinstance(self.start, tuple) and self.start[0] == "timestamp"
            else None
        )
        return [
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "offset": starts[tp],
                "stop": stops[tp],
                # Until a record at or after this time is read, earlier records are skipped.
                "from_timestamp": from_timestamp,
            }
            for tp in partitions
        ]

    async def _start_offsets(
        self,
        consumer: AIOKafkaConsumer,
        partitions: list[TopicPartition],
        ends: dict[TopicPartition, int] | None = None,
    ) -> dict[TopicPartition, int]:
        """Where each partition's read starts; ``ends``: the partitions' confirmed ends, when
        the caller has them already (a bounded source's stops)."""
        if not partitions:
            return {}

        async def confirmed_ends() -> dict[TopicPartition, int]:
            nonlocal ends
            if ends is None:
                ends = await confirmed_end_offsets(consumer, partitions, self)
            return ends

        if self.start == "earliest":
            return await confirmed_beginning_offsets(consumer, partitions, self)
        if self.start == "latest":
            return await confirmed_ends()
        if isinstance(self.start, tuple) and self.start[0] == "timestamp":
            # The broker's answer is a hint: some brokers answer the log start for any time (the
            # reader skips records before the timestamp, see "from_timestamp"), and Tansu 0.6
            # can answer a batch after the first one at or after it (confirmed below).
            at = int(self.start[1])
            found = await consumer.offsets_for_times(dict.fromkeys(partitions, at))
            # A partition with no record at or after the time starts at its end.
            last = {} if all(found.get(tp) for tp in partitions) else await confirmed_ends()
            answers = {tp: (found[tp].offset if found.get(tp) else last[tp]) for tp in partitions}
            checked = await _confirmed(
                answers, lambda tp: _answer_if_nothing_before(tp, answers[tp], at, self)
            )
            too_late = [tp for tp in partitions if checked[tp] < 0]
            if too_late:
                beginnings = await confirmed_beginning_offsets(consumer, too_late, self)
                answers.update(beginnings)
            return answers
        if self.start == "committed":
            if not self.group_id:
                msg = "KafkaSource start='committed' needs a group_id"
                raise ValueError(msg)
            grouped = self.consumer("committed offsets", group_id=self.group_id)
            try:
                await start_client(grouped)
                result = {}
                fallback = (
                    await confirmed_beginning_offsets(consumer, partitions, self)
                    if self.reset == "earliest"
                    else await confirmed_ends()
                )
                for tp in partitions:
                    committed = await grouped.committed(tp)
                    result[tp] = committed if committed is not None else fallback[tp]
                return result
            finally:
                await stop_client(grouped)
        msg = f"unknown start position {self.start!r}: earliest, latest, committed or ('timestamp', ms)"
        raise ValueError(msg)

    def split_id(self, split: Any) -> Any:
        return (split["topic"], split["partition"])

    def assign_split(self, split: Any, index: int, parallelism: int) -> int:
        """Deterministic and even: partitions of a topic go round robin from a topic-dependent
        starting subtask (as Flink's Kafka enumerator does)."""
        start = stable_hash(split["topic"]) % parallelism
        return int((start + split["partition"]) % parallelism)

    def create_reader(self, context: SourceReaderContext) -> SourceReader[Any]:
        return KafkaSourceReader(self, context)


OFFSET_CONFIRM_TIMEOUT_S = 30.0
"""How long confirming a partition's end or beginning by reading may take before the source gives
up."""
MAX_OFFSET_PROBES = 8
"""How many partitions' ends or beginnings are confirmed at once (each by a probe consumer of its
own)."""


async def confirmed_end_offsets(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], source: KafkaSource
) -> dict[TopicPartition, int]:
    """End offsets, confirmed by reading: some brokers answer "latest" with the start of the last
    record batch + 1, which is short of the real log end. Read from there until nothing more comes.

    Raises :class:`InfrastructureError` when the broker delivers nothing from the last reported
    batch within :data:`OFFSET_CONFIRM_TIMEOUT_S`: a bounded source must not stop short of
    the end on a guess."""
    if not partitions:
        return {}
    reported = await consumer.end_offsets(partitions)
    return await _confirmed(reported, lambda tp: _confirm_end(tp, reported[tp], source))


async def confirmed_beginning_offsets(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], source: KafkaSource
) -> dict[TopicPartition, int]:
    """Beginning offsets, confirmed by reading below them: some brokers answer "earliest" with a
    later batch than the partition's first. Tansu 0.6 answers with the batch it stored first,
    and batches of concurrent producers are stored out of offset order, so a read from its
    answer would skip the first batch without a word. A reported beginning above 0 is what a
    read from offset 0 finds: the broker refuses offset 0 when retention deleted the records
    before the reported one, which confirms it.

    Raises :class:`InfrastructureError` when the broker neither refuses nor delivers within
    :data:`OFFSET_CONFIRM_TIMEOUT_S`."""
    if not partitions:
        return {}
    reported = await consumer.beginning_offsets(partitions)
    return await _confirmed(reported, lambda tp: _confirm_beginning(tp, reported[tp], source))


async def _confirmed(
    reported: dict[TopicPartition, int], confirm: Callable[[TopicPartition], Awaitable[int]]
) -> dict[TopicPartition, int]:
    """``reported``, with each offset above 0 replaced by what ``confirm`` finds for it."""
    result = dict(reported)
    # A probe's empty fetch takes up to 500 ms: the partitions are confirmed together, each by
    # its own probe, not one after another; a bounded number of probes at a time, so a topic of
    # many partitions does not open a client per partition at once.
    to_confirm = [tp for tp, offset in reported.items() if offset > 0]
    probes = asyncio.Semaphore(MAX_OFFSET_PROBES)

    async def confirm_one(tp: TopicPartition) -> int:
        async with probes:
            return await confirm(tp)

    outcomes = await asyncio.gather(*(confirm_one(tp) for tp in to_confirm), return_exceptions=True)
    for tp, outcome in zip(to_confirm, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            raise outcome
        result[tp] = outcome
    return result


async def _confirm_beginning(tp: TopicPartition, reported: int, source: KafkaSource) -> int:
    """The first offset of ``tp`` at or below the ``reported`` beginning that the broker serves."""
    record, position = await _first_from(tp, 0, source, f"where it begins (reported: {reported})")
    if record is not None:
        first: int = record.offset
        return min(first, reported)
    return reported if position is None else min(position, reported)


async def _first_from(
    tp: TopicPartition, offset: int, source: KafkaSource, what: str
) -> tuple[Any | None, int | None]:
    """What a probe that does not reset out-of-range offsets reads first from ``offset``: the
    record; or the position past ``offset`` when the broker served it without records (a
    transaction marker, aborted records); or (None, None) when the broker refused it (deleted
    by retention). Raises :class:`InfrastructureError` naming ``what`` was to be confirmed when
    the broker does neither within :data:`OFFSET_CONFIRM_TIMEOUT_S`."""
    probe = source.consumer("offset probe", auto_offset_reset="none")
    await start_client(probe)
    try:
        probe.assign([tp])
        probe.seek(tp, offset)
        deadline = asyncio.get_running_loop().time() + OFFSET_CONFIRM_TIMEOUT_S
        while True:
            try:
                batch = await probe.getmany(tp, timeout_ms=500, max_records=1)
            except OffsetOutOfRangeError:
                return None, None
            records = batch.get(tp)
            if records:
                return records[0], None
            position: int = await probe.position(tp)
            if position > offset:
                return None, position
            if asyncio.get_running_loop().time() > deadline:
                msg = (
                    f"Kafka source {source.name()!r}: cannot confirm {what} of {tp.topic}"
                    f"[{tp.partition}]: the broker {source.bootstrap_servers} neither refused nor "
                    f"delivered offset {offset} within {OFFSET_CONFIRM_TIMEOUT_S:.0f}s (is the "
                    "broker overloaded?)"
                )
                raise InfrastructureError(msg)
    finally:
        await stop_client(probe)


async def _confirm_end(tp: TopicPartition, reported: int, source: KafkaSource) -> int:
    probe = source.consumer("end offset probe")
    await start_client(probe)
    try:
        return await _read_to_end(probe, tp, reported, source)
    finally:
        await stop_client(probe)


async def _answer_if_nothing_before(
    tp: TopicPartition, answer: int, timestamp: int, source: KafkaSource
) -> int:
    """``answer`` if the record before it is older than ``timestamp`` (or there is none); -1 if
    the broker answered late, which a read from the partition's beginning then makes up for."""
    what = f"where it reaches timestamp {timestamp} (answered: {answer})"
    before, _ = await _first_from(tp, answer - 1, source, what)
    if before is not None and before.offset < answer and before.timestamp >= timestamp:
        return -1
    return answer


async def _read_to_end(
    probe: AIOKafkaConsumer, tp: TopicPartition, reported: int, source: KafkaSource
) -> int:
    """The end of ``tp``: read from the record before the ``reported`` end until nothing follows.

    That record exists, so the first fetches must reach it: either they return records, or the
    consumer's position moves past it (a transaction marker, which fetches do not return). Until
    then an empty fetch only means a busy broker, and the probe waits. Once reached, the end is
    confirmed by the high watermark of the fetch that delivered it (the log's end when the
    broker answered), or else by an empty fetch: a read_committed probe stops at the last stable
    offset, below the high watermark while a transaction is open."""
    start = reported - 1
    probe.assign([tp])
    probe.seek(tp, start)
    end = reported
    reached = False
    deadline = asyncio.get_running_loop().time() + OFFSET_CONFIRM_TIMEOUT_S
    while True:
        batch = await probe.getmany(tp, timeout_ms=500)
        records = batch.get(tp, [])
        if records:
            last: int = records[-1].offset
            end = max(end, last + 1)
            if _at_high_watermark(probe, tp, end):
                return end
            probe.seek(tp, end)
            reached = True
            continue
        position: int = await probe.position(tp)
        if position > start:
            end = max(end, position)
            if reached or _at_high_watermark(probe, tp, end):
                return end
            reached = True
            continue
        if asyncio.get_running_loop().time() > deadline:
            msg = (
                f"Kafka source {source.name()!r}: cannot confirm where {tp.topic}[{tp.partition}] "
                f"ends: the broker {source.bootstrap_servers} reported offset {reported} but "
                f"delivered nothing from offset {start} within "
                f"{OFFSET_CONFIRM_TIMEOUT_S:.0f}s; a bounded source stops only at a "
                "confirmed end (is the broker overloaded or the record deleted by retention?)"
            )
            raise InfrastructureError(msg)


def _at_high_watermark(probe: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> bool:
    """True when the last fetch of ``tp`` said the log ends at or before ``offset``."""
    high: int | None = probe.highwater(tp)
    return high is not None and offset >= high


class KafkaSourceReader(SourceReader[Any]):
    """Reads the partitions assigned to one subtask (see the module docstring)."""

    watermarks_per_split = True

    def __init__(self, source: KafkaSource, context: SourceReaderContext) -> None:
        self.source = source
        self.context = context
        self.splits: dict[tuple[str, int], dict[str, Any]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._dead_letters: AIOKafkaProducer | None = None
        self._dead_letter_queue: list[tuple[bytes | None, bytes | None, list[Any]]] = []
        self._committer: AIOKafkaConsumer | None = None
        self._queue: deque[tuple[TopicPartition, list[Any] | int]] = deque()
        """Fetched records per partition, in order; an int instead of records says that the
        consumer's position moved there without records (transaction markers, aborted records:
        a partition that ends with a marker would otherwise never reach its stop offset)."""
        self._fetched_to: dict[TopicPartition, int] = {}
        """Per assigned partition, the offset after the last record or position queued."""
        self._room = asyncio.Event()
        self._room.set()
        self._fetch_task: asyncio.Task[None] | None = None
        self._fetch_error: BaseException | None = None
        self._assignment_changed = asyncio.Event()
        self._value = _deserializer(source.deserializer)
        self._batch_value = _value_deserializer(source.deserializer)
        self._key = _deserializer(source.key_deserializer)
        self._last_split: tuple[str, int] | None = None
        self._position = ""
        self.highwater: dict[tuple[str, int], int] = {}
        self.skipped = 0
        self.tombstones_skipped = 0

    # ---- splits

    def add_splits(self, splits: list[Any]) -> None:
        for split in splits:
            split = dict(split)
            self.splits[(split["topic"], split["partition"])] = split
        if self._consumer is not None:
            self._assign()
            self._assignment_changed.set()

    async def _reconcile_stops(self) -> None:
        """Restored splits carry the boundedness of the run that wrote them: this run's wins.

        A bounded run restored from an unbounded one stops at the end offsets seen now (or the
        given ``stop_offsets``); an unbounded run restored from a bounded one reads on forever.
        """
        source = self.source
        if not source.bounded:
            for split in self.splits.values():
                split["stop"] = None
            return
        open_ended = [s for s in self.splits.values() if s["stop"] is None]
        if not open_ended:
            return
        assert self._consumer is not None
        if source.stop_offsets is not None:
            for split in open_ended:
                split["stop"] = source.stop_offsets.get((split["topic"], split["partition"]), 0)
            return
        partitions = [TopicPartition(s["topic"], s["partition"]) for s in open_ended]
        ends = await confirmed_end_offsets(self._consumer, partitions, source)
        for split, tp in zip(open_ended, partitions, strict=True):
            split["stop"] = max(ends[tp], split["offset"])

    def _active(self) -> list[dict[str, Any]]:
        return [s for s in self.splits.values() if s["stop"] is None or s["offset"] < s["stop"]]

    def _assign(self) -> None:
        assert self._consumer is not None
        active = self._active()
        self._consumer.assign([TopicPartition(s["topic"], s["partition"]) for s in active])
        self._fetched_to.clear()
        for split in active:
            tp = TopicPartition(split["topic"], split["partition"])
            self._consumer.seek(tp, split["offset"])
            self._fetched_to[tp] = split["offset"]

    async def start(self) -> None:
        if not self.splits and self.source.bounded:
            return
        record_batches.install()
        self._consumer = self.source.consumer(
            "reader",
            isolation_level="read_committed",
            value_deserializer=record_batches.whole_batches,
        )
        await start_client(self._consumer)
        if self.source.group_id:
            self._committer = self.source.consumer("offset commits", group_id=self.source.group_id)
            await start_client(self._committer)
        if self.source.on_error == "dead-letter":
            self._dead_letters = self.source.clients.producer("dead letters", acks="all")
            await start_client(self._dead_letters)
        for split in self.splits.values():
            if split["offset"] is None:
                split["offset"] = 0
        await self._reconcile_stops()
        self._assign()
        self._fetch_task = asyncio.get_running_loop().create_task(
            self._fetch_loop(), name=f"kafka-fetch {self.context.source_name}"
        )

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while True:
                if not consumer.assignment():
                    self._assignment_changed.clear()
                    await self._assignment_changed.wait()
                    continue
                await self._send_dead_letters()
                while len(self._queue) >= MAX_QUEUED_BATCHES:
                    self._room.clear()
                    await self._room.wait()
                fetched = await consumer.getmany(timeout_ms=200, max_records=FETCH_CHUNKS)
                moved = False
                for tp, items in fetched.items():
                    records = record_batches.records_of(items)
                    if records:
                        self._queue.append((tp, records))
                        self._fetched_to[tp] = records[-1].offset + 1
                for tp in consumer.assignment():
                    high = consumer.highwater(tp)
                    if high is not None:
                        self.highwater[(tp.topic, tp.partition)] = high
                    if tp not in fetched and tp in self._fetched_to:
                        position: int = await consumer.position(tp)
                        if position > self._fetched_to[tp]:
                            self._queue.append((tp, position))
                            self._fetched_to[tp] = position
                            moved = True
                if fetched or moved:
                    self.context.notify_available()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fetch_error = exc
            self.context.notify_available()

    # ---- polling

    def poll(self, max_records: int) -> list[Any] | tuple[list[Any], list[int]] | EndOfInput | None:
        if self._fetch_error is not None:
            error, self._fetch_error = self._fetch_error, None
            msg = f"{self.context.source_name}: fetching from Kafka failed: {error}"
            raise ConnectionError(msg) from error
        if not self._active():
            # Bounded: every partition reached its stop offset (or none was assigned). Unbounded:
            # idle until discovery assigns a partition.
            return END_OF_INPUT if self.source.bounded else None
        while self._queue:
            tp, records = self._queue.popleft()
            if len(self._queue) < MAX_QUEUED_BATCHES:
                self._room.set()
            split = self.splits.get((tp.topic, tp.partition))
            if split is None:
                continue
            if isinstance(records, int):
                self._skip_to(split, records)
                continue
            if len(records) > max_records:
                self._queue.appendleft((tp, records[max_records:]))
                records = records[:max_records]
            result = self._convert(split, records)
            if result is not None:
                return result
        # Converting may have moved every partition to its stop offset without emitting anything
        # (all records skipped): say so now, as no fetch will wake the task again.
        if self.source.bounded and not self._active():
            return END_OF_INPUT
        return None

    def _skip_to(self, split: dict[str, Any], position: int) -> None:
        """The consumer moved to ``position`` past offsets that hold no records for us."""
        stop = split["stop"]
        if position <= split["offset"]:
            return
        split["offset"] = position if stop is None else min(position, stop)
        if stop is not None and split["offset"] >= stop:
            self._assign()

    def _convert(
        self, split: dict[str, Any], records: list[Any]
    ) -> tuple[list[Any], list[int]] | None:
        converted = self._convert_batch(split, records)
        if converted is None:
            converted = self._convert_each(split, records)
        if split["stop"] is not None and split["offset"] >= split["stop"]:
            self._assign()
        if not converted[0]:
            return None
        self._last_split = (split["topic"], split["partition"])
        self._position = f"{split['topic']}[{split['partition']}] offsets {records[0].offset}-{split['offset'] - 1}"
        return converted

    def _convert_batch(
        self, split: dict[str, Any], records: list[Any]
    ) -> tuple[list[Any], list[int]] | None:
        """The common case in one pass per batch, no per-record bookkeeping: bare values, no
        start timestamp to reach, no tombstone and nothing that fails to deserialise in the
        batch (the offsets of a fetched batch ascend, so its part to emit is one slice). None
        when the batch needs :meth:`_convert_each`, which has not changed the split then."""
        if self.source.record_format != "value" or split.get("from_timestamp") is not None:
            return None
        start, stop = split["offset"], split["stop"]
        begin = 0 if records[0].offset >= start else bisect_left(records, start, key=_offset)
        end = (
            len(records)
            if stop is None or records[-1].offset < stop
            else bisect_left(records, stop, key=_offset)
        )
        if begin >= end:
            return None
        batch = records if begin == 0 and end == len(records) else records[begin:end]
        raw = [record.value for record in batch]
        if None in raw:
            return None
        value_of = self._batch_value
        try:
            values = raw if value_of is None else list(map(value_of, raw))
        except Exception:
            return None  # found and reported at its offset by the per-record path
        split["offset"] = batch[-1].offset + 1
        return values, [record.timestamp for record in batch]

    def _convert_each(
        self, split: dict[str, Any], records: list[Any]
    ) -> tuple[list[Any], list[int]]:
        """Record by record: skips what the source drops (before the start timestamp,
        tombstones, undeserialisable records), builds :class:`KafkaRecord` when asked for."""
        stop = split["stop"]
        values: list[Any] = []
        stamps: list[int] = []
        value_of = self._value
        as_record = self.source.record_format == "record"
        for record in records:
            if record.offset < split["offset"]:
                continue  # re-delivered after a seek: already emitted
            if stop is not None and record.offset >= stop:
                break
            if split.get("from_timestamp") is not None:
                if record.timestamp < split["from_timestamp"]:
                    split["offset"] = record.offset + 1
                    continue
                split["from_timestamp"] = None
            if record.value is None and self._tombstone(split, record):
                split["offset"] = record.offset + 1
                continue
            try:
                value = None if record.value is None else value_of(record.value)
            except Exception as exc:
                self._bad_record(split, record, exc)
                split["offset"] = record.offset + 1
                continue
            if as_record:
                value = KafkaRecord(
                    split["topic"],
                    split["partition"],
                    record.offset,
                    record.timestamp,
                    self._key(record.key) if record.key is not None else None,
                    value,
                    tuple(record.headers or ()),
                )
            values.append(value)
            stamps.append(record.timestamp)
            split["offset"] = record.offset + 1
        return values, stamps

    def _tombstone(self, split: dict[str, Any], record: Any) -> bool:
        """Applies ``tombstones`` to a record without a value; True if it is not emitted."""
        mode = self.source.tombstones
        if mode == "emit":
            return False
        where = f"topic {split['topic']} partition {split['partition']} offset {record.offset}"
        if mode == "fail":
            msg = (
                f"a tombstone (key {record.key!r}, no value) at {where}; KafkaSource(tombstones="
                "'skip') drops tombstones, tombstones='emit' with record_format='record' emits them"
            )
            raise DeserializationError(msg)
        if self.tombstones_skipped == 0:
            log.info(
                "%s: skipping tombstones (records without a value), the first at %s; they are "
                "counted in KafkaSource.tombstones_skipped (tombstones='emit' or 'fail' to change)",
                self.context.source_name,
                where,
            )
        self.tombstones_skipped += 1
        self.source.tombstones_skipped += 1
        return True

    def _bad_record(self, split: dict[str, Any], record: Any, exc: Exception) -> None:
        where = f"topic {split['topic']} partition {split['partition']} offset {record.offset}"
        mode = self.source.on_error
        if mode == "fail":
            msg = f"cannot deserialise the record at {where}: {type(exc).__name__}: {exc}"
            raise DeserializationError(msg) from exc
        self.skipped += 1
        self.source.skipped += 1
        if mode == "dead-letter":
            assert self._dead_letters is not None and self.source.dead_letter_topic
            headers = [
                ("source.topic", split["topic"].encode()),
                ("source.partition", str(split["partition"]).encode()),
                ("source.offset", str(record.offset).encode()),
                ("error", f"{type(exc).__name__}: {exc}".encode()[:1000]),
            ]
            # Sent by the fetch loop and awaited before the next snapshot, so a checkpoint never
            # moves past a dead letter that was not acknowledged.
            self._dead_letter_queue.append((record.value, record.key, headers))
        else:
            log.warning(
                "%s: skipped undeserialisable record at %s: %s",
                self.context.source_name,
                where,
                exc,
            )

    def split_of_last_poll(self) -> Any:
        return self._last_split

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits.values()]

    async def _send_dead_letters(self) -> None:
        if self._dead_letters is None or not self._dead_letter_queue:
            return
        queue, self._dead_letter_queue = self._dead_letter_queue, []
        topic = self.source.dead_letter_topic
        assert topic is not None
        futures = [
            await self._dead_letters.send(topic, value, key=key, headers=headers)
            for value, key, headers in queue
        ]
        for future in futures:
            await future

    async def prepare_snapshot(self) -> None:
        # Dead letters are acknowledged before the checkpoint that moves past them.
        await self._send_dead_letters()

    def lag(self) -> dict[str, int]:
        """Records behind the partition's high watermark, per ``topic[partition]``."""
        return {
            f"{t}[{p}]": max(0, self.highwater.get((t, p), s["offset"]) - s["offset"])
            for (t, p), s in self.splits.items()
        }

    def describe_position(self) -> str | None:
        return self._position or None

    async def notify_checkpoint_complete(self, checkpoint_id: int, splits: list[Any]) -> None:
        """Commit the checkpoint's offsets to the consumer group, for lag tools only: the
        checkpoint is the source of truth, so a failed commit is logged, never fatal."""
        if self._committer is None:
            return
        offsets = {
            TopicPartition(s["topic"], s["partition"]): s["offset"]
            for s in splits
            if s["offset"] is not None
        }
        if not offsets:
            return
        try:
            if set(self._committer.assignment()) != set(offsets):
                self._committer.assign(list(offsets))
            await self._committer.commit(offsets)
        except Exception as exc:
            log.warning("committing offsets to group %s failed: %s", self.source.group_id, exc)

    async def close(self) -> None:
        if self._fetch_task is not None:
            self._fetch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._fetch_task
        if self._dead_letters is not None:
            with contextlib.suppress(Exception):
                await stop_client(self._dead_letters)
        for client in (self._committer, self._consumer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await stop_client(client)
