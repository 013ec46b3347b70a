"""State TTL (Flink's ``StateTtlConfig``) and the rule-based state cleanup of the Xiaomi seed:
expired entries are never returned, reads restart the TTL only when asked to, expired entries are
cleaned on access, in the background and out of checkpoints, timestamps survive restores at
another parallelism, and a cleanup rule clears a key's state when it holds.

Processing time is a clock the test sets (the backend's ``now_ms``, the job's
``ExecutionConfig.clock``); nothing waits on the wall clock.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from loop_helpers import (
    ControlledSource,
    start_job_on_master,
    take_checkpoint,
    wait_until,
)

from connectors import CollectionSource, CollectSink
from runtime import (
    AggregateFunction,
    CheckpointConfig,
    Collector,
    ExecutionConfig,
    KeyedProcessContext,
    KeyedProcessFunction,
    RuntimeContext,
    StateTtlConfig,
    StateVisibility,
    TtlUpdateType,
    run_job,
)
from runtime.master.jobmaster import JobMaster
from runtime.testing import ManualClock
from state import (
    KeyedStateBackend,
    KeyedStateView,
    KeyGroupRange,
    ListStateDescriptor,
    MapStateDescriptor,
    ReducingStateDescriptor,
    ValueStateDescriptor,
    key_group_for_key,
    key_group_range_for_subtask,
)
from state.serde import packb, unpackb
from state.storage import CheckpointStorage, find_latest_valid, load_checkpoint

MAXP = 128
ALL_GROUPS = KeyGroupRange(0, MAXP - 1)
WAIT_S = 10.0
TTL = StateTtlConfig.of("1s")


def _add(a: int, b: int) -> int:
    return a + b


def backend_at(clock: ManualClock, groups: KeyGroupRange = ALL_GROUPS) -> KeyedStateBackend:
    return KeyedStateBackend("ttl-test", groups, MAXP, now_ms=clock.now_ms)


def round_trip(snapshot: dict[str, Any]) -> dict[str, Any]:
    decoded: dict[str, Any] = unpackb(packb(snapshot))
    return decoded


# ------------------------------------------------------------------------------------------------
# the configuration


def test_ttl_accepts_milliseconds_and_duration_strings_and_refuses_nonsense() -> None:
    assert StateTtlConfig.of(1500).ttl_ms == 1500
    assert StateTtlConfig.of("250ms").ttl_ms == 250
    assert StateTtlConfig.of("1h").ttl_ms == 3_600_000
    cfg = StateTtlConfig.of("2s", update_type="on_read_and_write")
    assert cfg.update_type is TtlUpdateType.ON_READ_AND_WRITE
    assert cfg.visibility is StateVisibility.NEVER_RETURN_EXPIRED
    with pytest.raises(ValueError, match="state TTL: invalid duration 'soon'"):
        StateTtlConfig.of("soon")
    with pytest.raises(ValueError, match="positive number of milliseconds"):
        StateTtlConfig.of(0)
    with pytest.raises(ValueError, match="'sometimes' is not a valid TtlUpdateType"):
        StateTtlConfig.of("1s", update_type="sometimes")


# ------------------------------------------------------------------------------------------------
# expiry on access, per state kind


def _write(backend: KeyedStateBackend, kind: str, value: int) -> Any:
    if kind == "value":
        state = backend.get_state(ValueStateDescriptor("s", default=-1, ttl=TTL))
        state.update(value)
    elif kind == "list":
        state = backend.get_state(ListStateDescriptor("s", ttl=TTL))
        state.add(value)
    elif kind == "map":
        state = backend.get_state(MapStateDescriptor("s", ttl=TTL))
        state.put("k", value)
    else:
        state = backend.get_state(ReducingStateDescriptor("s", _add, ttl=TTL))
        state.add(value)
    return state


def _read(state: Any, kind: str) -> Any:
    if kind == "value":
        return state.value()
    if kind == "list":
        return state.get()
    if kind == "map":
        return (state.get("k"), state.contains("k"), state.items(), state.is_empty())
    return state.get()


EMPTY = {"value": -1, "list": [], "map": (None, False, [], True), "reducing": None}
FULL = {"value": 7, "list": [7], "map": (7, True, [("k", 7)], False), "reducing": 7}


@pytest.mark.parametrize("kind", ["value", "list", "map", "reducing"])
def test_an_expired_entry_is_never_returned_and_is_removed_when_read(kind: str) -> None:
    clock = ManualClock(10_000)
    backend = backend_at(clock)
    backend.current_key = "a"
    state = _write(backend, kind, 7)
    clock.set(10_999)
    assert _read(state, kind) == FULL[kind]
    clock.set(11_000)  # written at 10 000 with a TTL of 1 s: expired from 11 000 on
    assert list(backend.keys("s")) == []
    assert _read(state, kind) == EMPTY[kind]
    assert "a" not in state._values, "cleaned on access"
    assert backend.snapshot()["s"]["keys"] == []
    # A new write starts a new time to live (the expired value is not reduced with).
    _write(backend, kind, 7)
    assert _read(state, kind) == FULL[kind]


def test_list_and_map_entries_expire_one_by_one() -> None:
    clock = ManualClock(0)
    backend = backend_at(clock)
    backend.current_key = "a"
    lst = backend.get_state(ListStateDescriptor("list", ttl=TTL))
    mp = backend.get_state(MapStateDescriptor("map", ttl=TTL))
    lst.add("old")
    mp.put("old", 1)
    clock.set(600)
    lst.add_all(["new", "newer"])
    mp.put_all({"new": 2})
    clock.set(1000)
    assert lst.get() == ["new", "newer"]
    assert mp.items() == [("new", 2)]
    assert mp.get("old") is None
    clock.set(1600)
    assert lst.get() == []
    assert mp.is_empty()


def test_adding_nothing_to_list_or_map_state_with_ttl_keeps_it_readable() -> None:
    clock = ManualClock(0)
    backend = backend_at(clock)
    backend.current_key = "a"
    lst = backend.get_state(ListStateDescriptor("list", ttl=TTL))
    mp = backend.get_state(MapStateDescriptor("map", ttl=TTL))
    lst.add_all([])
    mp.put_all({})
    assert (lst.get(), mp.items()) == ([], [])
    backend.cleanup_incrementally()
    snapshot = backend.snapshot()
    assert (snapshot["list"]["keys"], snapshot["map"]["keys"]) == ([], [])


def test_reads_restart_the_ttl_only_with_update_on_read_and_write() -> None:
    clock = ManualClock(0)
    backend = backend_at(clock)
    backend.current_key = "a"
    on_write = backend.get_state(ValueStateDescriptor("on-write", ttl=TTL))
    on_read = backend.get_state(
        ValueStateDescriptor("on-read", ttl=StateTtlConfig.of("1s", "on_read_and_write"))
    )
    read_map = backend.get_state(
        MapStateDescriptor("map", ttl=StateTtlConfig.of(1000, TtlUpdateType.ON_READ_AND_WRITE))
    )
    on_write.update("w")
    on_read.update("r")
    read_map.put("x", 1)
    for now in (900, 1800, 2700):  # read every 900 ms: only read-and-write keeps it alive
        clock.set(now)
        assert on_read.value() == "r"
        assert read_map.get("x") == 1
    assert on_write.value() is None
    clock.set(2700 + 1000)
    assert on_read.value() is None
    assert read_map.get("x") is None


def test_return_expired_if_not_cleaned_up_returns_the_value_once() -> None:
    clock = ManualClock(0)
    backend = backend_at(clock)
    backend.current_key = "a"
    cfg = StateTtlConfig.of(1000, visibility=StateVisibility.RETURN_EXPIRED_IF_NOT_CLEANED_UP)
    state = backend.get_state(ValueStateDescriptor("v", ttl=cfg))
    state.update("stale")
    clock.set(5000)
    assert state.value() == "stale"
    assert state.value() is None, "the read that found it expired removed it"


def test_state_without_ttl_keeps_its_plain_classes_and_snapshot_layout() -> None:
    backend = KeyedStateBackend("plain", ALL_GROUPS, MAXP)
    state = backend.get_state(ValueStateDescriptor("v"))
    assert type(state).__name__ == "ValueState"
    backend.current_key = "a"
    state.update(1)
    assert backend.snapshot()["v"] == {
        "kind": "value",
        "key_types": ["str"],
        "keys": ["a"],
        "values": [1],
    }


# ------------------------------------------------------------------------------------------------
# background cleanup and snapshots


def test_background_cleanup_removes_idle_keys_a_bounded_number_per_step() -> None:
    clock = ManualClock(0)
    backend = backend_at(clock)
    cfg = StateTtlConfig.of(1000, cleanup_size=5)
    value = backend.get_state(ValueStateDescriptor("v", ttl=cfg))
    lst = backend.get_state(ListStateDescriptor("l", ttl=cfg))
    for i in range(23):
        backend.current_key = i
        value.update(i)
        lst.add(i)
    clock.set(1000)
    backend.cleanup_incrementally()
    # One step checks at most cleanup_size entries per state: 5 of the 23 keys are gone.
    assert (len(value._values), len(lst._values)) == (18, 18)
    for _ in range(4):
        backend.cleanup_incrementally()
    assert value._values == {} and lst._values == {}, "idle keys removed without being accessed"
    assert value._stamps == {} and lst._stamps == {}


def test_a_snapshot_leaves_expired_entries_out_and_keeps_the_live_ones_timestamps() -> None:
    clock = ManualClock(0)
    backend = backend_at(clock)
    value = backend.get_state(ValueStateDescriptor("v", ttl=TTL))
    mp = backend.get_state(MapStateDescriptor("m", ttl=TTL))
    for key in ("idle-1", "idle-2"):
        backend.current_key = key
        value.update(key)
        mp.put("x", 1)
    clock.set(700)
    backend.current_key = "busy"
    value.update("busy")
    mp.put("x", 2)
    backend.current_key = "idle-1"
    mp.put("y", 3)
    clock.set(1200)
    snapshot = round_trip(backend.snapshot())
    assert snapshot["v"]["keys"] == ["busy"]
    assert snapshot["v"]["ttl_stamps"] == [700]
    assert dict(zip(snapshot["m"]["keys"], snapshot["m"]["values"], strict=True)) == {
        "idle-1": {"y": 3},
        "busy": {"x": 2},
    }
    assert snapshot["m"]["key_types"] == ["str"]


KEYS: list[Any] = [f"user-{i}" for i in range(60)] + list(range(40))


@pytest.mark.parametrize(("old_p", "new_p"), [(1, 3), (3, 2), (2, 1)])
def test_ttl_timestamps_survive_a_restore_at_another_parallelism(old_p: int, new_p: int) -> None:
    """Keys written at t=0 (even index) and t=600 (odd index), restored at t=1100: the first
    half expired on the old timestamps, the rest lives until t=1600."""
    snapshots = []
    for index in range(old_p):
        groups = key_group_range_for_subtask(MAXP, old_p, index)
        clock = ManualClock(0)
        backend = backend_at(clock, groups)
        value = backend.get_state(ValueStateDescriptor("v", ttl=TTL))
        lst = backend.get_state(ListStateDescriptor("l", ttl=TTL))
        owned = [k for k in KEYS if key_group_for_key(k, MAXP) in groups]
        for write_at in (0, 600):
            clock.set(write_at)
            for key in [k for k in owned if KEYS.index(k) % 2 == write_at // 600]:
                backend.current_key = key
                value.update(key)
                lst.add(key)
        snapshots.append(round_trip(backend.snapshot()))
    seen: dict[Any, Any] = {}
    restore_clock = ManualClock(1100)
    for index in range(new_p):
        groups = key_group_range_for_subtask(MAXP, new_p, index)
        backend = backend_at(restore_clock, groups)
        backend.restore(snapshots)
        value = backend.get_state(ValueStateDescriptor("v", ttl=TTL))
        lst = backend.get_state(ListStateDescriptor("l", ttl=TTL))
        for key in KEYS:
            backend.current_key = key
            if value.value() is not None:
                assert key_group_for_key(key, MAXP) in groups
                seen[key] = (value.value(), lst.get())
    written_at_600 = {k for i, k in enumerate(KEYS) if i % 2 == 1}
    assert set(seen) == written_at_600
    # If the restore had restarted the TTLs, the keys written at t=0 would still be there.
    assert all(v == (k, [k]) for k, v in seen.items())
    restore_clock.set(1600)  # the keys written at 600 expire at 1600
    backend = backend_at(restore_clock)
    backend.restore(snapshots)
    value = backend.get_state(ValueStateDescriptor("v", ttl=TTL))
    assert backend.snapshot()["v"]["keys"] == []


def test_state_restored_from_a_snapshot_without_ttl_starts_its_ttl_at_the_restore() -> None:
    old = KeyedStateBackend("old", ALL_GROUPS, MAXP)
    old.current_key = "a"
    old.get_state(ValueStateDescriptor("v")).update(1)
    old.get_state(ListStateDescriptor("l")).add_all([1, 2])
    clock = ManualClock(50_000)
    backend = backend_at(clock)
    backend.restore([round_trip(old.snapshot())])
    value = backend.get_state(ValueStateDescriptor("v", ttl=TTL))
    lst = backend.get_state(ListStateDescriptor("l", ttl=TTL))
    backend.current_key = "a"
    clock.set(50_999)
    assert (value.value(), lst.get()) == (1, [1, 2])
    clock.set(51_000)
    assert (value.value(), lst.get()) == (None, [])


def test_state_whose_ttl_was_removed_keeps_its_values() -> None:
    clock = ManualClock(0)
    old = backend_at(clock)
    old.current_key = "a"
    old.get_state(ValueStateDescriptor("v", ttl=TTL)).update(1)
    backend = backend_at(ManualClock(99_000))
    backend.restore([round_trip(old.snapshot())])
    backend.current_key = "a"
    assert backend.get_state(ValueStateDescriptor("v")).value() == 1
    assert "ttl_stamps" not in backend.snapshot()["v"]


# ------------------------------------------------------------------------------------------------
# the cleanup rule


def test_the_cleanup_rule_clears_a_keys_whole_state_and_sees_it_read_only() -> None:
    clock = ManualClock(0)
    backend = backend_at(clock)
    status = backend.get_state(
        ValueStateDescriptor("status", ttl=StateTtlConfig.of(1000, "on_read_and_write"))
    )
    sold = backend.get_state(ReducingStateDescriptor("sold", _add))
    views: list[str] = []

    def sold_out(key: Any, state: KeyedStateView) -> bool:
        views.append(repr(state))
        return bool(state.get("status") == "sold out")

    backend.set_cleanup_rule(sold_out)
    backend.current_key = "p1"
    status.update("on sale")
    sold.add(3)
    assert backend.check_cleanup_rule("p1") is False
    status.update("sold out")
    clock.set(900)
    assert backend.check_cleanup_rule("p1") is True
    assert (status.value(), sold.get()) == (None, None)
    assert views[0] == "KeyedStateView(key='p1', {'sold': 3, 'status': 'on sale'})"
    # The view did not refresh the TTL (update on read): the status written at 0 expired at 1000.
    backend.current_key = "p2"
    status.update("on sale")
    clock.set(1900)
    backend.check_cleanup_rule("p2")
    assert status.value() is None


def test_the_cleanup_rule_reaches_idle_keys_in_the_background() -> None:
    backend = KeyedStateBackend("rule", ALL_GROUPS, MAXP)
    closed = backend.get_state(ValueStateDescriptor("closed"))
    for i in range(25):
        backend.current_key = i
        closed.update(i % 5 == 0)
    backend.set_cleanup_rule(lambda key, state: bool(state["closed"]))
    for _ in range(3):  # 10 keys per step
        backend.cleanup_incrementally()
    assert sorted(closed._values) == [i for i in range(25) if i % 5]


# ------------------------------------------------------------------------------------------------
# in a job: checkpoints, restore, the rule in a process function


class TtlCount(KeyedProcessFunction[Any, Any, Any]):
    """A count per key with a TTL of 1 s; ``(key, "add")`` counts and emits the count,
    ``(key, "read")`` emits what the state holds. A key is forgotten once it reached 3 (the
    cleanup rule)."""

    def open(self, ctx: RuntimeContext) -> None:
        self.count = ctx.get_state(ValueStateDescriptor("count", ttl=TTL))
        ctx.set_state_cleanup_rule(lambda key, state: state.get("count", 0) >= 3)

    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        key, op = value
        if op == "add":
            self.count.update((self.count.value() or 0) + 1)
        out.collect((key, op, self.count.value()))


async def _start(
    source: ControlledSource,
    sink: CollectSink,
    clock: ManualClock,
    checkpoint_dir: Path,
    parallelism: int = 1,
    restored: Any = None,
) -> tuple[JobMaster, asyncio.Task[Any]]:
    def build(job: Any) -> None:
        (
            job.from_source(source)
            .set_parallelism(1)  # one split: the keyed operator is the one rescaled
            .key_by(lambda r: r[0])
            .process(TtlCount(), name="count")
            .uid("count")
            .sink_to(sink)
        )

    config = ExecutionConfig(checkpoint=CheckpointConfig(retained=2), clock=clock)
    storage = CheckpointStorage(checkpoint_dir, "ttl-job")
    return await start_job_on_master(
        build, config, parallelism, "ttl-job", storage=storage, restored=restored
    )


async def _checkpoint(master: JobMaster) -> str:
    completed = await take_checkpoint(master)
    assert completed.path is not None
    return str(completed.path)


def _checkpointed_counts(path: str) -> dict[Any, Any]:
    keyed = load_checkpoint(path).operators["count"].subtask_states.snapshot(0).keyed
    assert keyed is not None
    entry = keyed["count"]
    return dict(
        zip(entry["keys"], zip(entry["values"], entry["ttl_stamps"], strict=True), strict=True)
    )


@pytest.mark.asyncio
async def test_idle_keys_state_disappears_from_checkpoints_and_restores_keep_its_expiry(
    tmp_path: Path,
) -> None:
    clock = ManualClock(0)
    source, sink = ControlledSource("events"), CollectSink()
    master, job = await _start(source, sink, clock, tmp_path / "chk")
    source.push(("idle", "add"), ("busy", "add"), ("gone", "add"), ("gone", "add"))
    await wait_until(lambda: len(sink.results) == 4, "four records counted", job)
    clock.set(600)
    source.push(("busy", "add"), ("gone", "add"))  # "gone" reaches 3: the rule clears it
    await wait_until(lambda: len(sink.results) == 6, "six records counted", job)
    first = _checkpointed_counts(await _checkpoint(master))
    assert first == {"idle": (1, 0), "busy": (2, 600)}
    clock.set(1200)  # "idle" (written at 0) expired, never read again
    latest = await _checkpoint(master)
    assert _checkpointed_counts(latest) == {"busy": (2, 600)}
    source.end()
    await asyncio.wait_for(job, WAIT_S)
    final = find_latest_valid(tmp_path / "chk").checkpoint
    assert final is not None and final.path != latest, "the final checkpoint of the bounded job"
    assert _checkpointed_counts(final.path) == {"busy": (2, 600)}

    # Restored from the last checkpoint taken while running, at parallelism 2 at t=1500: "busy"
    # keeps its timestamp of 600 (it expires at 1600, not a second after the restore). The
    # source replays its log from the checkpointed position, as Kafka would.
    clock.set(1500)
    source2, sink2 = ControlledSource("events"), CollectSink()
    source2.elements = list(source.elements)
    master, job = await _start(
        source2, sink2, clock, tmp_path / "chk2", parallelism=2, restored=load_checkpoint(latest)
    )
    source2.push(("busy", "read"), ("idle", "read"), ("gone", "read"))
    await wait_until(lambda: len(sink2.results) == 3, "three reads", job)
    clock.set(1600)
    source2.push(("busy", "read"))
    await wait_until(lambda: len(sink2.results) == 4, "the fourth read", job)
    source2.end()
    await asyncio.wait_for(job, WAIT_S)
    assert sorted(sink2.results[:3]) == [
        ("busy", "read", 2),
        ("gone", "read", None),
        ("idle", "read", None),
    ]
    assert sink2.results[3] == ("busy", "read", None)


class SalesPerProduct(AggregateFunction[dict[str, Any], dict[str, Any], tuple[Any, ...]]):
    """Units sold per product and its latest status; a product's state is cleared once it is
    sold out or delisted (the seed's example of a rule-based cleanup of an aggregation)."""

    def open(self, ctx: RuntimeContext) -> None:
        ctx.set_state_cleanup_rule(
            lambda product, state: state["accumulator"]["status"] in ("sold out", "delisted")
        )

    def create_accumulator(self) -> dict[str, Any]:
        return {"status": "", "sold": 0}

    def add(self, value: dict[str, Any], accumulator: dict[str, Any]) -> dict[str, Any]:
        return {"status": value["status"], "sold": accumulator["sold"] + value["units"]}

    def get_result(self, accumulator: dict[str, Any]) -> tuple[Any, ...]:
        return (accumulator["sold"], accumulator["status"])

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {"status": b["status"], "sold": a["sold"] + b["sold"]}


@pytest.mark.parametrize("parallelism", [1, 2])
def test_a_cleanup_rule_restarts_an_aggregation_once_it_held(parallelism: int) -> None:
    sales = [
        ("p1", 2, "on sale"),
        ("p2", 1, "on sale"),
        ("p1", 3, "on sale"),
        ("p1", 1, "sold out"),
        ("p2", 5, "delisted"),
        ("p1", 4, "on sale"),  # restocked: counted from zero
        ("p1", 1, "on sale"),
    ]
    sink = CollectSink()

    def build(job: Any) -> None:
        records = [{"product": p, "units": u, "status": s} for p, u, s in sales]
        (
            job.from_source(CollectionSource(records))
            .set_parallelism(1)
            .key_by(lambda r: r["product"])
            .aggregate(SalesPerProduct())
            .sink_to(sink)
        )

    run_job(build, parallelism=parallelism)
    # p1 counts 2, 5, 6 (sold out: cleared), then 4, 5 from zero; p2 counts 1, 6 (delisted).
    assert sorted(sink.results) == sorted(
        [
            (2, "on sale"),
            (1, "on sale"),
            (5, "on sale"),
            (6, "sold out"),
            (6, "delisted"),
            (4, "on sale"),
            (5, "on sale"),
        ]
    )
