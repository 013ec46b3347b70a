"""The local Kafka-protocol broker serves real clients, and transactions work on it.

Runs against the session broker of ``kafka_fixtures`` (Tansu, or ``KAFKA_BOOTSTRAP_SERVERS``).
Absence of records is proven by polling with a timeout right after presence was proven elsewhere
(a read_uncommitted consumer, or the last stable offset), never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

import kafka_fixtures
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from kafka_fixtures import CONSUMER_FETCH_LIMITS, create_topics, unique_name

from connectors.kafka.broker import BrokerStartError, LocalKafkaBroker
from connectors.kafka.transactions import create_transactional_producer

# The session-wide broker fixture. Once tests/conftest.py imports it for every module, drop this
# line: a second registration here would start a second broker for this module.
kafka_bootstrap = kafka_fixtures.kafka_bootstrap

# How long a poll waits to show that nothing (more) is readable.
ABSENCE_POLL_MS = 500
# Upper bound for records that must arrive; they normally do within milliseconds.
ARRIVAL_TIMEOUT_S = 10.0


class _Client(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


@contextlib.asynccontextmanager
async def started(client: _Client) -> AsyncIterator[Any]:
    """Starts an aiokafka client and always stops it (an unstopped one warns, failing the test)."""
    try:
        await client.start()
        yield client
    finally:
        await client.stop()


def consumer(bootstrap: str, tp: TopicPartition, isolation_level: str) -> AIOKafkaConsumer:
    """A group-less consumer reading ``tp`` from the beginning (no group join, no commits)."""
    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
        **CONSUMER_FETCH_LIMITS,
    )
    c.assign([tp])
    return c


async def read_records(c: AIOKafkaConsumer, count: int) -> list[ConsumerRecord[Any, Any]]:
    """Exactly ``count`` records, in partition order; fails if they do not all arrive in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ARRIVAL_TIMEOUT_S
    records: list[ConsumerRecord[Any, Any]] = []
    while len(records) < count:
        remaining = deadline - loop.time()
        if remaining <= 0:
            pytest.fail(f"only {len(records)} of {count} records after {ARRIVAL_TIMEOUT_S}s")
        batches = await c.getmany(timeout_ms=int(min(remaining, 1.0) * 1000))
        for batch in batches.values():
            records.extend(batch)
    assert len(records) == count, f"expected {count} records, got more: {records}"
    return records


async def assert_nothing_readable(c: AIOKafkaConsumer) -> None:
    batches = await c.getmany(timeout_ms=ABSENCE_POLL_MS)
    assert not any(batches.values()), f"unexpected records: {batches}"


@pytest.mark.asyncio
async def test_produce_consume_round_trip(kafka_bootstrap: str) -> None:
    topic = unique_name("round-trip")
    await create_topics(kafka_bootstrap, topic)
    tp = TopicPartition(topic, 0)
    sent = [(f"k{i}".encode(), f"value {i}".encode()) for i in range(5)]

    async with started(AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)) as producer:
        offsets = []
        for key, value in sent:
            metadata = await producer.send_and_wait(topic, value, key=key, partition=0)
            offsets.append(metadata.offset)
    assert offsets == sorted(offsets)
    assert len(set(offsets)) == len(sent)

    async with started(consumer(kafka_bootstrap, tp, "read_uncommitted")) as c:
        records = await read_records(c, len(sent))
        await assert_nothing_readable(c)
    assert [(r.key, r.value) for r in records] == sent
    assert [r.offset for r in records] == offsets


@pytest.mark.asyncio
async def test_transaction_is_visible_to_read_committed_only_after_commit(
    kafka_bootstrap: str,
) -> None:
    topic = unique_name("txn")
    await create_topics(kafka_bootstrap, topic)
    tp = TopicPartition(topic, 0)
    values = [b"one", b"two", b"three"]

    async with contextlib.AsyncExitStack() as stack:
        producer = await stack.enter_async_context(
            started(create_transactional_producer(kafka_bootstrap, unique_name("tx"), 30_000))
        )
        committed = await stack.enter_async_context(
            started(consumer(kafka_bootstrap, tp, "read_committed"))
        )
        uncommitted = await stack.enter_async_context(
            started(consumer(kafka_bootstrap, tp, "read_uncommitted"))
        )

        await producer.begin_transaction()
        offsets = [(await producer.send_and_wait(topic, v, partition=0)).offset for v in values]

        # The records are in the log (a read_uncommitted consumer gets them) ...
        assert [r.value for r in await read_records(uncommitted, len(values))] == values
        # ... but the last stable offset stays at the open transaction's first record, so a
        # read_committed consumer can neither see nor fetch them.
        last_stable = (await committed.end_offsets([tp]))[tp]
        assert last_stable <= offsets[0]
        await assert_nothing_readable(committed)

        await producer.commit_transaction()

        records = await read_records(committed, len(values))
        assert [r.value for r in records] == values
        assert [r.offset for r in records] == offsets
        assert (await committed.end_offsets([tp]))[tp] > offsets[-1]
        await assert_nothing_readable(committed)


@pytest.mark.asyncio
async def test_empty_transaction_commits(kafka_bootstrap: str) -> None:
    topic = unique_name("empty-txn")
    await create_topics(kafka_bootstrap, topic)
    tp = TopicPartition(topic, 0)

    async with started(
        create_transactional_producer(kafka_bootstrap, unique_name("tx"), 30_000)
    ) as producer:
        await producer.begin_transaction()
        await producer.commit_transaction()
        async with producer.transaction():
            pass
        # Still a working transactional producer afterwards.
        async with producer.transaction():
            await producer.send_and_wait(topic, b"after empty transactions", partition=0)

    async with started(consumer(kafka_bootstrap, tp, "read_committed")) as c:
        records = await read_records(c, 1)
        await assert_nothing_readable(c)
    assert records[0].value == b"after empty transactions"


@pytest.mark.asyncio
async def test_second_producer_with_same_transactional_id_fences_the_first(
    kafka_bootstrap: str,
) -> None:
    topic = unique_name("fencing")
    await create_topics(kafka_bootstrap, topic)
    tp = TopicPartition(topic, 0)
    transactional_id = unique_name("tx")

    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            started(create_transactional_producer(kafka_bootstrap, transactional_id, 30_000))
        )
        second = await stack.enter_async_context(
            started(create_transactional_producer(kafka_bootstrap, transactional_id, 30_000))
        )
        # Same producer id, epoch bumped: the coordinator now rejects the first one's epoch.
        assert second._txn_manager.producer_id == first._txn_manager.producer_id
        assert second._txn_manager.producer_epoch == first._txn_manager.producer_epoch + 1

        # The zombie cannot write: adding the partition to its transaction is refused (Kafka:
        # ProducerFenced; Tansu: error code -1, which aiokafka turns into a fatal KafkaError).
        await first.begin_transaction()
        delivery = await first.send(topic, b"zombie", partition=0)
        with pytest.raises(KafkaError):
            await delivery
        # A fenced producer is done for: only stop() is left (commit / abort refuse to run).
        await first.stop()

        async with second.transaction():
            await second.send_and_wait(topic, b"successor", partition=0)

        c = await stack.enter_async_context(
            started(consumer(kafka_bootstrap, tp, "read_committed"))
        )
        assert [r.value for r in await read_records(c, 1)] == [b"successor"]
        await assert_nothing_readable(c)


def test_local_broker_refuses_a_port_in_use() -> None:
    with LocalKafkaBroker() as broker:
        assert broker.running
        log_path = broker.log_path
        assert log_path is not None
        assert log_path.exists()
        with pytest.raises(BrokerStartError, match="already in use"):
            LocalKafkaBroker(broker.port).start()
        assert broker.running
    assert not broker.running
    assert not log_path.exists()


def test_local_broker_names_its_process_while_it_runs() -> None:
    with LocalKafkaBroker() as broker:
        pid = broker.pid
        assert pid is not None
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert b"tansu" in cmdline.read()
    assert broker.pid is None
