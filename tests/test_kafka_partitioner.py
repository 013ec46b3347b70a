"""Kafka's default partitioning in the runtime: the partition a Java producer would choose."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner

from connectors.kafka.partitioner import KeyPartitioner, default_partition, murmur2

# org.apache.kafka.common.utils.UtilsTest.testMurmur2
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("data", "expected"), JAVA_MURMUR2.items())
def test_murmur2_matches_the_java_client(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_partition_is_the_positive_hash_modulo_the_partitions_as_in_java() -> None:
    # toPositive(-790332482) = 1357151166 (the low 31 bits, not the absolute value).
    assert default_partition(b"foobar", 50) == 1357151166 % 50 == 16
    assert default_partition(b"21", 7) == (-973932308 & 0x7FFFFFFF) % 7


def test_partitions_agree_with_aiokafkas_default_partitioner_over_many_keys() -> None:
    rng = random.Random(13)
    aiokafka_partitioner = DefaultPartitioner()
    partitioner = KeyPartitioner(max_keys=64)  # small: the cache starts over many times
    for _ in range(5000):
        key = rng.randbytes(rng.randrange(0, 40))
        count = rng.randrange(1, 64)
        expected = aiokafka_partitioner(key, list(range(count)), [])
        assert default_partition(key, count) == expected, key
        assert partitioner.partition(key, count) == expected, key
        assert partitioner.partition(key, count) == expected, key  # memoised answer


def test_memoised_hashes_are_bounded_and_follow_a_new_partition_count() -> None:
    partitioner = KeyPartitioner(max_keys=10)
    for i in range(100):
        partitioner.partition(f"user-{i}".encode(), 4)
        assert len(partitioner._hashes) <= 10
    key = b"user-7"
    assert partitioner.partition(key, 4) == default_partition(key, 4)
    assert partitioner.partition(key, 12) == default_partition(key, 12)


def test_keyless_records_stick_to_one_partition_until_moved_on_round_robin() -> None:
    partitioner = KeyPartitioner()
    seen = []
    for _ in range(6):
        seen.append(partitioner.sticky("t", 3))
        assert partitioner.sticky("t", 3) == seen[-1]
        partitioner.next_sticky("t", 3)
    assert seen == [0, 1, 2, 0, 1, 2]
    assert partitioner.sticky("other", 3) == 0


def test_partitions_of_a_batch_are_each_keys_partition_and_minus_one_without_a_key() -> None:
    rng = random.Random(7)
    partitioner = KeyPartitioner(max_keys=16)  # the cache starts over within one batch
    keys: list[bytes | None] = [
        None if rng.random() < 0.1 else f"user-{rng.randrange(50)}".encode() for _ in range(500)
    ]
    for count in (1, 4, 13):
        assert partitioner.partitions(keys, count) == [
            -1 if key is None else default_partition(key, count) for key in keys
        ]
        assert len(partitioner._hashes) <= 16
