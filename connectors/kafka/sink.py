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
      Java producer chooses); records without a key go to a sticky partition, which moves round
      robin after each buffer of them and each full batch (as Java's sticky partitioner moves
      with its batches).
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

    def partition_batches(self, producer: AIOKafkaProducer) -> PartitionBatches:
        """The batches of one writer's ``producer`` (of one transaction, exactly-once)."""
        return PartitionBatches(self, producer)


SINK_MAX_BATCH_BYTES = 512 * 1024
"""Largest record batch the sink's producers build (aiokafka's ``max_batch_size``; a
``client_options`` value wins). aiokafka's default, 16 KiB, caps what a partition's batch carries
while the previous one is on its way; Kafka brokers take batches up to 1 MiB by default."""


SINK_FILLING_BYTES = 32 << 20
"""At most this many bytes fill batches at once, over every partition of a writer (as the Java
producer's ``buffer.memory``): past it, the writer sends them all and waits for room."""


class PartitionBatches:
    """A writer's records on their way to Kafka, as record batches, one per topic and partition
    at a time.

    aiokafka sends one request per broker at a time, and a request carries one batch per
    partition. So a partition's records go out in a batch as soon as its previous batch is
    acknowledged, and while it is not they fill the partition's next batch, up to the producer's
    ``max_batch_size``: a slow round trip then carries more records per request, instead of the
    writer waiting once per buffer for room in the producer. A full batch waits for its
    predecessor's acknowledgement (backpressure). Records keep their order within each partition.

    Partitions are Kafka's default ones (:mod:`connectors.kafka.partitioner`); records without a
    key share one sticky partition per topic, which moves on round robin after each buffer and
    each full batch of them. A transactional producer adds every partition to its transaction as
    it queues the partition's first batch. :meth:`flush` sends what is filling and hands over
    every acknowledgement to await: the writer awaits them before a barrier passes."""

    def __init__(self, sink: KafkaSink, producer: AIOKafkaProducer) -> None:
        self.sink = sink
        self.producer = producer
        self._filling: dict[tuple[str, int], Any] = {}
        """(topic, partition) → the batch filling while the partition's last batch is on its way."""
        self._last: dict[tuple[str, int], asyncio.Future[Any]] = {}
        """(topic, partition) → the acknowledgement of its last batch sent."""
        self._watched: set[tuple[str, int]] = set()
        """Partitions whose last batch sends the filling one when it is acknowledged."""
        self._sending: set[asyncio.Task[None]] = set()
        self._acks: list[asyncio.Future[Any]] = []
        self._failure: BaseException | None = None
        self._closed = False

    @property
    def unacknowledged(self) -> int:
        """Batches handed over and not yet taken by :meth:`take_acks`."""
        return len(self._acks)

    @property
    def filling_bytes(self) -> int:
        """Bytes in the batches filling, over every partition."""
        return sum(builder.size() for builder in self._filling.values())

    async def add(self, values: list[Any]) -> None:
        """Queue ``values``: each goes into its partition's batch; the batches of partitions with
        nothing on its way start at once."""
        if self._failure is not None:
            raise self._failure
        topic = self.sink.topic
        if isinstance(topic, str):
            await self._add_to_topic(topic, values)
            return
        by_topic: dict[str, list[Any]] = {}
        for value in values:
            name = topic(value)
            group = by_topic.get(name)
            if group is None:
                by_topic[name] = [value]
            else:
                group.append(value)
        for name, group in by_topic.items():
            await self._add_to_topic(name, group)

    async def _add_to_topic(self, topic: str, values: list[Any]) -> None:
        """:meth:`add` for records of one topic: keys serialised and partitioned a batch at a
        time, then one pass serialising each value and appending it to its partition's batch.

        A value is serialised right where the batch copies it in, not into a list of the whole
        batch first: orjson returns each value in a buffer of at least 1 KiB shrunk to size, and
        holding hundreds of those at once can make glibc's malloc hand the top of its heap back
        to the system and fault it in again, about a page fault per record (measured in a small
        process: 20 times the cost of the serialisation)."""
        producer = self.producer
        count = len(await producer.partitions_for(topic))
        sink = self.sink
        partitioner = sink.partitioner
        serialize = sink.serialize
        if sink.key is None:
            keys: list[bytes | None] = [None] * len(values)
        else:
            key_of, serialize_key = sink.key, sink.serialize_key
            keys = [serialize_key(key_of(v)) for v in values]
        partitions = partitioner.partitions(keys, count)
        filling = self._filling
        touched: set[int] = set()
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
            builder = filling.get((topic, partition))
            if builder is None:
                builder = filling[(topic, partition)] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:
                # Full: it goes once its predecessor is acknowledged, and the record starts a new
                # batch (keyless records: on the next partition).
                await self._send_full((topic, partition), builder)
                if key is None:
                    partitioner.next_sticky(topic, count)
                    partition = sticky = partitioner.sticky(topic, count)
                builder = filling.get((topic, partition))
                if builder is None:
                    builder = filling[(topic, partition)] = producer.create_batch()
                # An empty batch takes any record (one larger than a batch goes alone).
                builder.append(key=key, value=value, timestamp=None)
            touched.add(partition)
        if keyless:
            partitioner.next_sticky(topic, count)
        for partition in touched:
            self._send_when_free((topic, partition))
        if self.filling_bytes > SINK_FILLING_BYTES:
            await self._send_filling()

    async def _send_full(self, tp: tuple[str, int], builder: Any) -> None:
        last = self._last.get(tp)
        if last is not None and not last.done():
            # Its acknowledgement may send this very batch (see _send_when_free).
            await asyncio.wait([last])
        if self._filling.get(tp) is builder:
            self._start_sending(tp)
        if self._failure is not None:
            raise self._failure

    def _send_when_free(self, tp: tuple[str, int]) -> None:
        """Send ``tp``'s filling batch now if its last one is acknowledged, else when it is."""
        if self._closed or tp not in self._filling:
            return
        last = self._last.get(tp)
        if last is None or last.done():
            self._start_sending(tp)
        elif tp not in self._watched:
            self._watched.add(tp)
            last.add_done_callback(lambda _: self._on_acknowledged(tp))

    def _on_acknowledged(self, tp: tuple[str, int]) -> None:
        self._watched.discard(tp)
        self._send_when_free(tp)

    def _start_sending(self, tp: tuple[str, int]) -> None:
        """Hand ``tp``'s filling batch to the producer; its acknowledgement becomes the
        partition's last at once, so that no later batch of the partition overtakes it."""
        builder = self._filling.pop(tp)
        acknowledged: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        acknowledged.add_done_callback(self._note_failure)
        self._last[tp] = acknowledged
        self._acks.append(acknowledged)
        task = asyncio.get_running_loop().create_task(self._send(tp, builder, acknowledged))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(
        self, tp: tuple[str, int], builder: Any, acknowledged: asyncio.Future[Any]
    ) -> None:
        try:
            delivery = await self.producer.send_batch(builder, tp[0], partition=tp[1])
        except asyncio.CancelledError:
            acknowledged.cancel()
            raise
        except Exception as exc:
            if not acknowledged.done():
                acknowledged.set_exception(exc)
            return
        delivery.add_done_callback(lambda done: _pass_on(done, acknowledged))

    def _note_failure(self, acknowledged: asyncio.Future[Any]) -> None:
        if not acknowledged.cancelled() and acknowledged.exception() is not None:
            self._failure = self._failure or acknowledged.exception()

    async def flush(self) -> list[asyncio.Future[Any]]:
        """Send every batch filling now, and take the acknowledgements of every batch sent since
        the last :meth:`take_acks` (awaiting them raises the broker's error, if any)."""
        await self._send_filling()
        return self.take_acks()

    async def _send_filling(self) -> None:
        """Hand every filling batch to the producer, and wait until it took them."""
        while self._sending or self._filling:
            if self._sending:
                await asyncio.wait(set(self._sending))
                continue
            # Nothing is being handed over: sending each filling batch now keeps every
            # partition's order (the producer queues it behind the partition's last one).
            for tp in list(self._filling):
                self._start_sending(tp)

    def take_acks(self) -> list[asyncio.Future[Any]]:
        acks, self._acks = self._acks, []
        return acks

    def close(self) -> None:
        """No more sends: what is filling is dropped (a writer closes after a failure or once
        everything was flushed) and every outcome retrieved."""
        self._closed = True
        self._filling.clear()
        for task in self._sending:
            task.cancel()
        _abandon(self.take_acks())


def _pass_on(done: asyncio.Future[Any], acknowledged: asyncio.Future[Any]) -> None:
    if acknowledged.done():
        return
    if done.cancelled():
        acknowledged.cancel()
    elif done.exception() is not None:
        acknowledged.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        acknowledged.set_result(done.result())


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
        self.batches: PartitionBatches | None = None

    async def open(self) -> None:
        # Duplicates are allowed at least once; the idempotent producer is not needed (and
        # some Kafka-protocol brokers reject its InitProducerId v0).
        self.producer = self.sink.clients.producer(
            "sink",
            {"max_batch_size": SINK_MAX_BATCH_BYTES},
            acks="all" if self.sink.guarantee != DeliveryGuarantee.NONE else 1,
        )
        await start_client(self.producer)
        self.batches = self.sink.partition_batches(self.producer)

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
        assert self.batches is not None
        with self._broker_errors():
            await self.batches.add(values)
        if self.batches.unacknowledged > MAX_UNACKNOWLEDGED_BATCHES:
            await self._await_acks(self.batches.take_acks())

    async def _flush_and_await_acks(self) -> None:
        assert self.batches is not None
        with self._broker_errors():
            acks = await self.batches.flush()
        # Every batch of the producer is among them: awaiting them is the producer's flush.
        await self._await_acks(acks)

    async def _await_acks(self, acks: list[asyncio.Future[Any]]) -> None:
        try:
            with self._broker_errors():
                for future in acks:
                    await future  # raises the broker's error: nothing acknowledged is lost silently
        except BaseException:
            _abandon(acks)
            raise

    async def snapshot_state(self, checkpoint_id: int) -> list[Any]:
        if self.sink.guarantee == DeliveryGuarantee.AT_LEAST_ONCE:
            await self._flush_and_await_acks()
        return []

    async def finish(self) -> None:
        await self._flush_and_await_acks()

    async def close(self) -> None:
        if self.batches is not None:
            self.batches.close()
            self.batches = None
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await stop_client(self.producer)
            self.producer = None
