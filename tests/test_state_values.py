"""Which values state can hold: the common Python types round-trip through snapshots as
themselves (no pickle), and anything else is refused when it is written, not at the first
checkpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import decimal
import json
import os
import uuid
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cli_helpers import run_python
from test_checkpointing import GATE, GatedSource

from connectors import CollectionSource, CollectSink
from runtime import (
    CheckpointConfig,
    Collector,
    ExecutionConfig,
    JobFailedError,
    KeyedProcessContext,
    KeyedProcessFunction,
    RuntimeContext,
    run_job,
    testing,
)
from runtime.master.jobmaster import JobMaster
from runtime.master.restart import FixedDelayRestart
from runtime.shell.runner import build_graph
from state import (
    KeyedStateBackend,
    KeyGroupRange,
    ListStateDescriptor,
    MapStateDescriptor,
    OperatorStateStore,
    ReducingStateDescriptor,
    StateSerializationError,
    StateSerializer,
    ValueStateDescriptor,
    key_group_for_key,
    serde,
)
from state.keygroups import stable_hash
from state.serde import packb, unpackb

ROOT = Path(__file__).resolve().parent.parent
MAXP = 128
WAIT_S = 10.0
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
EST = dt.timezone(dt.timedelta(hours=-5), "EST")

SUPPORTED: list[Any] = [
    {1, "two", (3, 4)},
    set(),
    frozenset({"a", b"b", 3.5}),
    (1, ("nested", None)),
    dt.datetime(2024, 2, 29, 23, 59, 58, 123456),
    dt.datetime(2024, 3, 31, 1, 30, tzinfo=dt.UTC),
    dt.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=BERLIN),  # the second 02:30 of that night
    dt.datetime(2024, 1, 1, 12, tzinfo=EST),
    dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    dt.date(1999, 12, 31),
    dt.time(23, 59, 59, 999999),
    dt.time(8, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.timedelta(days=-3, seconds=5, microseconds=7),
    decimal.Decimal("-1234.5600"),
    decimal.Decimal("1E+30"),
    decimal.Decimal("Infinity"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
]


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same type all the way down (a tuple is not a list, a set not a list)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            any(_same(k, k2) and _same(v, b[k2]) for k2 in b if k2 == k) for k, v in a.items()
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, set | frozenset):
        return a == b and sorted(map(repr, a)) == sorted(map(repr, b))
    if isinstance(a, dt.datetime | dt.time):
        return a == b and a.fold == b.fold and a.tzinfo == b.tzinfo and str(a) == str(b)
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)  # also the exponent: Decimal("1.50") stays "1.50"
    return bool(a == b)


@pytest.mark.parametrize("value", SUPPORTED, ids=[type(v).__name__ for v in SUPPORTED])
def test_supported_types_round_trip_as_themselves(value: Any) -> None:
    assert _same(unpackb(packb(value)), value)


def test_supported_types_round_trip_as_dict_keys_and_inside_containers() -> None:
    hashable = [v for v in SUPPORTED if not isinstance(v, set)]
    value = {
        "by_type": {v: [v, (v,), {"again": v}] for v in hashable},
        "sets": [{1, 2}, frozenset({frozenset({dt.date(2020, 1, 1)})})],
        "nan": decimal.Decimal("NaN"),
    }
    back = unpackb(packb(value))
    assert back["by_type"].keys() == value["by_type"].keys()
    for key, entry in value["by_type"].items():
        assert _same(back["by_type"][key], entry)
    assert _same(back["sets"], value["sets"])
    assert back["nan"].is_nan()


def test_decoding_gives_what_msgpack_s_own_decoder_gives() -> None:
    """``unpackb`` decodes with msgspec (faster); msgpack's decoder with the same extension
    types is the reference, so bytes written before decode as they did. Broken bytes are a
    ValueError with either, which is what readers of checkpoint files and frames catch."""
    value = {
        "all": SUPPORTED,
        "keys": {v: i for i, v in enumerate(SUPPORTED) if not isinstance(v, set)},
        "ints": [0, -1, 2**63 - 1, -(2**63), 2**64 - 1],
        "floats": [0.1, -0.0, float("inf")],
        "text": ["", "é" * 40, "x" * 70_000],
        "bytes": [b"", b"\x00" * 300, bytearray(b"ab")],
        "maps": [{}, {1: None, 2.5: True, b"k": [[], {}]}],
    }
    data = packb(value)

    def reference_hook(code: int, payload: bytes) -> Any:
        return serde._ext_hook(code, memoryview(payload))

    reference = msgpack.unpackb(data, ext_hook=reference_hook, raw=False, strict_map_key=False)
    assert _same(unpackb(data), reference)
    for broken in (data[:-1], data + b"\x00", b"\xc1"):
        with pytest.raises(ValueError, match=r"truncated|malformed"):
            unpackb(broken)


class _OtherZone(dt.tzinfo):
    def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=1)

    def dst(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)


def test_a_time_zone_class_that_is_not_restorable_without_code_is_refused() -> None:
    with pytest.raises(TypeError, match=r"_OtherZone.*datetime.timezone or zoneinfo.ZoneInfo"):
        packb(dt.datetime(2024, 1, 1, tzinfo=_OtherZone()))


# ------------------------------------------------------------------------------------------------
# through a real checkpoint and restore


START = dt.datetime(2024, 3, 31, 1, 0, tzinfo=BERLIN)  # the night clocks move forward


class TagsAndTimes(KeyedProcessFunction[str, str, Any]):
    """Per key: the set of tags seen (value state holding a set), the time of the first record
    (value state holding an aware datetime), and a Decimal amount per day (map state keyed by
    date). Emits what it holds, with the types, after every record."""

    def open(self, ctx: RuntimeContext) -> None:
        self.tags = ctx.get_state(ValueStateDescriptor("tags"))
        self.first = ctx.get_state(ValueStateDescriptor("first"))
        self.per_day = ctx.get_state(MapStateDescriptor("per-day"))

    def process_element(
        self, value: str, ctx: KeyedProcessContext[str], out: Collector[Any]
    ) -> None:
        tags, first, _ = step(value, self.tags.value(), self.first.value(), self.per_day)
        self.tags.update(tags)
        self.first.update(first)
        out.collect(describe(ctx.current_key, tags, first, dict(self.per_day.items())))


def step(value: str, tags: set[int] | None, first: dt.datetime | None, per_day: Any) -> Any:
    """One record's change of the state; shared by the job and the plain computation."""
    index = int(value.split("/")[1])
    tags = set(tags or ()) | {index % 4}
    first = first or START + dt.timedelta(minutes=index)
    day = (START + dt.timedelta(hours=index * 5)).date()
    per_day.put(day, (per_day.get(day) or decimal.Decimal("0.00")) + decimal.Decimal("0.10"))
    return tags, first, per_day


def describe(key: str, tags: Any, first: Any, per_day: dict[Any, Any]) -> list[Any]:
    kinds = sorted({type(tags).__name__, type(first).__name__, type(first.tzinfo).__name__}
                   | {type(d).__name__ for d in per_day} | {type(a).__name__ for a in per_day.values()})  # fmt: skip
    days = sorted((d.isoformat(), str(a)) for d, a in per_day.items())
    return [key, sorted(tags), first.isoformat(), days, kinds]


class _DictMap:
    """MapState's put/get over a dict, for the plain computation."""

    def __init__(self) -> None:
        self.entries: dict[Any, Any] = {}

    def put(self, key: Any, value: Any) -> None:
        self.entries[key] = value

    def get(self, key: Any) -> Any:
        return self.entries.get(key)


def expected_output(records: list[str]) -> list[list[Any]]:
    state: dict[str, tuple[Any, Any, _DictMap]] = {}
    out = []
    for record in records:
        key = record.split("/")[0]
        tags, first, per_day = state.get(key, (None, None, _DictMap()))
        tags, first, per_day = step(record, tags, first, per_day)
        state[key] = (tags, first, per_day)
        out.append(describe(key, tags, first, per_day.entries))
    return out


@pytest.mark.asyncio
async def test_set_datetime_date_and_decimal_state_survive_a_checkpoint_and_restore() -> None:
    records = [f"k{i % 5}/{i}" for i in range(120)]
    sink = testing.TestingSink()
    # Crash 20 records after a checkpoint that covered the first 60 records completed: the
    # restart restores the state of those 60 from the checkpoint.
    source = GatedSource(
        [*records[:60], GATE, *records[60:80], testing.TestingSource.CRASH, *records[80:]],
        extra=lambda: len(sink.committed) >= 60,
    )

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("source")
            .key_by(lambda r: r.split("/")[0])
            .process(TagsAndTimes(), name="tags")
            .uid("tags")
            .sink_to(sink)
            .uid("sink")
        )

    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=0.05), restart_strategy=FixedDelayRestart(3, 0)
    )
    result = await asyncio.wait_for(JobMaster(build_graph(build, {}, 1), config).run(), WAIT_S)

    assert result.attempts == 2
    assert source.crashed
    assert sink.committed == expected_output(records)
    assert sink.committed[-1][-1] == ["Decimal", "ZoneInfo", "date", "datetime", "set"]


# ------------------------------------------------------------------------------------------------
# refused when written


@dataclasses.dataclass
class Reading:
    sensor: str
    value: float


def _backend() -> KeyedStateBackend:
    backend = KeyedStateBackend(
        "operator 'readings' (subtask 1/1)", KeyGroupRange(0, MAXP - 1), MAXP
    )
    backend.current_key = "k"
    return backend


def _keyed(descriptor: Any) -> Any:
    return _backend().get_state(descriptor)


def _operator_store() -> OperatorStateStore:
    return OperatorStateStore("'readings' (subtask 1/1)")


READING = Reading("s1", 1.5)
WRITES: list[tuple[str, str, Callable[[], Any]]] = [
    ("value.update", "latest", lambda: _keyed(ValueStateDescriptor("latest")).update(READING)),
    ("list.add", "history", lambda: _keyed(ListStateDescriptor("history")).add(READING)),
    ("list.add_all", "history", lambda: _keyed(ListStateDescriptor("history")).add_all([1, READING])),
    ("list.update", "history", lambda: _keyed(ListStateDescriptor("history")).update([READING])),
    ("map.put-value", "by-sensor",
     lambda: _keyed(MapStateDescriptor("by-sensor")).put("s1", READING)),
    ("map.put-nested", "by-sensor",
     lambda: _keyed(MapStateDescriptor("by-sensor")).put("s1", {"last": [READING]})),
    ("map.put_all", "by-sensor",
     lambda: _keyed(MapStateDescriptor("by-sensor")).put_all({"s1": READING})),
    ("reducing.add", "sum",
     lambda: _keyed(ReducingStateDescriptor("sum", lambda a, b: b)).add(READING)),
    ("operator-list.add", "buffer", lambda: _operator_store().get_list_state("buffer").add(READING)),
    ("operator-list.update", "buffer",
     lambda: _operator_store().get_list_state("buffer").update([READING])),
    ("broadcast.put", "rules", lambda: _operator_store().get_broadcast_state("rules").put("r", READING)),
]  # fmt: skip


@pytest.mark.parametrize(("state", "write"), [w[1:] for w in WRITES], ids=[w[0] for w in WRITES])
def test_every_state_write_refuses_a_dataclass_at_once(
    state: str, write: Callable[[], Any]
) -> None:
    with pytest.raises(StateSerializationError) as info:
        write()
    message = str(info.value)
    assert f"state {state!r}" in message
    assert "operator 'readings' (subtask 1/1)" in message
    assert "Reading" in message
    assert "dataclasses.asdict" in message
    assert "StateSerializer" in message


def test_refused_write_leaves_the_state_as_it_was() -> None:
    state = _keyed(ListStateDescriptor("history"))
    state.add(1)
    with pytest.raises(StateSerializationError):
        state.add_all([2, READING])
    assert state.get() == [1]


def test_state_with_a_serializer_takes_any_value() -> None:
    serializer = StateSerializer(dataclasses.asdict, lambda d: Reading(**d))
    state = _keyed(ValueStateDescriptor("latest", serializer=serializer))
    state.update(READING)
    assert state.value() == READING


def test_supported_values_are_accepted_by_every_state_kind() -> None:
    backend = _backend()
    value = backend.get_state(ValueStateDescriptor("v"))
    lst = backend.get_state(ListStateDescriptor("l"))
    mp = backend.get_state(MapStateDescriptor("m"))
    for item in SUPPORTED:
        value.update(item)
        lst.add(item)
        mp.put(str(item), {"v": item, "t": (item,)})
    mp.put_all({dt.date(2020, 1, 1): decimal.Decimal("1.5")})
    lst.update([{1, 2}, frozenset()])
    assert value.value() == SUPPORTED[-1]
    assert lst.get() == [{1, 2}, frozenset()]
    assert mp.get(dt.date(2020, 1, 1)) == decimal.Decimal("1.5")


class KeepsReadings(KeyedProcessFunction[str, Any, Any]):
    def open(self, ctx: RuntimeContext) -> None:
        self.latest = ctx.get_state(ValueStateDescriptor("latest"))

    def process_element(
        self, value: Any, ctx: KeyedProcessContext[str], out: Collector[Any]
    ) -> None:
        self.latest.update(Reading(value, 1.0))
        out.collect(value)


def test_a_job_storing_a_dataclass_fails_at_the_write_without_checkpointing() -> None:
    """Without checkpoints the bad value would never be noticed; it fails at once all the same,
    naming the operator, the state and the type."""
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(["a", "b"]))
            .key_by(lambda v: v)
            .process(KeepsReadings(), name="keep")
            .sink_to(sink)
        )

    with pytest.raises(JobFailedError) as info:
        run_job(build)
    message = str(info.value)
    assert "operator 'keep' (subtask 1/1)" in message
    assert "value state 'latest'" in message
    assert "test_state_values.Reading" in message
    assert sink.results == []


def test_a_reduce_producing_a_dataclass_fails_at_once() -> None:
    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource([1, 2, 3, 4]))
            .map(lambda i: {"k": i % 2, "n": i})
            .key_by(lambda r: r["k"])
            .reduce(lambda a, b: Reading(str(a["k"]), b["n"]), name="sum")
            .sink_to(CollectSink())
        )

    with pytest.raises(JobFailedError) as info:
        run_job(build)
    assert "operator 'sum' (subtask 1/1)" in str(info.value)
    assert "value state 'reduce'" in str(info.value)
    assert "Reading" in str(info.value)


# ------------------------------------------------------------------------------------------------
# key groups of the new key types


NEW_KEYS: list[Any] = [
    dt.datetime(2024, 1, 1, 12),
    dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC),
    dt.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=BERLIN),
    dt.date(2024, 1, 1),
    dt.time(12, 30),
    dt.time(12, 30, tzinfo=EST),
    dt.timedelta(hours=36),
    decimal.Decimal("19.99"),
    decimal.Decimal("-0.000001"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    frozenset({"a", "b", "c", "d", "e"}),
    ("2024-01-01", dt.date(2024, 1, 1), decimal.Decimal("1.5")),
]

KEY_GROUP_SCRIPT = """
import json, sys
from state.keygroups import key_group_for_key
from test_state_values import NEW_KEYS
json.dump([key_group_for_key(k, 128) for k in NEW_KEYS], sys.stdout)
"""


def test_new_key_types_keep_their_key_group_through_a_snapshot_and_across_processes() -> None:
    groups = [key_group_for_key(k, MAXP) for k in NEW_KEYS]
    assert [key_group_for_key(unpackb(packb(k)), MAXP) for k in NEW_KEYS] == groups
    for seed in ("1", "2"):  # str hashes (and so frozenset order) differ between the two
        env = dict(
            os.environ, PYTHONHASHSEED=seed, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}"
        )
        assert json.loads(run_python(KEY_GROUP_SCRIPT, env).stdout) == groups


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (decimal.Decimal("3"), 3),
        (decimal.Decimal("3.000"), 3.0),
        (decimal.Decimal("0.5"), 0.5),
        (decimal.Decimal("1.50"), decimal.Decimal("1.5")),
        (dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC), dt.datetime(2024, 1, 1, 13, tzinfo=BERLIN)),
        (dt.time(12, 0, tzinfo=dt.UTC), dt.time(7, 0, tzinfo=EST)),
        (dt.datetime(2024, 1, 1, 1, fold=1), dt.datetime(2024, 1, 1, 1, fold=0)),
        (frozenset({1, 2}), frozenset({2.0, 1})),
    ],
    ids=["decimal-int", "decimal-float-int", "decimal-float", "decimal-exponent", "datetime-zones",
         "time-zones", "naive-fold", "frozenset"],
)  # fmt: skip
def test_keys_that_are_equal_share_a_key_group(a: Any, b: Any) -> None:
    """A dict treats equal keys as one key, so keyed state does: they must route alike."""
    assert a == b
    assert stable_hash(a) == stable_hash(b)


def test_existing_key_hashes_are_unchanged() -> None:
    keys = ["", "a", "word", "Grüße", b"", b"a", 0, 1, -1, 42, 2**62 + 7, True, None, 1.5, -0.25,
            3.0, ("a", 1), (b"k", ("nested", 3), None), ()]  # fmt: skip
    assert [stable_hash(k) for k in keys] == [
        0, 3904355907, 3287381265, 4224938097, 1540483477, 3009828822, 0, 269157861, 1925954939,
        1416787490, 1595617054, 269157861, 0, 253860321, 3217339499, 1662265584, 1970461544,
        459687138, 3430008,
    ]  # fmt: skip


@pytest.mark.parametrize("parallelism", [1, 2])
def test_a_job_keyed_by_date_counts_per_day(parallelism: int) -> None:
    days = [dt.date(2024, 1, 1) + dt.timedelta(days=i % 3) for i in range(30)]
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(days))
            .map(lambda d: (d, 1))
            .key_by(lambda pair: pair[0])
            .reduce(lambda a, b: (a[0], a[1] + b[1]))
            .sink_to(sink)
        )

    run_job(build, parallelism=parallelism)
    final: dict[Any, int] = {}
    for day, n in sink.results:
        final[day] = max(final.get(day, 0), n)
    assert final == {d: 10 for d in set(days)}
