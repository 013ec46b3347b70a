"""Key groups: routing that does not depend on the process, ranges that tile, clear key errors."""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run_python

from actors.partitioner import KeyGroupPartitioner
from connectors import CollectionSource, CollectSink
from runtime import JobFailedError, KeyedProcessFunction, run_job
from state.keyed import ValueStateDescriptor
from state.keygroups import (
    DEFAULT_MAX_PARALLELISM,
    KeyGroupRange,
    UnhashableKeyError,
    key_group_for_key,
    key_group_range_for_subtask,
    stable_hash,
    subtask_for_key_group,
)

ROOT = Path(__file__).resolve().parent.parent

# Written into a subprocess: computes key groups and partitioner routing for a fixed key list.
ROUTING_SCRIPT = r"""
import json, sys
from actors.partitioner import KeyGroupPartitioner
from state.keygroups import key_group_for_key, stable_hash

keys = [
    "", "a", "b", "word", "hello world", "Grüße", "日本語", "emoji 🚀", "x" * 300,
    b"", b"a", b"\x00\xff bytes", bytes(range(256)),
    0, 1, -1, 2, 42, 2**31, 2**62 + 7, -(2**63), 12345678901234567890,
    True, False, None, 1.5, -0.25, 3.0,
    ("a", 1), ("a", 2), (1, "a"), (b"k", ("nested", 3), None), (), ("",),
]
result = {"hash_of_str": hash("salted?"), "groups": {}, "stable": [], "routing": {}}
for maxp in (128, 7, 32768):
    result["groups"][str(maxp)] = [key_group_for_key(k, maxp) for k in keys]
result["stable"] = [stable_hash(k) for k in keys]
for maxp, channels in ((128, 3), (128, 4), (1000, 7)):
    part = KeyGroupPartitioner(lambda record: record[0], maxp)
    records = [(k, i) for i, k in enumerate(keys)]
    routed = part.route(records, None, channels)
    result["routing"][f"{maxp}/{channels}"] = {
        str(channel): [i for _, i in values] for channel, values, _ in routed
    }
json.dump(result, sys.stdout)
"""


def run_with_hash_seed(seed: str) -> dict[str, Any]:
    proc = run_python(ROUTING_SCRIPT, dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT)))
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_routing_is_identical_across_processes_with_different_hash_seeds() -> None:
    first = run_with_hash_seed("1")
    second = run_with_hash_seed("2")
    # The two processes really salt str hashes differently (so the comparison below means something).
    assert first["hash_of_str"] != second["hash_of_str"]
    assert first["stable"] == second["stable"]
    assert first["groups"] == second["groups"]
    assert first["routing"] == second["routing"]
    # ...and equal to this process (seeded however pytest was started).
    for maxp, groups in first["groups"].items():
        assert all(0 <= g < int(maxp) for g in groups)
    assert first["stable"][1] == stable_hash("a")
    assert all(h >= 0 for h in first["stable"])


def test_partitioner_routes_each_key_to_the_subtask_owning_its_key_group() -> None:
    keys: list[Any] = (
        [f"user-{i}" for i in range(500)]
        + list(range(-250, 250))
        + [(f"t{i}", i) for i in range(100)]
    )
    for maxp, channels in ((128, 1), (128, 3), (128, 4), (128, 128), (10, 3), (1000, 7)):
        part = KeyGroupPartitioner(lambda record: record, maxp)
        routed = part.route(list(keys), None, channels)
        seen = 0
        for channel, values, stamps in routed:
            assert stamps is None
            owned = key_group_range_for_subtask(maxp, channels, channel)
            for key in values:
                assert key_group_for_key(key, maxp) in owned, (key, maxp, channels, channel)
                assert (
                    subtask_for_key_group(maxp, channels, key_group_for_key(key, maxp)) == channel
                )
            seen += len(values)
        assert seen == len(keys)


def test_partitioner_keeps_timestamps_with_their_records_and_record_order_per_channel() -> None:
    part = KeyGroupPartitioner(lambda record: record[0], 128)
    values = [(f"k{i % 13}", i) for i in range(200)]
    timestamps = [1000 + i for i in range(200)]
    routed = part.route(values, timestamps, 4)
    for _, vals, stamps in routed:
        assert stamps is not None
        assert stamps == [1000 + i for _, i in vals]
        assert [i for _, i in vals] == sorted(i for _, i in vals)
    assert sorted(v for _, vals, _ in routed for v in vals) == sorted(values)


def test_equal_keys_of_different_int_like_types_share_a_key_group() -> None:
    # Keys that are equal in a dict are one key in keyed state, so they must route together.
    assert key_group_for_key(1, 128) == key_group_for_key(True, 128) == key_group_for_key(1.0, 128)
    assert (
        key_group_for_key(0, 128) == key_group_for_key(False, 128) == key_group_for_key(-0.0, 128)
    )

    class Level(enum.IntEnum):
        HIGH = 7

    class Color(enum.StrEnum):
        RED = "red"

    assert key_group_for_key(Level.HIGH, 128) == key_group_for_key(7, 128)
    assert key_group_for_key(Color.RED, 128) == key_group_for_key("red", 128)
    # str and bytes with the same content are different keys and need not collide.
    assert stable_hash("abc") != stable_hash(b"abc")


@pytest.mark.parametrize(
    ("max_parallelism", "parallelism"),
    [(128, 1), (128, 3), (128, 7), (128, 128), (1, 1), (10, 3), (10, 10), (1000, 7), (32768, 13)],
)
def test_key_group_ranges_tile_exactly_and_invert(max_parallelism: int, parallelism: int) -> None:
    ranges = [
        key_group_range_for_subtask(max_parallelism, parallelism, i) for i in range(parallelism)
    ]
    covered = [kg for r in ranges for kg in r]
    assert covered == list(range(max_parallelism)), "every key group exactly once, in order"
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert all(size >= 1 for size in sizes)
    for index, key_group_range in enumerate(ranges):
        for key_group in key_group_range:
            assert subtask_for_key_group(max_parallelism, parallelism, key_group) == index
        assert key_group_range.start - 1 not in key_group_range
        assert key_group_range.end + 1 not in key_group_range


def test_key_group_range_rejects_impossible_parallelism() -> None:
    with pytest.raises(ValueError, match="max parallelism 4"):
        key_group_range_for_subtask(4, 5, 0)
    with pytest.raises(ValueError, match="max parallelism"):
        key_group_range_for_subtask(0, 1, 0)
    assert len(KeyGroupRange(5, 4)) == 0


@pytest.mark.parametrize(
    "key",
    [["a", "list"], {"a": 1}, {1, 2}, object(), ("ok", ["nested list"]), complex(1, 2)],
    ids=["list", "dict", "set", "object", "tuple-with-list", "complex"],
)
def test_unsupported_key_types_raise_a_clear_error(key: Any) -> None:
    with pytest.raises(UnhashableKeyError) as info:
        key_group_for_key(key, DEFAULT_MAX_PARALLELISM)
    message = str(info.value)
    assert "has no stable hash" in message
    assert "key_by()" in message
    inner = key[1] if isinstance(key, tuple) else key
    assert type(inner).__name__ in message
    assert isinstance(info.value, TypeError)


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque key>"


class _CountPerKey(KeyedProcessFunction[Any, Any, Any]):
    def open(self, ctx: Any) -> None:
        self.count = ctx.get_state(ValueStateDescriptor("count", 0))

    def process_element(self, value: Any, ctx: Any, out: Any) -> None:
        self.count.update(self.count.value() + 1)
        out.collect(value)


@pytest.mark.parametrize("parallelism", [1, 2])
def test_job_keyed_by_an_unsupported_type_fails_before_any_output(parallelism: int) -> None:
    """The same job must not work at one parallelism and fail at another: the key is rejected as
    soon as it is used, naming its type, before any record reaches the sink."""
    opaque = _Opaque()
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(range(10)))
            .key_by(lambda record: opaque)
            .process(_CountPerKey(), name="count")
            .sink_to(sink)
        )

    with pytest.raises(JobFailedError) as info:
        run_job(build, parallelism=parallelism)
    assert "_Opaque has no stable hash" in str(info.value)
    assert sink.results == []


@pytest.mark.parametrize("parallelism", [1, 2])
def test_record_with_an_unsupported_key_among_good_ones_never_reaches_the_sink(
    parallelism: int,
) -> None:
    """Only record 7 has a bad key (a malformed record, say): it is rejected when it is keyed, at
    every parallelism, not accepted and processed only to fail the job's next checkpoint."""
    opaque = _Opaque()
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(range(10)))
            .key_by(lambda record: opaque if record == 7 else f"key-{record % 3}")
            .process(_CountPerKey(), name="count")
            .sink_to(sink)
        )

    with pytest.raises(JobFailedError) as info:
        run_job(build, parallelism=parallelism)
    assert "_Opaque has no stable hash" in str(info.value)
    assert 7 not in sink.results


class Color(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


def test_job_keyed_by_a_str_enum_runs_to_the_end() -> None:
    """``stable_hash`` supports str subclasses such as ``enum.StrEnum``, so a keyed job over them
    must also be able to checkpoint its keyed state (the final checkpoint of a bounded job)."""
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource([Color.RED, Color.BLUE, Color.RED]))
            .key_by(lambda color: color)
            .process(_CountPerKey(), name="count")
            .sink_to(sink)
        )

    run_job(build, parallelism=2)
    assert sorted(sink.results) == sorted([Color.RED, Color.BLUE, Color.RED])
