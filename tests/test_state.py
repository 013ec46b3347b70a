"""Keyed state in real jobs, keyed snapshots that rescale by key group, the msgpack encoding, and
operator state redistribution."""

from __future__ import annotations

import collections
import datetime as dt
import enum
from typing import Any, NamedTuple

import pytest

from connectors import CollectionSource, CollectSink
from runtime import Collector, KeyedProcessContext, KeyedProcessFunction, RuntimeContext, run_job
from state import (
    KeyedStateBackend,
    KeyGroupRange,
    ListStateDescriptor,
    MapStateDescriptor,
    OperatorStateStore,
    Redistribution,
    ReducingStateDescriptor,
    StateSerializationError,
    StateSerializer,
    StateTtlConfig,
    ValueStateDescriptor,
    key_group_for_key,
    key_group_range_for_subtask,
)
from state.keyed import with_shared_keys
from state.operator import has_union_state, list_state_items, redistribute_operator_state
from state.serde import PlainColumn, check_encodable, packb, unpackb
from state.snapshot import OperatorSnapshot

FAR = 10**12


# ------------------------------------------------------------------------------------------------
# keyed state through a real job


def _add(a: int, b: int) -> int:
    return a + b


class AllStates(KeyedProcessFunction[Any, Any, Any]):
    """Keeps a count (value), every value (list), counts per value % 3 (map) and a sum (reducing)
    per key; emits the state after each record, and the final state from a timer at the end."""

    def open(self, ctx: RuntimeContext) -> None:
        self.count = ctx.get_state(ValueStateDescriptor("count", 0))
        self.values = ctx.get_state(ListStateDescriptor("values"))
        self.buckets = ctx.get_state(MapStateDescriptor("buckets"))
        self.total = ctx.get_state(ReducingStateDescriptor("total", _add))

    def _state(self) -> tuple[int, list[int], dict[int, int], int]:
        return (
            self.count.value(),
            self.values.get(),
            dict(self.buckets.items()),
            self.total.get(),
        )

    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        key, number = value
        assert ctx.current_key == key
        self.count.update(self.count.value() + 1)
        self.values.add(number)
        bucket = number % 3
        self.buckets.put(bucket, self.buckets.get(bucket, 0) + 1)
        self.total.add(number)
        ctx.timer_service().register_event_time_timer(FAR)
        out.collect(("after", key, *self._state()))

    def on_timer(self, timestamp: int, ctx: KeyedProcessContext[Any], out: Collector[Any]) -> None:
        out.collect(("final", ctx.current_key, *self._state()))


def make_records() -> list[tuple[Any, int]]:
    keys: list[Any] = (
        [f"user-{i}" for i in range(17)]
        + [i * 7919 for i in range(5)]
        + [("tuple", i) for i in range(4)]
    )
    return [(keys[(i * 7) % len(keys)], i) for i in range(900)]


def expected_states(records: list[tuple[Any, int]]) -> dict[Any, list[tuple[Any, ...]]]:
    count: dict[Any, int] = collections.Counter()
    values: dict[Any, list[int]] = collections.defaultdict(list)
    buckets: dict[Any, dict[int, int]] = collections.defaultdict(dict)
    total: dict[Any, int] = collections.Counter()
    after: dict[Any, list[tuple[Any, ...]]] = collections.defaultdict(list)
    for key, number in records:
        count[key] += 1
        values[key].append(number)
        buckets[key][number % 3] = buckets[key].get(number % 3, 0) + 1
        total[key] += number
        after[key].append((count[key], list(values[key]), dict(buckets[key]), total[key]))
    return after


@pytest.mark.parametrize(("source_parallelism", "keyed_parallelism"), [(1, 1), (1, 3), (3, 3)])
def test_keyed_state_per_key_equals_a_plain_python_computation(
    source_parallelism: int, keyed_parallelism: int
) -> None:
    records = make_records()
    sink = CollectSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(records))
            .set_parallelism(source_parallelism)
            .key_by(lambda r: r[0])
            .process(AllStates(), name="states")
            .set_parallelism(keyed_parallelism)
            .sink_to(sink)
            .set_parallelism(keyed_parallelism)
        )

    run_job(build)
    expected = expected_states(records)
    final = {r[1]: r[2:] for r in sink.results if r[0] == "final"}
    finals = [r for r in sink.results if r[0] == "final"]
    assert len(finals) == len(expected), "one final timer per key"
    for key, states in expected.items():
        count, values, buckets, total = final[key]
        exp_count, exp_values, exp_buckets, exp_total = states[-1]
        assert (count, buckets, total) == (exp_count, exp_buckets, exp_total), key
        assert sorted(values) == sorted(exp_values), key
        if source_parallelism == 1:
            # One source subtask: every key's records arrive in their original order.
            assert values == exp_values
    if source_parallelism == 1:
        after: dict[Any, list[tuple[Any, ...]]] = collections.defaultdict(list)
        for record in sink.results:
            if record[0] == "after":
                after[record[1]].append(record[2:])
        assert dict(after) == dict(expected)


# ------------------------------------------------------------------------------------------------
# keyed snapshots: restore by key group into other ranges (rescaling)

MAXP = 128


def filled_backend(keys: list[Any], key_groups: KeyGroupRange) -> KeyedStateBackend:
    backend = KeyedStateBackend("test", key_groups, MAXP)
    value = backend.get_state(ValueStateDescriptor("value"))
    lst = backend.get_state(ListStateDescriptor("list"))
    mp = backend.get_state(MapStateDescriptor("map"))
    red = backend.get_state(ReducingStateDescriptor("sum", _add))
    for i, key in enumerate(keys):
        backend.current_key = key
        value.update({"n": i, "pair": (i, str(key))})
        lst.add_all([i, (i, i + 1)])
        mp.put(("sub", i % 4), i)
        mp.put(i % 5, [i])
        red.add(i)
        red.add(1)
    return backend


def read_backend(backend: KeyedStateBackend, keys: list[Any]) -> dict[Any, tuple[Any, ...]]:
    value = backend.get_state(ValueStateDescriptor("value"))
    lst = backend.get_state(ListStateDescriptor("list"))
    mp = backend.get_state(MapStateDescriptor("map"))
    red = backend.get_state(ReducingStateDescriptor("sum", _add))
    result = {}
    for key in keys:
        backend.current_key = key
        if value.value() is None:
            assert lst.get() == [] and mp.is_empty() and red.get() is None
            continue
        result[key] = (value.value(), lst.get(), sorted(mp.items(), key=repr), red.get())
    return result


def round_trip(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint stores and a restore reads back."""
    decoded: dict[str, Any] = unpackb(packb(snapshot))
    return decoded


KEYS: list[Any] = (
    [f"user-{i}" for i in range(120)]
    + list(range(-20, 60))
    + [("tuple", i) for i in range(30)]
    + [b"bytes-%d" % i for i in range(10)]
)


@pytest.mark.parametrize(("old_p", "new_p"), [(1, 3), (3, 2), (2, 5), (4, 1)])
def test_keyed_snapshot_restores_by_key_group_into_other_ranges(old_p: int, new_p: int) -> None:
    all_groups = KeyGroupRange(0, MAXP - 1)
    reference = read_backend(filled_backend(KEYS, all_groups), KEYS)
    assert len(reference) == len(KEYS)

    # The old subtasks each hold only the keys of their key groups.
    snapshots = []
    for index in range(old_p):
        groups = key_group_range_for_subtask(MAXP, old_p, index)
        owned = [k for k in KEYS if key_group_for_key(k, MAXP) in groups]
        snapshots.append(round_trip(filled_backend_subset(owned, groups)))

    seen: dict[Any, tuple[Any, ...]] = {}
    for index in range(new_p):
        groups = key_group_range_for_subtask(MAXP, new_p, index)
        backend = KeyedStateBackend("restored", groups, MAXP)
        backend.restore(snapshots)
        restored = read_backend(backend, KEYS)
        for key in restored:
            assert key_group_for_key(key, MAXP) in groups, key
            assert key not in seen, f"{key!r} restored into two subtasks"
        seen.update(restored)
    assert seen == reference


def filled_backend_subset(owned: list[Any], groups: KeyGroupRange) -> dict[str, Any]:
    # Same values as filled_backend(KEYS, ...) gives each key, whatever subset a subtask owns.
    backend = KeyedStateBackend("old", groups, MAXP)
    value = backend.get_state(ValueStateDescriptor("value"))
    lst = backend.get_state(ListStateDescriptor("list"))
    mp = backend.get_state(MapStateDescriptor("map"))
    red = backend.get_state(ReducingStateDescriptor("sum", _add))
    for key in owned:
        i = KEYS.index(key)
        backend.current_key = key
        value.update({"n": i, "pair": (i, str(key))})
        lst.add_all([i, (i, i + 1)])
        mp.put(("sub", i % 4), i)
        mp.put(i % 5, [i])
        red.add(i)
        red.add(1)
    return backend.snapshot()


def test_restored_state_not_yet_used_is_carried_into_the_next_snapshot() -> None:
    all_groups = KeyGroupRange(0, MAXP - 1)
    first = round_trip(filled_backend(KEYS, all_groups).snapshot())
    middle = KeyedStateBackend("middle", all_groups, MAXP)
    middle.restore([first])
    middle.get_state(ValueStateDescriptor("value"))  # only one state asked for in this run
    second = round_trip(middle.snapshot())
    assert set(second) == {"value", "list", "map", "sum"}
    last = KeyedStateBackend("last", KeyGroupRange(0, 63), MAXP)
    last.restore([second])
    reference = read_backend(filled_backend(KEYS, all_groups), KEYS)
    restored = read_backend(last, KEYS)
    assert restored == {k: v for k, v in reference.items() if key_group_for_key(k, MAXP) < 64}


def test_states_written_together_share_one_key_column() -> None:
    """Every key is stored once however many states it has: a snapshot's later states name the
    first one's key column, which makes the encoded snapshot smaller, and reading them gives
    each state its keys."""
    backend = filled_backend(KEYS, KeyGroupRange(0, MAXP - 1))
    snapshot = backend.snapshot()
    (owner,) = [name for name, entry in snapshot.items() if "keys" in entry]
    shared = {name: entry.get("keys_of") for name, entry in snapshot.items()}
    assert shared == {name: None if name == owner else owner for name in snapshot}
    expanded = with_shared_keys(round_trip(snapshot))
    for name in ("value", "list", "map", "sum"):
        assert expanded[name]["keys"] == list(backend.keys(name)) == KEYS
        assert expanded[name]["key_types"] == ["bytes", "int", "str", "tuple"]
    assert len(packb(snapshot)) < len(packb(with_shared_keys(snapshot)))


def test_equal_keys_of_other_types_keep_their_own_columns() -> None:
    """1, 1.0 and True are equal keys but of three types: a state written under one of them does
    not take the key column of a state written under another, so each comes back as written."""
    backend = KeyedStateBackend("test", KeyGroupRange(0, MAXP - 1), MAXP)
    for name, key in (("ints", 1), ("floats", 1.0), ("bools", True)):
        backend.current_key = key
        backend.get_state(ValueStateDescriptor(name)).update(name)
    snapshot = round_trip(backend.snapshot())
    assert all("keys" in entry and "keys_of" not in entry for entry in snapshot.values())
    restored = KeyedStateBackend("restored", KeyGroupRange(0, MAXP - 1), MAXP)
    restored.restore([snapshot])
    for name, key in (("ints", 1), ("floats", 1.0), ("bools", True)):
        restored.get_state(ValueStateDescriptor(name))
        (back,) = restored.keys(name)
        assert type(back) is type(key), (name, back)


def test_states_with_other_keys_or_another_order_keep_their_own_columns() -> None:
    backend = KeyedStateBackend("test", KeyGroupRange(0, MAXP - 1), MAXP)
    first, second, third = (backend.get_state(ValueStateDescriptor(n)) for n in "abc")
    for key in ("k1", "k2"):
        backend.current_key = key
        first.update(1)
        third.update(3)
    for key in ("k2", "k1"):  # the same keys, in another order
        backend.current_key = key
        second.update(2)
    backend.current_key = "k3"
    third.update(3)  # one key more
    snapshot = backend.snapshot()
    assert all("keys" in entry for entry in snapshot.values())
    assert [snapshot[n]["keys"] for n in "abc"] == [["k1", "k2"], ["k2", "k1"], ["k1", "k2", "k3"]]


def test_a_state_naming_a_key_column_the_snapshot_lacks_is_refused() -> None:
    damaged = {"total": {"kind": "value", "keys_of": "count", "values": [1.5]}}
    with pytest.raises(ValueError, match=r"'total' shares the keys of state 'count'.*damaged"):
        with_shared_keys(damaged)


def _snapshot_of_every_kind() -> KeyedStateBackend:
    """A backend with plain and other values, keys of plain and other types, TTL state, a
    serializer, and states that share a key column."""
    backend = KeyedStateBackend("test", KeyGroupRange(0, MAXP - 1), MAXP, now_ms=lambda: 1_000)
    plain = backend.get_state(ValueStateDescriptor("plain", default=0.0))
    count = backend.get_state(ValueStateDescriptor("count", default=0))
    mixed = backend.get_state(ValueStateDescriptor("mixed"))
    expiring = backend.get_state(ValueStateDescriptor("expiring", ttl=StateTtlConfig(60_000)))
    as_pairs = StateSerializer(lambda p: [p.x, p.y], lambda d: Point(*d))
    points = backend.get_state(ValueStateDescriptor("points", serializer=as_pairs))
    items = backend.get_state(ListStateDescriptor("items"))
    by_name = backend.get_state(MapStateDescriptor("by_name"))
    for i, key in enumerate(["a", "b", b"c", 7, -1.5, True, None]):
        backend.current_key = key
        plain.update(i * 1.5)
        count.update(i)
        expiring.update(i)
        items.add(i)
    for i, key in enumerate([("t", 1), "d", dt.date(2024, 1, 1)]):
        backend.current_key = key
        mixed.update((i, "x") if i else "just a string")
        points.update(Point(i, i))
        by_name.put("n", [i, {"deep": (i,)}])
    return backend


def test_a_snapshot_encodes_to_the_bytes_msgpack_alone_writes() -> None:
    """Columns of plain values (str, int, float, bool, bytes, None) go through msgspec's encoder,
    the rest through msgpack's; the bytes are those of msgpack for the whole snapshot, so older
    checkpoints and newer ones read the same."""
    backend = _snapshot_of_every_kind()
    snapshot = backend.snapshot()
    plain_columns = {
        name: [field for field, value in entry.items() if type(value) is PlainColumn]
        for name, entry in snapshot.items()
    }
    # What takes the fast path: plain key columns ("count" holds the column that "expiring",
    # "items" and "plain" share), and the values of value state that only ever held plain values
    # (no TTL, no serializer).
    assert plain_columns == {
        "by_name": [],
        "count": ["keys", "values"],
        "expiring": [],
        "items": [],
        "mixed": [],
        "plain": ["values"],
        "points": [],
    }
    encoded = OperatorSnapshot(keyed=snapshot, operator={"o": [1, (2,)]}, timers={1: [2]}).encode()
    assert encoded == packb({"operator": {"o": [1, (2,)]}, "keyed": snapshot, "timers": {1: [2]}})
    assert unpackb(encoded)["keyed"] == snapshot


def test_value_state_stops_taking_the_fast_path_once_it_held_another_value() -> None:
    backend = KeyedStateBackend("test", KeyGroupRange(0, MAXP - 1), MAXP)
    state = backend.get_state(ValueStateDescriptor("v"))
    backend.current_key = "k"
    state.update(1)
    assert type(backend.snapshot()["v"]["values"]) is PlainColumn
    state.update(dt.date(2024, 1, 1))  # always encodable, but not as msgspec writes it
    state.update(2)
    column = backend.snapshot()["v"]["values"]
    assert type(column) is list and column == [2]
    # A restore looks at what it restored.
    for restored_value, fast in ((3, True), ((3, 4), False)):
        source = KeyedStateBackend("source", KeyGroupRange(0, MAXP - 1), MAXP)
        source.current_key = "k"
        source.get_state(ValueStateDescriptor("v")).update(restored_value)
        restored = KeyedStateBackend("restored", KeyGroupRange(0, MAXP - 1), MAXP)
        restored.restore([round_trip(source.snapshot())])
        restored.get_state(ValueStateDescriptor("v"))
        assert (type(restored.snapshot()["v"]["values"]) is PlainColumn) is fast


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    __hash__ = None  # type: ignore[assignment]


def test_state_serializer_round_trips_values_msgpack_cannot_encode() -> None:
    serializer = StateSerializer(lambda p: [p.x, p.y], lambda d: Point(*d))
    descriptor = ValueStateDescriptor[Point]("point", serializer=serializer)
    groups = KeyGroupRange(0, MAXP - 1)
    backend = KeyedStateBackend("ser", groups, MAXP)
    state = backend.get_state(descriptor)
    for i in range(10):
        backend.current_key = f"k{i}"
        state.update(Point(i, -i))
    snapshot = round_trip(backend.snapshot())
    restored = KeyedStateBackend("ser2", groups, MAXP)
    restored.restore([snapshot])
    state2 = restored.get_state(descriptor)
    for i in range(10):
        restored.current_key = f"k{i}"
        assert state2.value() == Point(i, -i)
    # Without a serializer the value cannot be stored, and the error says what to do.
    with pytest.raises(StateSerializationError, match="StateSerializer"):
        check_encodable(Point(1, 2), "state 'point'")


def test_state_kinds_basic_semantics() -> None:
    backend = KeyedStateBackend("sem", KeyGroupRange(0, MAXP - 1), MAXP)
    value = backend.get_state(ValueStateDescriptor("v", default=-1))
    lst = backend.get_state(ListStateDescriptor("l"))
    mp = backend.get_state(MapStateDescriptor("m"))
    red = backend.get_state(ReducingStateDescriptor("r", max))
    backend.current_key = "a"
    assert value.value() == -1
    value.update(5)
    lst.add(1)
    lst.update([7, 8])
    mp.put("x", 1)
    mp.put("y", 2)
    mp.remove("x")
    red.add(3)
    red.add(9)
    red.add(4)
    backend.current_key = "b"
    assert (value.value(), lst.get(), mp.items(), red.get()) == (-1, [], [], None)
    backend.current_key = "a"
    assert (value.value(), lst.get(), mp.items(), red.get()) == (5, [7, 8], [("y", 2)], 9)
    value.clear()
    value.update(None)
    assert value.value() == -1
    assert backend.get_state(ValueStateDescriptor("v")) is value
    with pytest.raises(ValueError, match="already registered as value state"):
        backend.get_state(ListStateDescriptor("v"))
    assert sorted(backend.keys("l")) == ["a"]


# ------------------------------------------------------------------------------------------------
# the snapshot encoding


class Pair(NamedTuple):
    left: Any
    right: Any


def test_packb_unpackb_keeps_tuples_as_tuples_and_lists_as_lists() -> None:
    value = {
        "tuple": (1, "a", b"b"),
        "nested": [(1, (2, (3, [4, (5,)]))), [6, 7]],
        "empty": ((), []),
        (1, "tuple key"): {("inner", 2): [(), None, True, 1.5]},
        7: "int key",
    }
    decoded = unpackb(packb(value))
    assert decoded == value
    assert type(decoded["tuple"]) is tuple
    assert type(decoded["nested"]) is list
    assert type(decoded["nested"][0]) is tuple
    assert type(decoded["nested"][0][1][1]) is tuple
    assert type(decoded["nested"][0][1][1][1]) is list
    assert type(decoded["nested"][0][1][1][1][1]) is tuple
    assert type(decoded["empty"][0]) is tuple and type(decoded["empty"][1]) is list
    assert (1, "tuple key") in decoded
    assert ("inner", 2) in decoded[(1, "tuple key")]
    assert type(decoded["tuple"][2]) is bytes
    # A named tuple comes back as a plain tuple with the same items.
    assert unpackb(packb(Pair(1, (2, 3)))) == (1, (2, 3))
    assert type(unpackb(packb(Pair(1, 2)))) is tuple


class _Level(enum.IntEnum):
    HIGH = 3


class _Color(enum.StrEnum):
    RED = "red"


@pytest.mark.parametrize(
    "value",
    [
        collections.Counter({"a": 2, "b": 1}),
        collections.OrderedDict([("x", 1), ("y", 2)]),
        collections.defaultdict(list, {"k": [1, 2]}),
        _Color.RED,
        _Level.HIGH,
        [_Color.RED, {"level": _Level.HIGH}],
    ],
    ids=["Counter", "OrderedDict", "defaultdict", "StrEnum", "IntEnum", "nested"],
)
def test_packb_encodes_subclasses_of_the_types_it_names(value: Any) -> None:
    """The snapshot encoding says it takes dict, str, int, ...; a ``Counter`` is a dict and a
    ``StrEnum`` member is a str (and a supported key type), so state holding them must encode,
    coming back equal as the plain type."""
    check_encodable(value, "keyed state 'x'")
    assert unpackb(packb(value)) == value


@pytest.mark.parametrize("bad", [complex(1, 2), object(), Point(1, 2), [1, {"x": [Point(0, 0)]}]])
def test_packb_refuses_what_it_cannot_restore_without_code(bad: Any) -> None:
    with pytest.raises(TypeError):
        packb(bad)
    with pytest.raises(StateSerializationError, match="keyed state 'x'"):
        check_encodable(bad, "keyed state 'x'")


# ------------------------------------------------------------------------------------------------
# operator state redistribution


def operator_snapshot(lists: dict[str, tuple[Redistribution, list[Any]]]) -> dict[str, Any]:
    store = OperatorStateStore("test")
    for name, (mode, items) in lists.items():
        state = store.get_list_state(name, mode)
        state.update(items)
    return unpackb(packb(store.snapshot()))  # type: ignore[no-any-return]


def test_even_split_concatenates_in_subtask_order_and_cuts_evenly() -> None:
    old = [
        operator_snapshot({"offsets": (Redistribution.EVEN_SPLIT, [1, 2, 3])}),
        operator_snapshot({"offsets": (Redistribution.EVEN_SPLIT, [4, 5])}),
        operator_snapshot({"offsets": (Redistribution.EVEN_SPLIT, [])}),
    ]
    for new_p, parts in [
        (1, [[1, 2, 3, 4, 5]]),
        (2, [[1, 2, 3], [4, 5]]),
        (3, [[1, 2], [3, 4], [5]]),
        (5, [[1], [2], [3], [4], [5]]),
        (7, [[1], [2], [3], [4], [5], [], []]),
    ]:
        result = redistribute_operator_state(old, new_p)
        assert [r["offsets"]["items"] for r in result] == parts, new_p
        assert all(r["offsets"]["mode"] == "even-split" for r in result)


def test_union_gives_every_subtask_everything() -> None:
    old = [
        operator_snapshot({"seen": (Redistribution.UNION, [("a", 1)])}),
        operator_snapshot({"seen": (Redistribution.UNION, [("b", 2), ("c", 3)])}),
    ]
    result = redistribute_operator_state(old, 3)
    assert [r["seen"]["items"] for r in result] == [[("a", 1), ("b", 2), ("c", 3)]] * 3
    # Each subtask gets its own list.
    result[0]["seen"]["items"].append("x")
    assert result[1]["seen"]["items"] == [("a", 1), ("b", 2), ("c", 3)]


def test_snapshot_readers_find_list_items_and_union_state() -> None:
    """What the job master reads from a store's snapshot without restoring it: a list state's
    items (the source splits it already knows) and whether any union list state is held."""
    even = operator_snapshot({"splits": (Redistribution.EVEN_SPLIT, ["s0", "s1"])})
    union = operator_snapshot({"seen": (Redistribution.UNION, [1])})
    assert list_state_items(even, "splits") == ["s0", "s1"]
    assert list_state_items(even, "absent") == []
    assert not has_union_state(even)
    assert has_union_state(union)
    assert not has_union_state({})


def test_broadcast_state_is_copied_to_every_subtask() -> None:
    stores = []
    for _ in range(2):
        store = OperatorStateStore("b")
        rules = store.get_broadcast_state("rules")
        rules.put("max", 10)
        rules.put(("k", 1), [1, 2])
        stores.append(unpackb(packb(store.snapshot())))
    result = redistribute_operator_state(stores, 4)
    for snapshot in result:
        restored = OperatorStateStore("new")
        restored.restore(snapshot)
        rules = restored.get_broadcast_state("rules")
        assert rules.items() == [("max", 10), (("k", 1), [1, 2])]
    result[0]["rules"]["entries"]["max"] = 0
    assert result[1]["rules"]["entries"]["max"] == 10


def test_operator_state_restore_round_trip_and_mode_mismatch() -> None:
    old = [
        operator_snapshot(
            {
                "splits": (Redistribution.EVEN_SPLIT, [{"split": 0}, {"split": 1}]),
                "all": (Redistribution.UNION, ["x"]),
            }
        ),
        operator_snapshot(
            {
                "splits": (Redistribution.EVEN_SPLIT, [{"split": 2}]),
                "all": (Redistribution.UNION, ["y"]),
            }
        ),
    ]
    result = redistribute_operator_state(old, 2)
    first = OperatorStateStore("new 1")
    first.restore(result[0])
    assert first.get_list_state("splits").get() == [{"split": 0}, {"split": 1}]
    assert first.get_union_list_state("all").get() == ["x", "y"]
    assert first.uses_union_state
    second = OperatorStateStore("new 2")
    second.restore(result[1])
    with pytest.raises(ValueError, match="union redistribution"):
        second.get_list_state("all")
    assert second.get_list_state("splits").get() == [{"split": 2}]
