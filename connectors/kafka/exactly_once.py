"""The exactly-once Kafka sink writer: one Kafka transaction per checkpoint and subtask.

Protocol (two-phase commit):

1. Records of a checkpoint period go into one transaction, begun at the period's first record.
2. Snapshot (pre-commit): flush, await every acknowledgement, and record the transaction
   (transactional id, producer id, epoch, checkpoint id) in operator state. The next period uses
   another id of the pool.
3. ``notify_checkpoint_complete(n)``: commit every pre-committed transaction of checkpoints
   ``<= n``; the id goes back to the pool only once its commit succeeded. A commit whose outcome
   is unknown (error, timeout) fails the task: it is never reported as done.
4. Restore: commit again every transaction the state says was pre-committed, with its recorded
   producer id and epoch (an EndTxn request). Then start this subtask's pool, which aborts what a
   failed attempt left open on those ids (a new producer on an id fences the old one).

Guard rails learned from Flink's Kafka sink:

- A bounded pool of transactional ids ``<prefix>-<subtask>-<k>``, reused across checkpoints (a new
  id per checkpoint exhausts brokers' transaction state). Every transaction gets a fresh producer,
  so the epoch grows with each transaction on an id: re-committing an old pre-committed
  transaction after its id moved on is refused as fenced, which proves it was committed (ids are
  only reused after a successful commit).
- The prefix is required and must be unique per job (jobs sharing it fence each other).
- At start: the transaction timeout must exceed the checkpoint interval plus a restart allowance,
  and must not exceed the broker's ``transaction.max.timeout.ms``; otherwise a clear error.
- A period without records begins no transaction, so there is never an empty one to lose; an
  empty transaction (begin, commit) also commits correctly.

Committed Kafka records cannot be taken back, so the writer refuses (``RestoreRefusedError``: the
CLI exits 2, the job is not restarted) to write again what an earlier run committed:

- Restoring checkpoint n while checkpoints newer than n completed (a fallback past a damaged
  checkpoint, an old savepoint): refused whatever ``--on-newer-committed-output`` says, except
  ``keep``, which goes on with a warning (the newer checkpoints' records are written again).
- Starting without restored state while completed checkpoints exist (all damaged, or
  ``--restore latest`` found none valid), or while a pool id shows earlier use (InitProducerId
  answers epoch 0 only for an id no producer used; ids this process used in an earlier attempt
  do not count): refused unless ``--allow-existing-output``. The checkpoint check runs before any
  producer touches the pool, so restoring the right checkpoint afterwards still commits its
  transactions. The epoch check cannot tell committed from never-committed use (a run killed
  before its first checkpoint also counts), nor see ids the broker expired
  (``transactional.id.expiration.ms``, 7 days on Kafka).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaConnectionError, KafkaError, for_code
from aiokafka.protocol.transaction import EndTxnRequest

from actors.faults import crash_point
from actors.infrastructure import InfrastructureError
from actors.operator import NewerOutputPolicy
from connectors.kafka.clients import start_client, stop_client
from connectors.kafka.sink import SINK_MAX_BATCH_BYTES, PartitionBatches
from runtime.api.functions import RuntimeContext
from runtime.api.sinks import SinkWriter
from state.refusal import RestoreRefusedError

if TYPE_CHECKING:
    from connectors.kafka import KafkaSink

log = logging.getLogger(__name__)

RESTART_ALLOWANCE_MS = 60_000
"""Time a failed job may take to restart and re-commit before its open transactions time out."""
DEFAULT_BROKER_MAX_TIMEOUT_MS = 900_000
COMMIT_TIMEOUT_S = 60.0


_TRANSACTION_END_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def transaction_ends_one_at_a_time() -> asyncio.Lock:
    """The lock under which this process's sink subtasks end transactions (commit, re-commit,
    fence), one after the other.

    Tansu 0.6, the dev broker, leaves a partition's last stable offset stuck when two
    transactions on it end within about a millisecond of each other: read_committed consumers
    then stop there for good, as if a transaction stayed open (measured: two producers committing
    at once, every time; one after the other, never). Sink subtasks that act on the same
    checkpoint notice end theirs at the same moment. On Apache Kafka the cost is that a process's
    commits after a checkpoint take the sum of their round trips instead of the longest."""
    loop = asyncio.get_running_loop()
    lock = _TRANSACTION_END_LOCKS.get(loop)
    if lock is None:
        lock = _TRANSACTION_END_LOCKS[loop] = asyncio.Lock()
    return lock


class TransactionCommitError(InfrastructureError):
    """A pre-committed transaction could not be committed, or its outcome is unknown (the
    message names the sink, the transaction and what happens next: one line in the CLI)."""


class ExactlyOnceWriter(SinkWriter):
    def __init__(self, sink: KafkaSink, context: RuntimeContext) -> None:
        self.sink = sink
        self.context = context
        self.prefix = f"{sink.transactional_id_prefix}-{context.subtask_index}"
        self.free: deque[str] = deque(
            f"{self.prefix}-{k}" for k in range(sink.transactional_id_pool)
        )
        self.current: AIOKafkaProducer | None = None
        self.current_id: str | None = None
        self.batches: PartitionBatches | None = None
        """The current transaction's batches."""
        self.precommitted: list[dict[str, Any]] = []
        self.producers: dict[str, AIOKafkaProducer] = {}
        self._old_parallelism = context.parallelism
        self._restored = False
        self._output_checked = False

    # ---------------------------------------------------------------- guard rails

    def _check_timeout(self) -> None:
        timeout = self.sink.transaction_timeout_ms
        interval = self.context.checkpoint_interval_s
        required = int((interval or 0) * 1000) + RESTART_ALLOWANCE_MS
        if timeout < required:
            msg = (
                f"KafkaSink {self.context.operator_name!r}: transaction_timeout_ms={timeout} is too "
                f"short: it must exceed the checkpoint interval ({interval}s) plus "
                f"{RESTART_ALLOWANCE_MS} ms to restart, or the broker aborts transactions that "
                "are waiting for their checkpoint (data loss)"
            )
            raise ValueError(msg)
        maximum = self.sink.broker_max_transaction_timeout_ms or DEFAULT_BROKER_MAX_TIMEOUT_MS
        if timeout > maximum:
            msg = (
                f"KafkaSink {self.context.operator_name!r}: transaction_timeout_ms={timeout} "
                f"exceeds the broker's transaction.max.timeout.ms ({maximum}); lower it or raise "
                "the broker's limit"
            )
            raise ValueError(msg)

    # ---------------------------------------------------------------- lifecycle

    def _describe(self) -> str:
        topic = self.sink.topic if isinstance(self.sink.topic, str) else "topics chosen per record"
        return (
            f"KafkaSink {self.context.operator_name!r} (topic {topic}, transactional_id_prefix "
            f"{self.sink.transactional_id_prefix!r})"
        )

    def _check_newer_committed_output(self) -> None:
        """Checkpoints newer than the restored one (all, on a fresh start) completed, so their
        transactions were probably committed, and committed Kafka records cannot be taken back:
        replaying would write them again. Refused unless the user accepts it."""
        if self._output_checked:
            return
        self._output_checked = True
        restore = self.context.restore
        newer = ", ".join(str(n) for n in restore.newer_completed_checkpoints)
        if not newer:
            return
        loud = self.context.subtask_index == 0
        if restore.checkpoint_id is None:
            if restore.allow_existing_output:
                if loud:
                    log.warning(
                        "%s: starting without restored state although checkpoint(s) %s "
                        "completed: records their transactions committed are written again "
                        "(--allow-existing-output)",
                        self._describe(),
                        newer,
                    )
                return
            msg = (
                f"{self._describe()}: refusing to start without restored state: checkpoint(s) "
                f"{newer} of an earlier run completed (valid or damaged), so their Kafka "
                "transactions were probably committed; starting from the beginning would write "
                "those records again. Restore the right checkpoint (--restore PATH), use another "
                "transactional_id_prefix (and output topic) for a new run, or pass "
                "--allow-existing-output to write the duplicates"
            )
            raise RestoreRefusedError(msg)
        if restore.on_newer_committed_output is NewerOutputPolicy.KEEP:
            if loud:
                log.warning(
                    "%s: restoring checkpoint %s although checkpoint(s) %s completed after it: "
                    "the records their transactions committed are written again "
                    "(--on-newer-committed-output keep)",
                    self._describe(),
                    restore.checkpoint_id,
                    newer,
                )
            return
        msg = (
            f"{self._describe()}: refusing to restore checkpoint {restore.checkpoint_id}: "
            f"checkpoint(s) {newer} completed after it and committed Kafka transactions, which "
            f"cannot be taken back (--on-newer-committed-output {restore.on_newer_committed_output}"
            " can only refuse here); restoring checkpoint "
            f"{restore.checkpoint_id} would write the records they committed again. Restore the "
            "newest valid checkpoint, or accept the duplicates with "
            "--on-newer-committed-output keep"
        )
        raise RestoreRefusedError(msg)

    async def restore(self, state: list[Any]) -> None:
        crash_point(
            "during-restore", f"Kafka exactly-once sink subtask {self.context.subtask_index}"
        )
        self._check_newer_committed_output()
        self._restored = True
        for entry in state:
            if entry.get("kind") == "owner":
                self._old_parallelism = max(self._old_parallelism, entry["parallelism"])
        pending = sorted(
            (e for e in state if e.get("kind") == "transaction"), key=lambda e: e["checkpoint"]
        )
        if pending:
            await self._recommit(pending)

    async def _recommit(self, entries: list[dict[str, Any]]) -> None:
        client = self.sink.clients.client("re-commit of restored transactions")
        await client.bootstrap()
        try:
            for entry in entries:
                await self._recommit_one(client, entry)
        finally:
            await client.close()

    async def _recommit_one(self, client: AIOKafkaClient, entry: dict[str, Any]) -> None:
        """Commit one restored transaction again (EndTxn with its recorded producer id and epoch).

        Done, fenced or already completed are all normal outcomes: the id moves on to a newer
        epoch only after this transaction committed (see the module docstring), or an earlier
        restore already committed it and fenced the id. Brokers report a fenced epoch as an
        error code (Apache Kafka) or by closing the connection (Tansu). A closed connection is
        retried once on a fresh connection after the broker answered a coordinator lookup: if
        the broker is reachable and closes the EndTxn again, the request was refused.
        """
        tid = entry["transactional_id"]
        where = f"transaction {tid} pre-committed at checkpoint {entry['checkpoint']}"
        request = EndTxnRequest(tid, entry["producer_id"], entry["epoch"], True)
        for attempt in (1, 2):
            try:
                node = await client.coordinator_lookup(CoordinationType.TRANSACTION, tid)
            except KafkaError as exc:
                msg = (
                    f"KafkaSink {self.context.operator_name!r}: cannot re-commit {where}: the "
                    f"broker {self.sink.bootstrap_servers} does not answer ({exc}); the job fails "
                    "over and tries again"
                )
                raise TransactionCommitError(msg) from exc
            try:
                async with transaction_ends_one_at_a_time():
                    response = await asyncio.wait_for(client.send(node, request), COMMIT_TIMEOUT_S)
            except KafkaConnectionError as exc:
                if attempt == 1:
                    log.info("re-committing %s: connection closed (%s), retrying once", where, exc)
                    continue
                log.info(
                    "%s was already committed: the broker refused its EndTxn for producer id %s "
                    "epoch %s by closing the connection (the id is fenced by a newer producer)",
                    where,
                    entry["producer_id"],
                    entry["epoch"],
                )
                return
            break
        error = for_code(response.error_code)
        if response.error_code == 0:
            log.info("re-committed %s", where)
        elif error.__name__ in ("ProducerFenced", "InvalidProducerEpoch"):
            log.info("%s was already committed (its producer is fenced)", where)
        else:
            msg = (
                f"KafkaSink {self.context.operator_name!r}: cannot commit {where}: "
                f"{error.__name__}; if it timed out on the broker its records are lost"
            )
            raise TransactionCommitError(msg)

    async def open(self) -> None:
        self._check_timeout()
        # Before the pool is touched: fencing aborts the open transactions the right checkpoint
        # would still commit.
        self._check_newer_committed_output()
        # Starting a producer on each id of the pool fences whatever a failed attempt left open.
        ids = list(self.free)
        if self.context.subtask_index == 0:
            for old in range(self.context.parallelism, self._old_parallelism):
                ids.extend(
                    f"{self.sink.transactional_id_prefix}-{old}-{k}"
                    for k in range(self.sink.transactional_id_pool)
                )
        used_before: list[str] = []
        for tid in ids:
            producer = self._new_producer(tid)
            # Fencing aborts what an earlier attempt left open: a transaction end too.
            async with transaction_ends_one_at_a_time():
                await start_client(producer)
            epoch = producer._txn_manager.producer_epoch
            await stop_client(producer)
            if epoch > 0 and tid not in self.sink.initialised_ids:
                used_before.append(f"{tid} (epoch {epoch})")
            self.sink.initialised_ids.add(tid)
        if used_before and not self._restored:
            self._refuse_used_pool(used_before)
        log.info(
            "%s subtask %d: fenced transactional ids %s (what an earlier attempt left open)",
            self.context.operator_name,
            self.context.subtask_index,
            ", ".join(ids),
        )

    def _refuse_used_pool(self, used_before: list[str]) -> None:
        """A fresh start on ids an earlier run used: that run probably committed records, which
        this run would write again (an InitProducerId answers epoch 0 only for an unused id;
        ids this process used itself, in an attempt that completed no checkpoint, do not count).
        """
        if self.context.restore.allow_existing_output:
            if self.context.subtask_index == 0:
                log.warning(
                    "%s: starting without restored state on transactional ids an earlier run "
                    "used (%s): records it committed are written again (--allow-existing-output)",
                    self._describe(),
                    ", ".join(used_before),
                )
            return
        msg = (
            f"{self._describe()}: refusing to start without restored state: transactional ids "
            f"{', '.join(used_before)} were used by an earlier run, which probably committed "
            "records; starting from the beginning would write them again. Restore the right "
            "checkpoint (--restore PATH), use another transactional_id_prefix (and output topic) "
            "for a new run, or pass --allow-existing-output to write the duplicates"
        )
        raise RestoreRefusedError(msg)

    def _new_producer(self, transactional_id: str) -> AIOKafkaProducer:
        producer: AIOKafkaProducer = self.sink.clients.transactional_producer(
            "exactly-once sink",
            transactional_id,
            self.sink.transaction_timeout_ms,
            {"max_batch_size": SINK_MAX_BATCH_BYTES},
        )
        return producer

    async def write(self, values: list[Any]) -> None:
        if self.current is None:
            if not self.free:
                msg = (
                    f"KafkaSink {self.context.operator_name!r}: all "
                    f"{self.sink.transactional_id_pool} transactional ids are waiting for their "
                    "checkpoint to complete; raise transactional_id_pool above the number of "
                    "checkpoints that can be pending at once"
                )
                raise TransactionCommitError(msg)
            tid = self.free.popleft()
            producer = self._new_producer(tid)
            await start_client(producer)
            await producer.begin_transaction()
            self.current, self.current_id = producer, tid
            self.batches = self.sink.partition_batches(producer)
        assert self.batches is not None
        await self.batches.add(values)

    async def snapshot_state(self, checkpoint_id: int) -> list[Any]:
        if self.current is not None:
            assert self.batches is not None
            acks = await self.batches.flush()
            # Every batch of the transaction is among them: awaiting them is the producer's flush.
            for future in acks:
                await future
            self.batches = None
            txn = self.current._txn_manager
            assert self.current_id is not None
            self.precommitted.append(
                {
                    "kind": "transaction",
                    "checkpoint": checkpoint_id,
                    "transactional_id": self.current_id,
                    "producer_id": txn.producer_id,
                    "epoch": txn.producer_epoch,
                }
            )
            self.producers[self.current_id] = self.current
            self.current, self.current_id = None, None
        owner = {
            "kind": "owner",
            "subtask": self.context.subtask_index,
            "parallelism": self.context.parallelism,
        }
        return [owner, *(dict(e) for e in self.precommitted)]

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        due = [e for e in self.precommitted if e["checkpoint"] <= checkpoint_id]
        if not due:
            return
        crash_point(
            "before-commit", f"Kafka exactly-once sink subtask {self.context.subtask_index}"
        )
        for entry in due:
            tid = entry["transactional_id"]
            producer = self.producers[tid]
            try:
                async with transaction_ends_one_at_a_time():
                    await asyncio.wait_for(producer.commit_transaction(), COMMIT_TIMEOUT_S)
            except Exception as exc:
                msg = (
                    f"KafkaSink {self.context.operator_name!r}: committing transaction {tid} of "
                    f"checkpoint {entry['checkpoint']} failed or timed out ({exc!r}); the job "
                    "fails over and commits it again from the checkpoint"
                )
                raise TransactionCommitError(msg) from exc
            del self.producers[tid]
            await stop_client(producer)
            self.precommitted.remove(entry)
            self.free.append(tid)

    async def close(self) -> None:
        # Open or pre-committed transactions stay as they are: a restore commits the
        # pre-committed ones and fences the rest.
        if self.batches is not None:
            self.batches.close()
            self.batches = None
        for producer in [self.current, *self.producers.values()]:
            if producer is not None:
                with contextlib.suppress(Exception):
                    await stop_client(producer)
        self.current = None
        self.producers.clear()
