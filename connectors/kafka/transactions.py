"""aiokafka's transactional producer, made to work on Tansu as well as on Apache Kafka.

Why this module exists: aiokafka 0.14 only knows InitProducerId **v0** (API key 22). Tansu 0.6
advertises versions 0-5 but rejects v0: its storage engine logs ``producer=None epoch=None`` and
answers error code -1, so ``AIOKafkaProducer(transactional_id=...).start()`` raises
``aiokafka.errors.UnknownError``. Tansu needs v3 or later, whose request carries the producer id and
epoch explicitly (``-1``/``-1`` for "give me a fresh id"). Every other request of the transaction
flow (AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit, EndTxn, all at v0) works as aiokafka
sends them.

The fix is deliberately narrow: :class:`InitProducerIdRequest` below defines request versions 0 to
3, and aiokafka's normal per-connection version negotiation picks the highest one the broker
supports (v3 on Tansu and on Kafka >= 2.5; v1/v2 or v0 on older brokers, exactly like before).
Only the producer returned by :func:`create_transactional_producer` uses it: its sender's
InitProducerId step is swapped for one that builds this request; nothing in aiokafka is patched
globally. Sending ``producer_id=-1, producer_epoch=-1`` at v3 means the same as a v0 request (aiokafka
never re-initialises a producer id once it has one, so it never needs the KIP-360 epoch-bump form).

Behaviour measured on Tansu 0.6.0 with aiokafka 0.14 (``tests/test_kafka_broker.py`` checks the
first three):

- begin / send / commit works; a ``read_committed`` consumer sees the records only once the
  transaction is committed (its end offset, the last stable offset, stays at the transaction's
  first record until then). ``send_offsets_to_transaction`` works too: the group's offset appears
  on commit.
- Committing an empty transaction (begin, then commit with no sends) works on every broker:
  aiokafka completes it on the client without a request.
- Fencing: a second producer with the same ``transactional_id`` gets the same producer id with the
  epoch bumped by one. The first producer's next AddPartitionsToTxn (its first send to a partition
  not yet in its transaction) or TxnOffsetCommit is refused, on Tansu with error code -1 rather than
  PRODUCER_FENCED: aiokafka logs "Could not add partition ... unexpected error: UnknownError", its
  sender task dies, and the send's future fails with ``KafkaError("Unexpected error during batch
  delivery")``. The producer is then unusable (``commit_transaction``, ``abort_transaction`` and
  ``begin_transaction`` fail with ``AssertionError: Invalid state transition
  TransactionState.FATAL_ERROR -> ...``): stop it.

Not like Apache Kafka on Tansu 0.6.0:

- Aborted records are not hidden from ``read_committed`` consumers: after ``abort_transaction()``
  (which itself succeeds) they are delivered like committed ones. The same holds for the open
  transaction a successor's ``start()`` aborts when it fences an older producer.
- A fenced producer that already had a partition in its open transaction: a further send to that
  partition fails with ``UnknownError`` (error code -1, not fatal), and ``commit_transaction()``
  never returns: Tansu answers its EndTxn by closing the connection (its log says
  ``ProducerFenced``) and aiokafka retries forever, logging "Could not send EndTxnRequest:
  KafkaConnectionError". Bound commits with a timeout, then ``stop()``.
- Open transactions are not aborted when ``transaction_timeout_ms`` expires: a producer that dies
  mid-transaction holds back ``read_committed`` consumers of those partitions until a producer with
  the same ``transactional_id`` starts (or for ever).
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.producer.sender import InitPIDHandler, Sender
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.transaction import InitProducerIdRequest_v0, InitProducerIdResponse_v0
from aiokafka.protocol.types import CompactString, Int16, Int32, Int64, Schema, TaggedFields

__all__ = [
    "InitProducerIdRequest",
    "TransactionalProducer",
    "create_transactional_producer",
]

# Field layouts follow the Kafka protocol spec (InitProducerIdRequest.json / ...Response.json).
# v1 only changed throttling semantics on the broker side, v2 made the API flexible (compact
# strings and trailing tagged fields), v3 added producer_id / producer_epoch.


class InitProducerIdResponse_v1(Response):  # type: ignore[misc]
    API_KEY = 22
    API_VERSION = 1
    SCHEMA = InitProducerIdResponse_v0.SCHEMA


class InitProducerIdResponse_v2(Response):  # type: ignore[misc]
    API_KEY = 22
    API_VERSION = 2
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


class InitProducerIdResponse_v3(Response):  # type: ignore[misc]
    API_KEY = 22
    API_VERSION = 3
    SCHEMA = InitProducerIdResponse_v2.SCHEMA


class InitProducerIdRequest_v1(RequestStruct):  # type: ignore[misc]
    API_KEY = 22
    API_VERSION = 1
    RESPONSE_TYPE = InitProducerIdResponse_v1
    SCHEMA = InitProducerIdRequest_v0.SCHEMA


class InitProducerIdRequest_v2(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 22
    API_VERSION = 2
    RESPONSE_TYPE = InitProducerIdResponse_v2
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("transaction_timeout_ms", Int32),
        ("tags", TaggedFields),
    )


class InitProducerIdRequest_v3(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 22
    API_VERSION = 3
    RESPONSE_TYPE = InitProducerIdResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("transaction_timeout_ms", Int32),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


# aiokafka reads the supported struct classes, lowest version first, from this generic argument;
# Request.prepare() then sends the highest one inside the broker's advertised range.
_InitProducerIdStruct = (
    InitProducerIdRequest_v0
    | InitProducerIdRequest_v1
    | InitProducerIdRequest_v2
    | InitProducerIdRequest_v3
)


class InitProducerIdRequest(Request[_InitProducerIdStruct]):  # type: ignore[misc]
    """InitProducerId for versions 0-3; asks for a fresh producer id (never an epoch bump).

    Responses of every version expose ``error_code``, ``producer_id`` and ``producer_epoch``,
    which is all aiokafka's handler reads.
    """

    API_KEY = 22

    def __init__(self, transactional_id: str | None, transaction_timeout_ms: int) -> None:
        self._transactional_id = transactional_id
        self._transaction_timeout_ms = transaction_timeout_ms

    def build(self, request_struct_class: type[Any]) -> Any:
        version: int = request_struct_class.API_VERSION
        if version >= 3:
            # -1/-1: no existing producer to bump; the coordinator assigns (or fences and
            # re-issues) the id for this transactional id, as with v0.
            return request_struct_class(
                self._transactional_id, self._transaction_timeout_ms, -1, -1, {}
            )
        if version == 2:
            return request_struct_class(self._transactional_id, self._transaction_timeout_ms, {})
        return request_struct_class(self._transactional_id, self._transaction_timeout_ms)


class _InitPIDHandler(InitPIDHandler):  # type: ignore[misc]
    """aiokafka's InitProducerId handler (same response and error handling), newer request."""

    def create_request(self) -> InitProducerIdRequest:
        txn_manager = self._sender._txn_manager
        return InitProducerIdRequest(
            transactional_id=txn_manager.transactional_id,
            transaction_timeout_ms=txn_manager.transaction_timeout_ms,
        )


class _Sender(Sender):  # type: ignore[misc]
    """aiokafka's Sender whose InitProducerId step uses :class:`_InitPIDHandler`; adds no state."""

    async def _do_init_pid(self, node_id: int) -> bool:
        handler = _InitPIDHandler(self)
        done: bool = await handler.do(node_id)
        return done


class TransactionalProducer(AIOKafkaProducer):  # type: ignore[misc]
    """An :class:`aiokafka.AIOKafkaProducer` whose InitProducerId request is negotiated up to v3.

    Everything else, including the whole public API (``begin_transaction``, ``send``,
    ``send_offsets_to_transaction``, ``commit_transaction``, ``abort_transaction``,
    ``transaction()``), is aiokafka's. Requires ``transactional_id`` (or
    ``enable_idempotence=True``, where the same request is used to get a producer id).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        sender = self._sender
        if type(sender) is not Sender or not hasattr(sender, "_do_init_pid"):
            # The swap below relies on aiokafka internals (0.12-0.14); fail loudly rather than
            # silently sending v0 again after an aiokafka upgrade moved things around.
            msg = (
                "connectors.kafka.transactions does not support this aiokafka version "
                f"({type(sender).__module__}.{type(sender).__qualname__} has no _do_init_pid)"
            )
            raise RuntimeError(msg)
        # Re-class rather than re-construct: _Sender adds no attributes, so the instance the
        # producer already wired to its client, accumulator and transaction manager stays valid.
        sender.__class__ = _Sender

    async def stop(self) -> None:
        """aiokafka's ``stop()``; afterwards marks failures nobody can await any more as seen.

        Call it after a fatal error too (e.g. fenced): the producer cannot be used again.
        """
        try:
            await super().stop()
        finally:
            self._mark_orphaned_batch_failures_seen()

    def _mark_orphaned_batch_failures_seen(self) -> None:
        # When the sender task dies (a fenced producer always ends this way), aiokafka fails each
        # queued batch, including the batch's internal drain waiter, which nothing awaits any
        # more. The failure already reached the caller through send() / commit_transaction();
        # unseen, the waiter logs "Future exception was never retrieved" whenever the garbage
        # collector frees it. On CPython 3.11 that log formats a traceback with ast.parse; when
        # the collection happens inside another ast.parse (pytest's assertion rewriting) the
        # interpreter raises "SystemError: AST constructor recursion depth mismatch" and a test
        # run that passed exits with status 1. Best effort: missing internals mean nothing to do.
        # Futures of a stopped producer only: nothing can await them after stop() anyway.
        accumulator = getattr(self, "_message_accumulator", None)
        queued = [
            batch for batches in getattr(accumulator, "_batches", {}).values() for batch in batches
        ]
        queued.extend(getattr(accumulator, "_pending_batches", ()))
        waiters = [getattr(batch, "_drain_waiter", None) for batch in queued]
        # Same for the transaction's completion future once the transaction can no longer be
        # committed or aborted (aiokafka refuses both after a fatal error).
        waiters.append(getattr(getattr(self, "_txn_manager", None), "_transaction_waiter", None))
        for waiter in waiters:
            if waiter is not None and waiter.done() and not waiter.cancelled():
                waiter.exception()


def create_transactional_producer(
    bootstrap_servers: str,
    transactional_id: str,
    transaction_timeout_ms: int,
    **kwargs: Any,
) -> TransactionalProducer:
    """A transactional producer that works on Tansu and, unchanged, on Apache Kafka.

    ``kwargs`` go to :class:`aiokafka.AIOKafkaProducer` (serialisers, ``linger_ms``,
    ``request_timeout_ms``, ...). Must be called inside a running event loop, like aiokafka's own
    constructor. Use it exactly like an aiokafka transactional producer::

        producer = create_transactional_producer("127.0.0.1:9092", "job-1-sink-0", 60_000)
        await producer.start()                     # gets the producer id, fences older instances
        await producer.begin_transaction()
        await producer.send("out", b"value")
        await producer.commit_transaction()
        await producer.stop()

    ``transaction_timeout_ms`` is how long the coordinator lets a transaction stay open before it
    aborts it; it must not exceed the broker's ``transaction.max.timeout.ms`` on Apache Kafka.
    """
    return TransactionalProducer(
        bootstrap_servers=bootstrap_servers,
        transactional_id=transactional_id,
        transaction_timeout_ms=transaction_timeout_ms,
        **kwargs,
    )
