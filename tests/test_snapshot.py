"""The typed operator snapshot: its msgpack encoding, and state files in the layout of older code.

Checkpoints written before :class:`state.snapshot.OperatorSnapshot` existed hold a plain msgpack
map ``{"operator": ..., "keyed": ..., "timers": ...}`` per subtask; they must keep restoring.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from runtime import ExecutionConfig, Job, KeyedProcessFunction, RuntimeContext, testing
from runtime.api.functions import Collector, KeyedProcessContext
from runtime.api.sources import SPLITS_STATE, contiguous_splits
from runtime.master.jobmaster import JobMaster
from runtime.shell.runner import build_graph, run_coroutine
from state import (
    DEFAULT_MAX_PARALLELISM,
    KeyedStateBackend,
    KeyGroupRange,
    OperatorStateStore,
    ValueStateDescriptor,
    key_group_for_key,
)
from state.serde import packb, unpackb
from state.snapshot import OperatorSnapshot, RestoredState, SnapshotLayoutError
from state.storage import (
    CheckpointKind,
    CheckpointStorage,
    CompletedCheckpoint,
    OperatorCheckpoint,
    SnapshotMap,
    load_checkpoint,
)

KEYED = {"count": {"kind": "value", "key_types": ["str"], "keys": ["a"], "values": [5]}}
OPERATOR = {"splits": {"mode": "even-split", "items": [{"split": 0, "next": 2}]}}
TIMERS = {"groups": {7: [["e", 100, "a"]]}}


# --------------------------------------------------------------------------- the type


def test_round_trip_through_msgpack_keeps_every_part() -> None:
    snapshot = OperatorSnapshot(keyed=KEYED, operator=OPERATOR, timers=TIMERS)
    assert OperatorSnapshot.from_data(unpackb(packb(snapshot.to_data()))) == snapshot
    assert OperatorSnapshot.decode(snapshot.encode()) == snapshot


def test_absent_parts_are_left_out_and_empty_parts_kept() -> None:
    """A sink's empty operator state still tells its writer "you are being restored"."""
    assert OperatorSnapshot(operator={}).to_data() == {"operator": {}}
    assert OperatorSnapshot(keyed=KEYED).to_data() == {"keyed": KEYED}
    assert OperatorSnapshot().to_data() == {}
    assert OperatorSnapshot.decode(OperatorSnapshot(operator={}).encode()) == OperatorSnapshot(
        operator={}
    )


def test_encoding_is_byte_identical_to_the_layout_older_code_wrote() -> None:
    # The order the operators used to insert the parts in: operator, keyed, timers.
    old = packb({"operator": OPERATOR, "keyed": KEYED, "timers": TIMERS})
    assert OperatorSnapshot(keyed=KEYED, operator=OPERATOR, timers=TIMERS).encode() == old
    assert packb({"operator": OPERATOR}) == OperatorSnapshot(operator=OPERATOR).encode()


def test_the_old_dict_layout_reads_as_the_type() -> None:
    old = unpackb(packb({"keyed": KEYED, "timers": TIMERS}))
    snapshot = OperatorSnapshot.from_data(old)
    assert snapshot.keyed == KEYED
    assert snapshot.timers == TIMERS
    assert snapshot.operator is None


def test_unknown_entries_are_ignored_as_they_always_were() -> None:
    snapshot = OperatorSnapshot.from_data({"operator": OPERATOR, "extra": [1, 2]})
    assert snapshot == OperatorSnapshot(operator=OPERATOR)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "subtask 3: expected a map of state parts, got list"),
        ({"keyed": [1]}, "subtask 3: the keyed part must be a map, got list"),
    ],
)
def test_data_without_the_layout_is_refused_naming_where(data: Any, message: str) -> None:
    with pytest.raises(SnapshotLayoutError, match=message):
        OperatorSnapshot.from_data(data, "subtask 3")


def test_snapshots_are_frozen() -> None:
    snapshot = OperatorSnapshot(operator=OPERATOR)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.operator = None  # type: ignore[misc]


def test_restored_state_is_empty_only_without_any_part() -> None:
    assert RestoredState().is_empty
    assert not RestoredState(keyed=(KEYED,)).is_empty
    assert not RestoredState(timers=(TIMERS,)).is_empty
    assert not RestoredState(operator={}).is_empty


def test_snapshot_map_reads_stored_bytes_as_the_type() -> None:
    states = SnapshotMap()
    states.set_encoded(1, packb({"keyed": KEYED}))
    states.set_encoded(0, packb({"operator": OPERATOR}))
    assert states.snapshots() == [
        (0, OperatorSnapshot(operator=OPERATOR)),
        (1, OperatorSnapshot(keyed=KEYED)),
    ]


# --------------------------------------------------------------------------- an old state file


class CountsAndFires(KeyedProcessFunction[Any, Any, Any]):
    """A running count per key in keyed state; a fired event-time timer is emitted."""

    def open(self, ctx: RuntimeContext) -> None:
        self.count = ctx.get_state(ValueStateDescriptor("count"))

    def process_element(
        self, value: Any, ctx: KeyedProcessContext[Any], out: Collector[Any]
    ) -> None:
        count = (self.count.value() or 0) + 1
        self.count.update(count)
        out.collect([ctx.current_key, count])

    def on_timer(self, timestamp: int, ctx: KeyedProcessContext[Any], out: Collector[Any]) -> None:
        out.collect(["timer", ctx.current_key, timestamp])


def _old_layout_checkpoint(directory: Path, words: list[str]) -> Path:
    """A checkpoint folder whose state files are plain msgpack maps, as the code before
    :class:`OperatorSnapshot` wrote them: the source has read two words, key ``a`` counts 5 and
    has an event-time timer at 100. The parts' insides come from the real state stores."""
    source_state = OperatorStateStore("words")
    (split,) = contiguous_splits(len(words), 1)
    source_state.get_list_state(SPLITS_STATE).update([{**split, "next": 2}])
    keyed = KeyedStateBackend(
        "count", KeyGroupRange(0, DEFAULT_MAX_PARALLELISM - 1), DEFAULT_MAX_PARALLELISM
    )
    keyed.set_current_key("a")
    keyed.get_state(ValueStateDescriptor("count")).update(5)
    timers = {"groups": {key_group_for_key("a", DEFAULT_MAX_PARALLELISM): [["e", 100, "a"]]}}

    source_files = SnapshotMap()
    source_files.set_encoded(0, packb({"operator": source_state.snapshot()}))
    count_files = SnapshotMap()
    count_files.set_encoded(0, packb({"keyed": keyed.snapshot(), "timers": timers}))
    checkpoint = CompletedCheckpoint(
        3,
        CheckpointKind.CHECKPOINT,
        1_700_000_000_000,
        {
            "words": OperatorCheckpoint("words", "words", 1, DEFAULT_MAX_PARALLELISM, source_files),
            "count": OperatorCheckpoint("count", "count", 1, DEFAULT_MAX_PARALLELISM, count_files),
        },
    )
    asyncio.run(CheckpointStorage(directory, "old-layout").write(checkpoint))
    assert checkpoint.path is not None
    return Path(checkpoint.path)


def test_a_state_file_in_the_old_layout_restores(tmp_path: Path) -> None:
    words = ["a", "b", "a", "a"]
    folder = _old_layout_checkpoint(tmp_path / "chk", words)
    sink = testing.TestingSink()

    def build(job: Job) -> None:
        (
            job.from_source(testing.TestingSource(words), name="words")
            .uid("words")
            .key_by(lambda word: word)
            .process(CountsAndFires(), name="count")
            .uid("count")
            .sink_to(sink, name="out")
            .uid("out")
        )

    graph = build_graph(build)
    restored = load_checkpoint(folder)
    master = JobMaster(
        graph,
        ExecutionConfig(),
        storage=CheckpointStorage(tmp_path / "chk", graph.name),
        restored=restored,
    )
    run_coroutine(master.run())
    # The source resumes at its third word, the count continues from 5, the timer fires at the end.
    assert sink.written == [["a", 6], ["a", 7], ["timer", "a", 100]]
