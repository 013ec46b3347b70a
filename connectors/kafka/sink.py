"""Kafka sink on aiokafka: at-least-once (flush before each barrier) and exactly-once.

Exactly-once writes in Kafka transactions committed when a checkpoint completes (see
:mod:`connectors.kafka.exactly_once`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import msgpack
import orjson
from aiokafka import AIOKafkaProducer

from connectors.kafka.clients import KafkaClients, start_client, stop_client
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
    - ``key``: a function of the record giving its key (records with equal keys go to the same
      partition), or None.
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
        self.clients = KafkaClients(bootstrap_servers, client_options)
        """Creates every client of this sink (see :mod:`connectors.kafka.clients`)."""
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

    def records(self, values: list[Any]) -> list[tuple[str, bytes | None, bytes | None]]:
        """(topic, key bytes, value bytes) per record."""
        topic = self.topic
        key_of = self.key
        serialize = self.serialize
        serialize_key = self.serialize_key
        return [
            (
                topic if isinstance(topic, str) else topic(v),
                serialize_key(key_of(v)) if key_of is not None else None,
                serialize(v),
            )
            for v in values
        ]


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

    async def write(self, values: list[Any]) -> None:
        assert self.producer is not None
        send = self.producer.send
        for topic, key, value in self.sink.records(values):
            self._inflight.append(await send(topic, value, key=key))
        if len(self._inflight) > 10_000:
            await self._await_acks()

    async def _await_acks(self) -> None:
        inflight, self._inflight = self._inflight, []
        for future in inflight:
            await future  # raises the broker's error: nothing acknowledged is lost silently

    async def snapshot_state(self, checkpoint_id: int) -> list[Any]:
        if self.sink.guarantee == DeliveryGuarantee.AT_LEAST_ONCE:
            assert self.producer is not None
            await self.producer.flush()
            await self._await_acks()
        return []

    async def finish(self) -> None:
        assert self.producer is not None
        await self.producer.flush()
        await self._await_acks()

    async def close(self) -> None:
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await stop_client(self.producer)
            self.producer = None
