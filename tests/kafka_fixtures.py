"""Kafka for tests: the ``kafka_bootstrap`` fixture and small helpers around it.

``kafka_bootstrap`` is session-scoped: one in-memory Tansu broker (``runtime.devbroker``) serves the
whole test run, started on a free port on first use and stopped at the end. Set
``KAFKA_BOOTSTRAP_SERVERS=host:port`` to run the same tests against an existing cluster instead
(nothing is started then). Tests share the broker, so each one uses topics with unique names
(:func:`unique_name`) and never relies on the cluster being empty.

Tansu 0.6 quirks the helpers account for (see ``runtime/devbroker.py``): a fetch cut in the middle
of a record batch can stall a consumer, hence :data:`CONSUMER_FETCH_LIMITS`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from runtime.devbroker import LocalKafkaBroker

KAFKA_BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"

#: Keyword arguments for every ``AIOKafkaConsumer`` in tests: generous fetch limits, so a fetch is
#: never cut in the middle of a record batch.
CONSUMER_FETCH_LIMITS: dict[str, int] = {
    "fetch_max_bytes": 64 * 1024 * 1024,
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
}


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
