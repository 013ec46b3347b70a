"""The one place the Kafka connectors create clients, so each gets the connector's client options.

``client_options`` given to :class:`connectors.kafka.KafkaSource` or
:class:`connectors.kafka.KafkaSink` (TLS: ``security_protocol``, ``ssl_context``; SASL:
``sasl_mechanism``, ``sasl_plain_username``, ...; ``client_id``, timeouts, fetch or batch sizes)
reach every client the connector makes: consumers, producers, transactional producers, the
low-level client that re-commits transactions, admin clients. Each client takes the options its
aiokafka constructor knows (a producer ignores ``fetch_max_bytes``, a consumer ``linger_ms``); an
option no aiokafka client knows is refused when the connector is built, so a typo in a security
setting never connects in plain text silently.

Precedence, lowest first: the connector's defaults (e.g. generous fetch limits), the user's
client options, what the connector requires to keep its guarantees (e.g. no auto commit, the
isolation level, the transactional id).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError

from actors.infrastructure import InfrastructureError
from connectors.kafka.transactions import TransactionalProducer
from runtime.api.durations import format_duration

log = logging.getLogger(__name__)

ClientObserver = Callable[[str, object], None]
"""Called with (purpose, client) for every client a :class:`KafkaClients` creates."""

T = TypeVar("T")


class StartableClient(Protocol):
    """An aiokafka consumer, producer or admin client: ``start()`` connects, ``stop()`` closes."""

    def start(self) -> Awaitable[Any]: ...

    def stop(self) -> Awaitable[Any]: ...


async def finish_then_cancel(operation: Awaitable[T]) -> T:
    """``await operation``, except that a cancellation of the caller lets ``operation`` run to its
    end first (its result or error is then dropped) and propagates afterwards.

    For short client operations (a start, a split discovery) that cancellations routinely
    interrupt: a job that ends cancels its periodic partition discovery, a cancelled task closes
    its reader. aiokafka (0.14) leaves connections open when such an operation is cancelled
    midway (``AIOKafkaClient.bootstrap`` holds its bootstrap connection in a local variable and
    closes it on errors only; a cancelled ``consumer.topics()`` can leave the connection it was
    opening), and a leaked connection warns ``Unclosed AIOKafkaConnection`` when it is
    garbage-collected, in whatever code runs then. A second cancellation is not held back.
    """
    running = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        # Not ``await running``: a second cancellation would cancel the operation itself.
        await asyncio.wait([running])
        if not running.cancelled():
            running.exception()  # retrieved: the caller no longer wants the outcome
        raise


async def stop_client(client: StartableClient) -> None:
    """``await client.stop()``, without losing a cancellation of the caller: aiokafka's
    ``stop()`` awaits its own cancelled tasks under ``contextlib.suppress(CancelledError)``
    (``Fetcher.close``, ``AIOKafkaClient.close``), so a caller cancelled meanwhile would carry on
    as if never cancelled (a loop would then run for ever). The stop runs to its end and the
    cancellation propagates afterwards (:func:`finish_then_cancel`)."""
    await finish_then_cancel(client.stop())


@dataclass(frozen=True)
class ClientOrigin:
    """Who made a client, for what, and where it connects: what its errors name."""

    owner: str
    purpose: str
    bootstrap_servers: str
    request_timeout_ms: int

    def no_broker(self) -> str:
        """The one line for a start that reached no broker."""
        return (
            f"no Kafka broker answers at {self.bootstrap_servers} ({self.owner}, {self.purpose}; "
            f"connect timeout {format_duration(self.request_timeout_ms / 1000)}): check the "
            "bootstrap address and that the broker runs (for the dev loop: python -m runtime "
            "broker)"
        )


def missing_topics(topics: list[str], bootstrap_servers: str) -> str:
    """The one line for topics that do not exist."""
    names = ", ".join(topics)
    return (
        f"Kafka topic {names} does not exist on {bootstrap_servers}: create it first (e.g. "
        f"kafka-topics.sh --bootstrap-server {bootstrap_servers} --create --topic {topics[0]}), "
        "or fix the topic name"
    )


_ORIGINS: weakref.WeakKeyDictionary[Any, ClientOrigin] = weakref.WeakKeyDictionary()
"""The origin of every client a :class:`KafkaClients` created."""


async def start_client(client: StartableClient) -> None:
    """``await client.start()``, safe to cancel: a cancelled start is let finish
    (:func:`finish_then_cancel`) and the client is stopped before the cancellation propagates.
    A client of a :class:`KafkaClients` that reaches no broker raises an
    :class:`~actors.infrastructure.InfrastructureError` naming the address and what to do."""
    try:
        await finish_then_cancel(client.start())
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await stop_client(client)
        raise
    except KafkaConnectionError as exc:
        origin = _ORIGINS.get(client)
        if origin is None:
            raise
        raise InfrastructureError(origin.no_broker()) from exc


def _parameters(cls: type) -> frozenset[str]:
    names = inspect.signature(cls).parameters
    return frozenset(names) - {"self", "loop", "bootstrap_servers", "topics"}


_ACCEPTED: dict[type, frozenset[str]] = {
    cls: _parameters(cls)
    for cls in (AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer, AIOKafkaAdminClient)
}
_KNOWN = frozenset().union(*_ACCEPTED.values())
_DEFAULT_REQUEST_TIMEOUT_MS: dict[type, int] = {
    cls: inspect.signature(cls).parameters["request_timeout_ms"].default for cls in _ACCEPTED
}


class KafkaClients:
    """Creates the Kafka clients of one connector, every one with the connector's options.

    ``purpose`` names what a client is for (``"split discovery"``, ``"reader"``, ...); it is
    passed to observers (:meth:`observe`), which see every client right after it was created
    (and before it connects), for example to check or log its configuration.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        client_options: Mapping[str, Any] | None,
        owner: str = "Kafka connector",
    ) -> None:
        options = dict(client_options or {})
        unknown = sorted(set(options) - _KNOWN)
        if unknown:
            msg = (
                f"unknown Kafka client option(s) {', '.join(unknown)}: client_options take the "
                "keyword arguments of aiokafka's consumer, producer and admin client"
            )
            raise ValueError(msg)
        if "bootstrap_servers" in options:
            msg = "give bootstrap_servers as the connector's first argument, not in client_options"
            raise ValueError(msg)
        self.bootstrap_servers = bootstrap_servers
        self.options = options
        self.owner = owner
        """What the clients' errors name as their maker, e.g. ``KafkaSource(events)``."""
        self._observers: list[ClientObserver] = []

    def observe(self, observer: ClientObserver) -> None:
        """Call ``observer(purpose, client)`` for every client created from now on."""
        self._observers.append(observer)

    def _create(
        self,
        cls: type,
        factory: Callable[..., T],
        purpose: str,
        defaults: Mapping[str, Any],
        required: Mapping[str, Any],
    ) -> T:
        accepted = _ACCEPTED[cls]
        settings = {
            **defaults,
            **{k: v for k, v in self.options.items() if k in accepted},
            **required,
        }
        client = factory(bootstrap_servers=self.bootstrap_servers, **settings)
        log.debug("created Kafka %s for %s", cls.__name__, purpose)
        timeout_ms = settings.get("request_timeout_ms", _DEFAULT_REQUEST_TIMEOUT_MS[cls])
        _ORIGINS[client] = ClientOrigin(self.owner, purpose, self.bootstrap_servers, timeout_ms)
        for observer in self._observers:
            observer(purpose, client)
        return client

    def consumer(
        self,
        purpose: str,
        defaults: Mapping[str, Any] | None = None,
        **required: Any,
    ) -> AIOKafkaConsumer:
        return self._create(AIOKafkaConsumer, AIOKafkaConsumer, purpose, defaults or {}, required)

    def producer(
        self,
        purpose: str,
        defaults: Mapping[str, Any] | None = None,
        **required: Any,
    ) -> AIOKafkaProducer:
        return self._create(AIOKafkaProducer, AIOKafkaProducer, purpose, defaults or {}, required)

    def transactional_producer(
        self,
        purpose: str,
        transactional_id: str,
        transaction_timeout_ms: int,
        defaults: Mapping[str, Any] | None = None,
    ) -> TransactionalProducer:
        """See :func:`connectors.kafka.transactions.create_transactional_producer`."""
        required = {
            "transactional_id": transactional_id,
            "transaction_timeout_ms": transaction_timeout_ms,
        }
        return self._create(
            AIOKafkaProducer, TransactionalProducer, purpose, defaults or {}, required
        )

    def client(self, purpose: str) -> AIOKafkaClient:
        """A low-level client, for requests the high-level clients do not offer (EndTxn)."""
        return self._create(AIOKafkaClient, AIOKafkaClient, purpose, {}, {})

    def admin(self, purpose: str) -> AIOKafkaAdminClient:
        return self._create(AIOKafkaAdminClient, AIOKafkaAdminClient, purpose, {}, {})
