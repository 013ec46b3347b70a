"""Kafka sink on aiokafka: at-least-once (flush before each barrier) and exactly-once.

Exactly-once writes in Kafka transactions committed when a checkpoint completes (see
:mod:`connectors.kafka.exactly_once`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from actors.infrastructure import InfrastructureError
from connectors.kafka.clients import KafkaClients, start_client, stop_client
from connectors.kafka.partitioner import KeyPartitioner
from runtime.api.functions import RuntimeContext
from runtime.api.sinks import Sink, SinkWriter


def _serializer(kind: str | Callable[[Any], bytes]) -> Callable[[Any], bytes | None]:
    if callable(kind):
        return kind
    if kind == "json":
        return lambda v: None if v is None else orjson.dumps(v)
    if kind == "text":
        return lambda v: None if v is None else str(v).encode("utf-8")
    if kind == "bytes":
        return lambda v: v
    if kind == "msgpack":
        return lambda v: None if v is None else msgpack.packb(v, use_bin_type=True)
    msg = f"unknown serializer {kind!r}: use json, text, bytes, msgpack or a function"
    raise ValueError(msg)


class DeliveryGuarantee:
    NONE = "none"
    AT_LEAST_ONCE = "at-least-once"
    EXACTLY_ONCE = "exactly-once"


class KafkaSink(Sink):
    """Writes records to Kafka.

    - ``topic``: a topic name, or a function of the record giving its topic.
    - ``key``: a function of the record giving its key, or None. A keyed record goes to the
      partition Kafka's default partitioner gives its serialised key (murmur2, the partition a
      Java producer chooses); records without a key fill one batch at a time of a sticky
      partition, which moves round robin from batch to batch (as Java's sticky partitioner).
    - ``serializer`` / ``key_serializer``: ``"json"``, ``"text"``, ``"bytes"``, ``"msgpack"`` or a
      function returning bytes.
    - ``guarantee``: ``"none"`` (fire and forget), ``"at-least-once"`` (every send is acknowledged
      before a checkpoint's barrier passes) or ``"exactly-once"`` (a Kafka transaction per
      checkpoint, see :class:`connectors.kafka.exactly_once.ExactlyOnceWriter`).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str | Callable[[Any], str],
        *,
        key: Callable[[Any], Any] | None = None,
        serializer: str | Callable[[Any], bytes] = "json",
        key_serializer: str | Callable[[Any], bytes] = "text",
        guarantee: str = DeliveryGuarantee.AT_LEAST_ONCE,
        transactional_id_prefix: str | None = None,
        transaction_timeout_ms: int = 900_000,
        transactional_id_pool: int = 3,
        broker_max_transaction_timeout_ms: int | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        if guarantee not in ("none", "at-least-once", "exactly-once"):
            msg = f"guarantee must be none, at-least-once or exactly-once, got {guarantee!r}"
            raise ValueError(msg)
        if guarantee == DeliveryGuarantee.EXACTLY_ONCE and not transactional_id_prefix:
            msg = (
                "an exactly-once KafkaSink needs transactional_id_prefix, unique to this job: two "
                "jobs sharing a prefix fence each other's transactions"
            )
            raise ValueError(msg)
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.key = key
        self.serialize = _serializer(serializer)
        self.serialize_key = _serializer(key_serializer)
        self.guarantee = guarantee
        self.transactional_id_prefix = transactional_id_prefix
        self.transaction_timeout_ms = transaction_timeout_ms
        self.transactional_id_pool = transactional_id_pool
        self.broker_max_transaction_timeout_ms = broker_max_transaction_timeout_ms
        """The broker's transaction.max.timeout.ms if known (Kafka's default, 15 min, otherwise)."""
        self.clients = KafkaClients(bootstrap_servers, client_options, owner=self.name())
        """Creates every client of this sink (see :mod:`connectors.kafka.clients`)."""
        self.partitioner = KeyPartitioner()
        """Kafka's default partitioning, each key's hash memoised (shared by the subtasks)."""
        self.initialised_ids: set[str] = set()
        """Transactional ids this process has initialised (exactly-once): their earlier epochs
        are its own attempts', not another run's."""

    def name(self) -> str:
        topic = self.topic if isinstance(self.topic, str) else "by record"
        return f"Kafka({topic})"

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        if self.guarantee == DeliveryGuarantee.EXACTLY_ONCE:
            from connectors.kafka.exactly_once import ExactlyOnceWriter

            writer: SinkWriter = ExactlyOnceWriter(self, context)
            return writer
        return _KafkaWriter(self, context)

    async def send(
        self, producer: AIOKafkaProducer, values: list[Any]
    ) -> list[asyncio.Future[Any]]:
        """Hands ``values`` to ``producer`` as record batches, one per topic and partition (more
        where one fills up), and returns one future per batch: its acknowledgement covers every
        record in it. Partitions are Kafka's default ones (:mod:`connectors.kafka.partitioner`);
        records without a key share one sticky partition per topic, which moves on round robin
        with each batch of them. Records keep their order within each partition. A
        transactional producer adds every partition to its transaction as it queues the
        partition's first batch."""
        topic = self.topic
        if isinstance(topic, str):
            return await self._send_to_topic(producer, topic, values)
        by_topic: dict[str, list[Any]] = {}
        for value in values:
            name = topic(value)
            group = by_topic.get(name)
            if group is None:
                by_topic[name] = [value]
            else:
                group.append(value)
        futures: list[asyncio.Future[Any]] = []
        for name, group in by_topic.items():
            futures += await self._send_to_topic(producer, name, group)
        return futures

    async def _send_to_topic(
        self, producer: AIOKafkaProducer, topic: str, values: list[Any]
    ) -> list[asyncio.Future[Any]]:
        """:meth:`send` for records of one topic: keys serialised and partitioned a batch at a
        time, then one pass serialising each value and appending it to its partition's batch.

        A value is serialised right where the batch copies it in, not into a list of the whole
        batch first: orjson returns each value in a buffer of at least 1 KiB shrunk to size, and
        holding hundreds of those at once can make glibc's malloc hand the top of its heap back
        to the system and fault it in again, about a page fault per record (measured in a small
        process: 20 times the cost of the serialisation)."""
        count = len(await producer.partitions_for(topic))
        partitioner = self.partitioner
        serialize = self.serialize
        if self.key is None:
            keys: list[bytes | None] = [None] * len(values)
        else:
            key_of, serialize_key = self.key, self.serialize_key
            keys = [serialize_key(key_of(v)) for v in values]
        partitions = partitioner.partitions(keys, count)
        builders: list[Any] = [None] * count
        futures: list[asyncio.Future[Any]] = []
        sticky = partitioner.sticky(topic, count)
        keyless = False
        for partition, key, record in zip(partitions, keys, values, strict=True):
            value = serialize(record)
            if partition < 0:
                if value is None:
                    msg = (
                        f"a record for topic {topic} has neither key nor value: Kafka needs one "
                        "of them"
                    )
                    raise ValueError(msg)
                partition = sticky
                keyless = True
            builder = builders[partition]
            if builder is None:
                builder = builders[partition] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:
                # Full: queue it, and go on in a new batch (keyless records: on the next partition).
                futures.append(await producer.send_batch(builder, topic, partition=partition))
                builders[partition] = None
                if key is None:
                    partitioner.next_sticky(topic, count)
                    partition = sticky = partitioner.sticky(topic, count)
                builder = builders[partition]
                if builder is None:
                    builder = builders[partition] = producer.create_batch()
                # An empty batch takes any record (one larger than a batch goes alone).
                builder.append(key=key, value=value, timestamp=None)
        for partition, builder in enumerate(builders):
            if builder is not None:
                futures.append(await producer.send_batch(builder, topic, partition=partition))
        if keyless:
            partitioner.next_sticky(topic, count)
        return futures


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _abandon(futures: list[asyncio.Future[Any]]) -> None:
    """Sends nobody will await any more (the writer failed or closes): their outcomes are
    retrieved, or asyncio logs every failed one when it is collected (a broker that went away
    fails thousands at once)."""
    for future in futures:
        if future.done():
            _retrieve(future)
        else:
            future.add_done_callback(_retrieve)


MAX_UNACKNOWLEDGED_BATCHES = 256
"""Batches a writer sends before it awaits their acknowledgements (bounds memory and the
records a failure can leave unacknowledged)."""


class _KafkaWriter(SinkWriter):
    """Guarantee none or at-least-once."""

    def __init__(self, sink: KafkaSink, context: RuntimeContext) -> None:
        self.sink = sink
        self.context = context
        self.producer: AIOKafkaProducer | None = None
        self._inflight: list[asyncio.Future[Any]] = []

    async def open(self) -> None:
        # Duplicates are allowed at least once; the idempotent producer is not needed (and
        # some Kafka-protocol brokers reject its InitProducerId v0).
        self.producer = self.sink.clients.producer(
            "sink", acks="all" if self.sink.guarantee != DeliveryGuarantee.NONE else 1
        )
        await start_client(self.producer)

    @contextlib.contextmanager
    def _broker_errors(self) -> Iterator[None]:
        """The client's errors while writing (the broker went away, a topic it cannot find) as
        the one line that names the sink and where it writes."""
        try:
            yield
        except KafkaError as exc:
            # aiokafka's errors start with their class name.
            detail = str(exc) if str(exc).startswith(type(exc).__name__) else repr(exc)
            msg = (
                f"KafkaSink {self.context.operator_name!r} "
                f"(subtask {self.context.subtask_index + 1}/{self.context.parallelism}): "
                f"writing to {self.sink.name()} on {self.sink.bootstrap_servers} failed "
                f"({detail}): check that the broker runs and the topic exists"
            )
            raise InfrastructureError(msg) from exc

    async def write(self, values: list[Any]) -> None:
        assert self.producer is not None
        with self._broker_errors():
            self._inflight += await self.sink.send(self.producer, values)
        if len(self._inflight) > MAX_UNACKNOWLEDGED_BATCHES:
            await self._await_acks()

    async def _flush_and_await_acks(self) -> None:
        assert self.producer is not None
        with self._broker_errors():
            await self.producer.flush()
        await self._await_acks()

    async def _await_acks(self) -> None:
        inflight, self._inflight = self._inflight, []
        try:
            with self._broker_errors():
                for future in inflight:
                    await future  # raises the broker's error: nothing acknowledged is lost silently
        except BaseException:
            _abandon(inflight)
            raise

    async def snapshot_state(self, checkpoint_id: int) -> list[Any]:
        if self.sink.guarantee == DeliveryGuarantee.AT_LEAST_ONCE:
            await self._flush_and_await_acks()
        return []

    async def finish(self) -> None:
        await self._flush_and_await_acks()

    async def close(self) -> None:
        _abandon(self._inflight)
        self._inflight = []
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await stop_client(self.producer)
            self.producer = None
