"""Kafka for tests: the ``kafka_bootstrap`` fixture and small helpers around it.

``kafka_bootstrap`` is session-scoped: one in-memory Tansu broker (``connectors.kafka.broker``) serves the
whole test run, started on a free port on first use and stopped at the end. Set
``KAFKA_BOOTSTRAP_SERVERS=host:port`` to run the same tests against an existing cluster instead
(nothing is started then). Tests share the broker, so each one uses topics with unique names
(:func:`unique_name`) and never relies on the cluster being empty.

Tansu 0.6 quirks the helpers account for (see ``connectors/kafka/broker.py``): a fetch cut in the middle
of a record batch can stall a consumer, hence :data:`CONSUMER_FETCH_LIMITS`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cli_helpers import ROOT, run_command

from connectors.kafka.broker import LocalKafkaBroker
from connectors.kafka.source import KafkaSourceReader
from connectors.kafka.transactions import TransactionalProducer
from runtime.api.sources import SourceOperator
from runtime.master.jobmaster import JobMaster

KAFKA_BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"

WAIT_S = 20.0
"""How long a test waits for something that involves the broker before failing."""

#: Keyword arguments for every ``AIOKafkaConsumer`` in tests: generous fetch limits, so a fetch is
#: never cut in the middle of a record batch.
CONSUMER_FETCH_LIMITS: dict[str, int] = {
    "fetch_max_bytes": 64 * 1024 * 1024,
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
}


def real_kafka_only(why: str) -> pytest.MarkDecorator:
    """Skips a test unless ``KAFKA_BOOTSTRAP_SERVERS`` names a real cluster; ``why`` says what
    Tansu 0.6 does differently."""
    return pytest.mark.skipif(
        not os.environ.get(KAFKA_BOOTSTRAP_ENV, "").strip(),
        reason=f"needs a real Apache Kafka ({KAFKA_BOOTSTRAP_ENV}): Tansu 0.6 {why}",
    )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``bootstrap_servers`` of a Kafka-protocol broker that serves requests, for the whole session.

    Fails (does not skip) when the broker cannot start, e.g. without the ``dev`` extra: a test run
    that silently skipped every Kafka test would look green while testing nothing.
    """
    external = os.environ.get(KAFKA_BOOTSTRAP_ENV, "").strip()
    if external:
        yield external
        return
    with LocalKafkaBroker() as broker:
        yield broker.bootstrap_servers


def unique_name(prefix: str) -> str:
    """A topic / group / transactional id that no other test (or earlier run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def create_topics(bootstrap_servers: str, *names: str, partitions: int = 1) -> None:
    """Creates the topics (replication factor 1) and returns once the broker confirmed them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
        )
    finally:
        await admin.close()


def assign_from_offset_zero(consumer: AIOKafkaConsumer, topic: str, partitions: int) -> None:
    """Assigns every partition of ``topic`` (one a test created) at offset 0, not at the broker's
    "earliest": Tansu 0.6 can answer that with a partition's second batch when two producers
    (sink subtasks) wrote its first two at once (see
    :func:`connectors.kafka.source.confirmed_beginning_offsets`)."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, 0)


async def read_topic(
    bootstrap_servers: str,
    topic: str,
    partitions: int,
    *,
    isolation_level: str = "read_committed",
    at_least: int = 0,
    timeout_s: float = 30.0,
    absence_poll_ms: int = 500,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic``, from the beginning: fetches until ``at_least`` records came
    (failing after ``timeout_s``), then until a poll of ``absence_poll_ms`` brings nothing more.

    The end is proven by an empty poll, not by end offsets: Tansu's "latest" offset is short of the
    log end (see the module docstring)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
        **CONSUMER_FETCH_LIMITS,
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        assign_from_offset_zero(consumer, topic, partitions)
        deadline = time.monotonic() + timeout_s
        while len(records) < at_least:
            if time.monotonic() > deadline:
                msg = f"{topic}: {len(records)} records after {timeout_s}s, expected {at_least}"
                raise AssertionError(msg)
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
        while True:
            batches = await consumer.getmany(timeout_ms=absence_poll_ms)
            if not any(batches.values()):
                return records
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()


def load_sample_events(bootstrap_servers: str, topic: str, partitions: int = 4) -> None:
    """``examples/load_events.py``: the 3000 bundled events into ``topic`` (created), keyed by user."""
    result = run_command(
        [
            sys.executable,
            str(ROOT / "examples" / "load_events.py"),
            "--bootstrap",
            bootstrap_servers,
            "--topic",
            topic,
            "--partitions",
            str(partitions),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "loaded 3000 events" in result.stdout, result.stdout


def kafka_etl_args(
    bootstrap_servers: str,
    input_topic: str,
    chk: Path,
    *extra: str,
    bounded: bool = True,
    restore: str = "latest",
    rest: bool = False,
    example: str = "kafka_etl.py",
) -> list[str]:
    """``run examples/kafka_etl.py`` (or another ``example`` with the same Kafka parameters)
    arguments (for :func:`cli_helpers.run_cli`): reading ``input_topic``, checkpoints in
    ``chk``, no progress; the control endpoint on a free port (its address in
    ``chk/rest-address``) only if ``rest``; ``extra`` (the output, ``--set`` options, ...) last."""
    return [
        "run",
        str(ROOT / "examples" / example),
        "--set",
        f"bootstrap={bootstrap_servers}",
        "--set",
        f"input_topic={input_topic}",
        "--set",
        f"bounded={str(bounded).lower()}",
        "--checkpoint-dir",
        str(chk),
        "--restore",
        restore,
        "--no-progress",
        "--rest-port",
        "0" if rest else "-1",
        *extra,
    ]


async def produce(
    bootstrap: str,
    topic: str,
    records: list[dict[str, Any]],
    **producer_options: Any,
) -> list[tuple[int, int]]:
    """Sends every record (keys: value, partition, key, headers, timestamp_ms) without awaiting
    each delivery, then waits for all acknowledgements. Returns (partition, offset) per record."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **producer_options)
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic,
                r["value"],
                key=r.get("key"),
                partition=r.get("partition"),
                headers=r.get("headers"),
                timestamp_ms=r.get("timestamp_ms"),
            )
            for r in records
        ]
        await producer.flush()
        metadata = [await f for f in futures]
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metadata]


async def write_transactions(
    bootstrap: str, topic: str, transactions: list[tuple[range, bool]], partitions: int = 1
) -> None:
    """One transaction per ``(numbers, commit)``: ``{"i": i}`` for each ``i`` of ``numbers``, to
    partition ``i % partitions``, then committed (``commit``) or aborted."""
    producer = TransactionalProducer(
        bootstrap_servers=bootstrap,
        transactional_id=unique_name(f"{topic}-writer"),
        transaction_timeout_ms=60_000,
    )
    await producer.start()
    try:
        for numbers, commit in transactions:
            await producer.begin_transaction()
            for i in numbers:
                await producer.send(topic, orjson.dumps({"i": i}), partition=i % partitions)
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    finally:
        await producer.stop()


async def wait_until(
    condition: Callable[[], Any], what: str, job: asyncio.Task[Any] | None = None
) -> Any:
    """Polls ``condition`` until truthy, for up to :data:`WAIT_S` of wall-clock time (the broker
    answers in real time: stepping the loop, as ``loop_helpers.wait_until`` does, is not enough);
    fails (with the job's error, if it ended) otherwise. Returns the truthy value."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = condition()
        if value:
            return value
        if job is not None and job.done():
            job.result()  # raises the job's failure
            pytest.fail(f"the job ended before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_S}s waiting for {what}")
        await asyncio.sleep(0.02)


def source_readers(master: JobMaster) -> list[KafkaSourceReader]:
    """The Kafka readers of the job's source subtasks running in this process."""
    return [
        t.head.reader
        for t in master.tasks
        if isinstance(t.head, SourceOperator) and hasattr(t.head, "reader")
    ]


def source_operators(master: JobMaster) -> list[SourceOperator]:
    return [t.head for t in master.tasks if isinstance(t.head, SourceOperator)]


def readers_started(master: JobMaster) -> bool:
    """The job runs and every Kafka reader with partitions has started fetching."""
    readers = source_readers(master)
    return (
        master.status == "running"
        and len(readers) == len(source_operators(master))
        and all(r._fetch_task is not None or not r.splits for r in readers)
    )
