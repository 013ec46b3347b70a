"""Fetched Kafka records a record batch at a time, for the source's reader consumer.

aiokafka's consumer hands out every fetched record as a ``ConsumerRecord``: an eleven-field object
built by a Python function, one generator step and one list append per record. Measured on 10,000
records, that is about 0.55 µs of the 0.75 µs per record it takes to get from a fetched response to
a list of values, and the source reads only what the batch decoder's own record objects already
hold (offset, timestamp, key, value, headers). A consumer created with
``value_deserializer=whole_batches`` gets those record objects instead, in lists of up to
:data:`CHUNK_RECORDS` from one record batch (:func:`records_of` flattens what ``getmany`` returns).
Every other consumer of the process is unchanged.

This reaches into aiokafka's fetcher: :func:`install` replaces its ``PartitionRecords`` with a
subclass that differs only for consumers with the marker, after checking that the parts it relies
on are there. If they are not (another aiokafka version), it leaves aiokafka alone, logs why, and
consumers with the marker get ``ConsumerRecord`` objects as before: the marker is the identity, so
their values are the raw bytes either way. The tests assert that it is installed with the aiokafka
in use, so that a version that breaks it fails there rather than only running slower.
"""

from __future__ import annotations

import logging
import operator
from bisect import bisect_left
from collections.abc import Iterator
from itertools import chain
from typing import Any

import aiokafka.errors
from aiokafka.consumer import fetcher as aiokafka_fetcher

log = logging.getLogger(__name__)

CHUNK_RECORDS = 512
"""The most records in one item that a consumer with the marker hands out: with
``getmany(max_records=n)`` (which counts items) at most ``n * CHUNK_RECORDS`` records a call."""

_offset = operator.attrgetter("offset")


def whole_batches(value: bytes) -> bytes:
    """The ``value_deserializer`` that asks for whole record batches (see the module docstring).
    aiokafka never calls it once this module is installed; where it is not, it keeps the bytes."""
    return value


def records_of(items: list[Any]) -> list[Any]:
    """One partition's records from what ``getmany`` returned for it: chunks of record objects
    from a consumer with the marker, ``ConsumerRecord`` objects where the module is not
    installed. Both have ``offset``, ``timestamp``, ``key``, ``value`` and ``headers``."""
    if items and type(items[0]) is list:
        return list(chain.from_iterable(items))
    return items


_ORIGINAL = aiokafka_fetcher.PartitionRecords
_RELIED_ON = ("_consume_aborted_up_to", "_contains_abort_marker")
_RELIED_ON_ATTRIBUTES = (
    "_tp",
    "_records",
    "_check_crcs",
    "_isolation_level",
    "_aborted_producers",
    "_records_iterator",
    "next_fetch_offset",
)


class _PartitionRecords(_ORIGINAL):  # type: ignore[misc, valid-type]
    """aiokafka's ``PartitionRecords``; for a consumer with the marker, its items are chunks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "_value_deserializer", None) is whole_batches and all(
            hasattr(self, name) for name in _RELIED_ON_ATTRIBUTES
        ):
            self._records_iterator = self._unpack_chunks()

    def _unpack_chunks(self) -> Iterator[list[Any]]:
        """What aiokafka's per-record iteration skips, skipped per batch: batches that fail their
        CRC (raised, refetched), aborted transactions under read_committed, control batches, and
        the records before the fetch offset (a fetch from inside a batch returns all of it)."""
        tp, records = self._tp, self._records
        while records.has_next():
            batch = records.next_batch()
            if self._check_crcs and not batch.validate_crc():
                raise aiokafka.errors.CorruptRecordException(f"Invalid CRC - {tp}")
            if (
                self._isolation_level == aiokafka_fetcher.READ_COMMITTED
                and batch.producer_id is not None
            ):
                self._consume_aborted_up_to(batch.base_offset)
                if batch.is_control_batch and self._contains_abort_marker(batch):
                    self._aborted_producers.discard(batch.producer_id)
                if batch.is_transactional and batch.producer_id in self._aborted_producers:
                    self.next_fetch_offset = batch.next_offset
                    continue
            if batch.is_control_batch:
                self.next_fetch_offset = batch.next_offset
                continue
            found = list(batch)
            if found and found[0].offset < self.next_fetch_offset:
                found = found[bisect_left(found, self.next_fetch_offset, key=_offset) :]
            # The position moves before the chunk is handed out, as aiokafka moves it before each
            # record: a caller that stops after this chunk has consumed it. The last chunk moves it
            # to the batch's end, past records that compaction removed.
            start, last_start = 0, len(found) - CHUNK_RECORDS
            while start < last_start:
                chunk = found[start : start + CHUNK_RECORDS]
                self.next_fetch_offset = chunk[-1].offset + 1
                yield chunk
                start += CHUNK_RECORDS
            self.next_fetch_offset = batch.next_offset
            if start < len(found):
                yield found[start:] if start else found


def install() -> bool:
    """Make consumers with the marker get chunks; True if it is (or already was) in place."""
    if aiokafka_fetcher.PartitionRecords is _PartitionRecords:
        return True
    missing = [name for name in _RELIED_ON if not hasattr(_ORIGINAL, name)]
    if missing or not hasattr(aiokafka_fetcher, "READ_COMMITTED"):
        log.info(
            "aiokafka %s's fetcher lacks %s: the Kafka source reads record by record",
            aiokafka.__version__,
            ", ".join(missing or ["READ_COMMITTED"]),
        )
        return False
    aiokafka_fetcher.PartitionRecords = _PartitionRecords
    return True


def installed() -> bool:
    return aiokafka_fetcher.PartitionRecords is _PartitionRecords
