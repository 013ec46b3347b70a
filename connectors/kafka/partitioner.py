"""Kafka's default partitioning, computed in the runtime so the sink can hand batches to the client
already split by partition (see :mod:`connectors.kafka.sink`).

Keyed records go where a Java producer sends them: ``toPositive(murmur2(key)) % partitions``
(``org.apache.kafka.common.utils.Utils.murmur2`` and ``toPositive``), so the runtime and a Java or
aiokafka producer writing the same keys to the same topic agree on each key's partition. The
hash of a key is memoised (:class:`KeyPartitioner`): a job writes the same keys again and again,
and the pure-Python hash costs far more than a dictionary lookup.

Records without a key are not hashed; the sink spreads them with a sticky partition (see
:meth:`KeyPartitioner.sticky`).
"""

from __future__ import annotations

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of ``data`` as the Java client computes it: a signed 32-bit int."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    whole = length & ~3
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail == 3:
        h ^= data[whole + 2] << 16
    if tail >= 2:
        h ^= data[whole + 1] << 8
    if tail >= 1:
        h ^= data[whole]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def to_positive(number: int) -> int:
    """Java's ``Utils.toPositive``: the 31 low bits (not the absolute value)."""
    return number & 0x7FFFFFFF


def default_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a keyed record."""
    return to_positive(murmur2(key)) % partitions


class KeyPartitioner:
    """Default partitioning with the hash of each key memoised.

    The cache holds the positive hash, not the partition, so a topic that gains partitions is
    partitioned by its new count at once. It is bounded (``max_keys``): when full it starts
    over, so a job writing unboundedly many distinct keys keeps constant memory and pays the
    hash again only for keys it no longer wrote recently.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._hashes: dict[bytes, int] = {}
        self._sticky: dict[str, int] = {}

    def partition(self, key: bytes, partitions: int) -> int:
        """The partition of a keyed record in a topic of ``partitions`` partitions."""
        return self.partitions([key], partitions)[0]

    def partitions(self, keys: list[bytes | None], partitions: int) -> list[int]:
        """The partition of each key, in one pass over the batch (-1 for a record without a
        key: it goes to the :meth:`sticky` partition)."""
        known = self._hashes.get
        remember = self._remember
        return [
            -1
            if key is None
            else ((hashed if (hashed := known(key)) is not None else remember(key)) % partitions)
            for key in keys
        ]

    def _remember(self, key: bytes) -> int:
        if len(self._hashes) >= self.max_keys:
            self._hashes.clear()
        hashed = self._hashes[key] = to_positive(murmur2(key))
        return hashed

    def sticky(self, topic: str, partitions: int) -> int:
        """The partition of records without a key: one partition per batch, as Java's sticky
        partitioner (the default since Kafka 2.4) does, so keyless records fill few large
        batches instead of one small batch per partition. :meth:`next_sticky` moves on."""
        return self._sticky.get(topic, 0) % partitions

    def next_sticky(self, topic: str, partitions: int) -> None:
        """Keyless records of ``topic`` go to the next partition from now on (round robin over
        batches, so every partition gets its share)."""
        self._sticky[topic] = (self._sticky.get(topic, 0) + 1) % partitions
