"""The Kafka source's reader consumer gets fetched records a record batch at a time
(``connectors.kafka.record_batches``): the same records, offsets and positions as aiokafka's
per-record ``ConsumerRecord`` path, which every other consumer of the process keeps.

Each test compares the two paths on one topic of its own on the session broker: the records a
consumer with the ``whole_batches`` marker gets against those of a plain consumer reading the
same partition from the same offset.
"""

from __future__ import annotations

import time
from typing import Any

import kafka_fixtures
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from kafka_fixtures import (
    CONSUMER_FETCH_LIMITS,
    WAIT_S,
    create_topics,
    produce,
    real_kafka_only,
    unique_name,
    write_transactions,
)

from connectors.kafka import record_batches
from connectors.kafka.record_batches import CHUNK_RECORDS, records_of, whole_batches

kafka_bootstrap = kafka_fixtures.kafka_bootstrap

ONE_BATCH = {"linger_ms": 500, "max_batch_size": 4 * 1024 * 1024}
"""Producer options that put every record of a quick send into one record batch."""


def test_the_batch_reader_is_installed_for_the_aiokafka_in_use() -> None:
    """Without it the source still reads correctly, only record by record: this is what says so."""
    assert record_batches.install()
    assert record_batches.installed()
    assert record_batches.install(), "installing twice is harmless"


def fields(record: Any) -> tuple[Any, ...]:
    return (record.offset, record.timestamp, record.key, record.value, tuple(record.headers))


async def read_partition(
    bootstrap: str,
    tp: TopicPartition,
    start: int,
    end: int,
    *,
    batched: bool,
    isolation_level: str = "read_committed",
) -> tuple[list[Any], list[Any]]:
    """(what each ``getmany(max_records=1)`` returned, the consumer's position after each that
    returned something), from offset ``start`` until the position reaches ``end``; fails if it
    does not."""
    options: dict[str, Any] = {"value_deserializer": whole_batches} if batched else {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level=isolation_level,
        **CONSUMER_FETCH_LIMITS,
        **options,
    )
    await consumer.start()
    items: list[Any] = []
    positions: list[int] = []
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            got = (await consumer.getmany(timeout_ms=200, max_records=1)).get(tp, [])
            if got:
                items.extend(got)
                positions.append(await consumer.position(tp))
            elif await consumer.position(tp) >= end:
                return items, positions
        raise AssertionError(f"{tp}: position still below {end} after {WAIT_S}s")
    finally:
        await consumer.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize("start", [0, 700], ids=["from-the-start", "from-inside-a-batch"])
async def test_chunks_hold_the_records_of_the_per_record_path_and_move_the_position(
    kafka_bootstrap: str, start: int
) -> None:
    topic = unique_name("batches")
    await create_topics(kafka_bootstrap, topic)
    count = 2 * CHUNK_RECORDS + 100  # one batch: three chunks, the last one short
    records = [
        {
            "value": orjson.dumps({"i": i}),
            "key": b"k%d" % (i % 7) if i % 3 else None,
            "headers": [("h", b"%d" % i)] if i % 5 == 0 else None,
            "partition": 0,
        }
        for i in range(count)
    ]
    await produce(kafka_bootstrap, topic, records, **ONE_BATCH)
    tp = TopicPartition(topic, 0)

    chunks, positions = await read_partition(kafka_bootstrap, tp, start, count, batched=True)
    plain, _ = await read_partition(kafka_bootstrap, tp, start, count, batched=False)

    assert all(type(r) is ConsumerRecord for r in plain), "other consumers keep ConsumerRecords"
    assert all(type(chunk) is list for chunk in chunks)
    assert all(0 < len(chunk) <= CHUNK_RECORDS for chunk in chunks)
    assert [fields(r) for r in records_of(chunks)] == [fields(r) for r in plain]
    assert [r.offset for r in records_of(chunks)] == list(range(start, count))
    # After each chunk the position is just past it: a caller that stops there has consumed it.
    assert positions == [chunk[-1].offset + 1 for chunk in chunks]


@pytest.mark.asyncio
async def test_transaction_markers_are_skipped_and_the_position_moves_past_them(
    kafka_bootstrap: str,
) -> None:
    """Each committed transaction ends with a control batch (a commit marker at an offset of its
    own): no chunk holds it, and the position still ends past the last marker."""
    topic = unique_name("batches-txn")
    await create_topics(kafka_bootstrap, topic)
    await write_transactions(
        kafka_bootstrap, topic, [(range(0, 10), True), (range(10, 20), True), (range(20, 30), True)]
    )
    tp = TopicPartition(topic, 0)
    end = 30 + 3  # thirty records and three commit markers

    chunks, positions = await read_partition(kafka_bootstrap, tp, 0, end, batched=True)
    plain, _ = await read_partition(kafka_bootstrap, tp, 0, end, batched=False)

    values = [orjson.loads(r.value)["i"] for r in records_of(chunks)]
    assert values == list(range(30))
    assert [fields(r) for r in records_of(chunks)] == [fields(r) for r in plain]
    # read_partition returned: the position reached the end, past the last marker, although no
    # chunk held a marker.
    assert positions == [chunk[-1].offset + 1 for chunk in chunks]


@pytest.mark.asyncio
@real_kafka_only("delivers the records of aborted transactions to read_committed consumers")
async def test_aborted_transactions_are_left_out_under_read_committed(kafka_bootstrap: str) -> None:
    topic = unique_name("batches-abort")
    await create_topics(kafka_bootstrap, topic)
    await write_transactions(
        kafka_bootstrap,
        topic,
        [(range(0, 10), True), (range(10, 20), False), (range(20, 30), True)],
    )
    tp = TopicPartition(topic, 0)

    chunks, _ = await read_partition(kafka_bootstrap, tp, 0, 33, batched=True)

    values = [orjson.loads(r.value)["i"] for r in records_of(chunks)]
    assert values == [*range(10), *range(20, 30)]
