"""Checkpointing in one process: failover restores exactly, barrier alignment, and the coordinator's
timeout, max-concurrent, min-pause and tolerable-failure rules.

The jobs here use sources and sinks whose progress the test controls (``ControlledSource`` emits
what the test pushes; ``ScriptedSink`` blocks or fails snapshots on demand), so that every
assertion is about a state the test waited for, never about how fast something ran.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from loop_helpers import ControlledSource

from actors.barriers import CheckpointingMode
from actors.operator import UserFunctionError
from actors.task import TaskState
from connectors.files import TwoPhaseCommitFileSink, committed_files
from runtime import (
    CheckpointConfig,
    Collector,
    ExecutionConfig,
    JobFailedError,
    KeyedProcessContext,
    KeyedProcessFunction,
    MapFunction,
    RuntimeContext,
    Sink,
    SinkWriter,
    Source,
    SourceReader,
    testing,
)
from runtime.api.sources import END_OF_INPUT
from runtime.master.coordinator import (
    CheckpointCoordinator,
    CheckpointFailedError,
    CheckpointStatus,
    TooManyCheckpointFailures,
)
from runtime.master.jobmaster import JobMaster
from runtime.master.restart import FixedDelayRestart, NoRestart
from runtime.shell.runner import build_graph
from runtime.testing import InjectedCrash, arm, disarm_all
from state import (
    DEFAULT_MAX_PARALLELISM,
    KeyedStateBackend,
    KeyGroupRange,
    ListStateDescriptor,
    MapStateDescriptor,
    ValueStateDescriptor,
)
from state.snapshot import OperatorSnapshot
from state.storage import CheckpointKind, CheckpointStorage

WAIT_S = 10.0


@pytest.fixture(autouse=True)
def _disarm() -> Any:
    disarm_all()
    yield
    disarm_all()


# --------------------------------------------------------------------------- helpers


async def until(
    condition: Callable[[], bool], what: str, job: asyncio.Task[Any] | None = None
) -> None:
    """Wait for ``condition`` (checked every few ms) or fail after ``WAIT_S``."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if job is not None and job.done():
            job.result()  # raises the job's failure, if any
            raise AssertionError(f"the job ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def start_job(
    build: Callable[[Any], None],
    config: ExecutionConfig,
    parallelism: int = 1,
    **master_kw: Any,
) -> tuple[JobMaster, asyncio.Task[Any]]:
    graph = build_graph(build, {}, parallelism, name="test-job")
    master = JobMaster(graph, config, **master_kw)
    job = asyncio.create_task(master.run())
    await until(
        lambda: bool(master.tasks) and all(t.state is TaskState.RUNNING for t in master.tasks),
        "every task running",
        job,
    )
    return master, job


def keyed_values(snapshot: OperatorSnapshot, state: str) -> dict[Any, Any]:
    """{key: value} of one keyed value state in an operator subtask snapshot, read back through
    a state backend that owns every key group (so the test does not depend on the layout)."""
    backend = KeyedStateBackend(
        "test", KeyGroupRange(0, DEFAULT_MAX_PARALLELISM - 1), DEFAULT_MAX_PARALLELISM
    )
    assert snapshot.keyed is not None
    backend.restore([snapshot.keyed])
    value_state = backend.get_state(ValueStateDescriptor(state))
    result = {}
    for key in backend.keys(state):
        backend.set_current_key(key)
        result[key] = value_state.value()
    return result


def running_counts(keys: list[str]) -> list[tuple[str, int]]:
    """The exact output of a keyed running count over ``keys``."""
    seen: collections.Counter[str] = collections.Counter()
    out = []
    for key in keys:
        seen[key] += 1
        out.append((key, seen[key]))
    return out


class RunningCount(KeyedProcessFunction[str, str, tuple[str, int]]):
    """Emits (key, n) for the n-th record of a key; n lives in keyed value state."""

    def open(self, ctx: RuntimeContext) -> None:
        self.count = ctx.get_state(ValueStateDescriptor("count", default=0))

    def process_element(
        self, value: str, ctx: KeyedProcessContext[str], out: Collector[tuple[str, int]]
    ) -> None:
        n = self.count.value() + 1
        self.count.update(n)
        PROCESSED.append(value)
        event = WATCH.get(value)
        if event is not None:
            event.set()
        out.collect((ctx.current_key, n))


PROCESSED: list[str] = []
"""Every record RunningCount processed (module level: functions are deep-copied per subtask)."""
WATCH: dict[str, asyncio.Event] = {}


@pytest.fixture(autouse=True)
def _reset_globals() -> Any:
    PROCESSED.clear()
    WATCH.clear()
    FAIL_ONCE.clear()
    yield
    PROCESSED.clear()
    WATCH.clear()
    FAIL_ONCE.clear()


class ScriptedSink(Sink):
    """Records what it receives; its snapshots block on ``hold`` or fail where ``fail(id)``."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.snapshot_ids: list[int] = []
        self.hold: asyncio.Event | None = None
        self.notify_hold: asyncio.Event | None = None
        self.notified: list[int] = []
        self.fail: Callable[[int], bool] = lambda checkpoint_id: False

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        return _ScriptedWriter(self)


class _ScriptedWriter(SinkWriter):
    def __init__(self, sink: ScriptedSink) -> None:
        self.sink = sink

    async def write(self, values: list[Any]) -> None:
        self.sink.received.extend(values)

    async def snapshot_state(self, checkpoint_id: int) -> list[Any]:
        sink = self.sink
        sink.snapshot_ids.append(checkpoint_id)
        if sink.fail(checkpoint_id):
            msg = f"scripted snapshot failure of checkpoint {checkpoint_id}"
            raise RuntimeError(msg)
        hold = sink.hold
        if hold is not None:
            await hold.wait()
        return []

    async def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        self.sink.notified.append(checkpoint_id)
        hold = self.sink.notify_hold
        if hold is not None:
            await hold.wait()


GATE = object()
"""In a GatedSource: wait here until a checkpoint taken after this position completed (and the
extra condition, if any, holds)."""


class GatedSource(Source[Any]):
    """A bounded source over ``elements`` (one split), with ``GATE`` and ``TestingSource.CRASH``
    markers. Each CRASH raises ``InjectedCrash`` the first time it is reached."""

    def __init__(self, elements: list[Any], extra: Callable[[], bool] = lambda: True) -> None:
        self.elements = list(elements)
        self.extra = extra
        self.crashed: set[int] = set()
        self.covered_up_to = 0
        """Highest position a completed checkpoint of this source had read up to."""

    def create_splits(self, parallelism: int) -> list[Any]:
        return [{"split": 0, "next": 0}]

    def create_reader(self, context: Any) -> SourceReader[Any]:
        return _GatedReader(self)


class _GatedReader(SourceReader[Any]):
    def __init__(self, source: GatedSource) -> None:
        self.source = source
        self.splits: list[dict[str, Any]] = []

    def add_splits(self, splits: list[Any]) -> None:
        self.splits.extend(dict(s) for s in splits)

    def poll(self, max_records: int) -> Any:
        source = self.source
        elements = source.elements
        out: list[Any] = []
        for split in self.splits:
            while split["next"] < len(elements) and len(out) < max_records:
                position = split["next"]
                element = elements[position]
                if element is GATE:
                    if out:
                        return out
                    if source.covered_up_to < position or not source.extra():
                        return None  # re-polled on the next mail (periodic checkpoints)
                    split["next"] += 1
                    continue
                if element is testing.TestingSource.CRASH:
                    if out:
                        return out
                    split["next"] += 1
                    if position not in source.crashed:
                        source.crashed.add(position)
                        msg = f"GatedSource crash at element {position}"
                        raise InjectedCrash(msg)
                    continue
                out.append(element)
                split["next"] += 1
        return out if out else END_OF_INPUT

    def snapshot_splits(self) -> list[Any]:
        return [dict(s) for s in self.splits]

    async def notify_checkpoint_complete(self, checkpoint_id: int, splits: list[Any]) -> None:
        for split in splits:
            self.source.covered_up_to = max(self.source.covered_up_to, split["next"])


def keys_for(n: int, distinct: int = 7) -> list[str]:
    return [f"k{(i * 31) % distinct}" for i in range(n)]


# --------------------------------------------------------------------------- failover


@pytest.mark.asyncio
@pytest.mark.parametrize("parallelism", [1, 2])
async def test_testing_source_crash_restarts_with_exact_committed_output(parallelism: int) -> None:
    keys = keys_for(400)
    elements: list[Any] = [*keys[:200], testing.TestingSource.CRASH, *keys[200:]]
    source = testing.TestingSource(elements)
    sink = testing.TestingSink()

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("source")
            .key_by(lambda k: k)
            .process(RunningCount(), name="count")
            .uid("count")
            .sink_to(sink)
            .uid("sink")
        )

    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=0.05), restart_strategy=FixedDelayRestart(3, 0)
    )
    graph = build_graph(build, {}, parallelism)
    master = JobMaster(graph, config)
    result = await asyncio.wait_for(master.run(), WAIT_S)

    assert result.attempts == 2
    assert source.crashed  # the crash did happen
    # Keyed running counts: a duplicate or a lost record shows as a wrong or repeated n.
    assert sorted(sink.committed) == sorted(running_counts(keys))


def _gated_count_job(
    source: GatedSource, sink: Sink, function: KeyedProcessFunction[Any, Any, Any] | None = None
) -> Callable[[Any], None]:
    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("source")
            .key_by(lambda k: k)
            .process(function or RunningCount(), name="count")
            .uid("count")
            .sink_to(sink)
            .uid("sink")
        )

    return build


@pytest.mark.asyncio
async def test_crash_after_completed_checkpoint_restores_from_it_exactly() -> None:
    keys = keys_for(300)
    sink = testing.TestingSink()
    # The source waits at the gate until a checkpoint covering the first 150 records completed
    # and the sink committed them; then it crashes 50 records later.
    source = GatedSource(
        [*keys[:150], GATE, *keys[150:200], testing.TestingSource.CRASH, *keys[200:]],
        extra=lambda: len(sink.committed) >= 150,
    )
    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=0.05), restart_strategy=FixedDelayRestart(3, 0)
    )
    master = JobMaster(build_graph(_gated_count_job(source, sink), {}, 1), config)
    result = await asyncio.wait_for(master.run(), WAIT_S)

    expected = running_counts(keys)
    assert result.attempts == 2
    assert sink.committed == expected  # parallelism 1: even the order is the input's
    # Restarted from the checkpoint, not from the beginning: the first 150 were written once.
    written = collections.Counter(sink.written)
    assert all(written[record] == 1 for record in expected[:150])


def _fail_once_on(value: str) -> None:
    if value == FAIL_ONCE.get("target") and FAIL_ONCE.get("armed"):
        FAIL_ONCE["armed"] = False
        msg = f"injected failure on {value}"
        raise ValueError(msg)


class ListCount(KeyedProcessFunction[str, str, tuple[str, int]]):
    """n = the length of a keyed list state that every record is appended to (in place)."""

    def open(self, ctx: RuntimeContext) -> None:
        self.seen = ctx.get_state(ListStateDescriptor("seen"))

    def process_element(
        self, value: str, ctx: KeyedProcessContext[str], out: Collector[tuple[str, int]]
    ) -> None:
        _fail_once_on(value)
        self.seen.add(value)
        out.collect((ctx.current_key, len(self.seen.get())))


class MapCount(KeyedProcessFunction[str, str, tuple[str, int]]):
    """n = the size of a keyed map state that gets one entry per record (in place)."""

    def open(self, ctx: RuntimeContext) -> None:
        self.seen = ctx.get_state(MapStateDescriptor("seen"))

    def process_element(
        self, value: str, ctx: KeyedProcessContext[str], out: Collector[tuple[str, int]]
    ) -> None:
        _fail_once_on(value)
        n = len(self.seen.keys()) + 1
        self.seen.put(value, n)
        out.collect((ctx.current_key, n))


@pytest.mark.asyncio
@pytest.mark.parametrize("function", [ListCount, MapCount], ids=["list-state", "map-state"])
async def test_restored_list_and_map_state_hold_only_what_the_checkpoint_saw(
    tmp_path: Path, function: type[KeyedProcessFunction[Any, Any, Any]]
) -> None:
    """State changed in place after a checkpoint must not leak into that checkpoint: the
    operator fails 70 records after the checkpoint, having appended them to its state."""
    records = [f"{key}/{i}" for i, key in enumerate(keys_for(300))]
    sink = testing.TestingSink()
    source = GatedSource(
        [*records[:150], GATE, *records[150:]], extra=lambda: len(sink.committed) >= 150
    )
    FAIL_ONCE.update(target=records[220], armed=True)

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("source")
            .key_by(lambda r: r.split("/")[0])
            .process(function(), name="count")
            .uid("count")
            .sink_to(sink)
            .uid("sink")
        )

    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=0.05), restart_strategy=FixedDelayRestart(3, 0)
    )
    graph = build_graph(build, {}, 1)
    master = JobMaster(graph, config, storage=CheckpointStorage(tmp_path / "chk", "test-job"))
    result = await asyncio.wait_for(master.run(), WAIT_S)

    assert result.attempts == 2
    assert not FAIL_ONCE["armed"]
    assert sink.committed == running_counts([r.split("/")[0] for r in records])


FAIL_ONCE: dict[str, bool] = {}


class FailOnceMap(MapFunction[str, str]):
    """Raises ValueError on the record ``target`` while FAIL_ONCE["armed"] is true (once)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def map(self, value: str) -> str:
        if value == self.target and FAIL_ONCE.get("armed"):
            FAIL_ONCE["armed"] = False
            msg = f"injected map failure on {value}"
            raise ValueError(msg)
        return value


def _failing_map_job(source: Source[Any], sink: Sink, target: str) -> Callable[[Any], None]:
    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("source")
            .map(FailOnceMap(target), name="fail once")
            .uid("fail-once")
            .key_by(lambda k: k.split("/")[0])
            .process(RunningCount(), name="count")
            .uid("count")
            .sink_to(sink)
            .uid("sink")
        )

    return build


@pytest.mark.asyncio
@pytest.mark.parametrize("parallelism", [1, 3])
async def test_map_that_raises_once_restarts_with_exact_committed_output(parallelism: int) -> None:
    records = [f"{key}/{i}" for i, key in enumerate(keys_for(360))]
    target = records[250]
    sink = testing.TestingSink()
    source = GatedSource(
        [*records[:120], GATE, *records[120:]], extra=lambda: len(sink.committed) >= 120
    )
    FAIL_ONCE["armed"] = True
    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=0.05), restart_strategy=FixedDelayRestart(3, 0)
    )
    graph = build_graph(_failing_map_job(source, sink, target), {}, parallelism)
    result = await asyncio.wait_for(JobMaster(graph, config).run(), WAIT_S)

    assert result.attempts == 2
    assert not FAIL_ONCE["armed"]
    expected = running_counts([r.split("/")[0] for r in records])
    assert sorted(sink.committed) == sorted(expected)


@pytest.mark.asyncio
async def test_without_restart_the_job_fails_naming_the_exception() -> None:
    records = [f"{key}/{i}" for i, key in enumerate(keys_for(100))]
    target = records[60]
    sink = testing.TestingSink()
    FAIL_ONCE["armed"] = True
    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=0.05), restart_strategy=NoRestart()
    )
    graph = build_graph(_failing_map_job(testing.TestingSource(records), sink, target), {}, 1)
    with pytest.raises(JobFailedError) as info:
        await asyncio.wait_for(JobMaster(graph, config).run(), WAIT_S)

    message = str(info.value)
    assert "ValueError" in message
    assert f"injected map failure on {target}" in message
    assert "fail once" in message  # the operator is named
    assert isinstance(info.value.cause, UserFunctionError)
    assert isinstance(info.value.cause.cause, ValueError)
    assert len(sink.committed) <= 60  # nothing after the failing record was ever committed


@pytest.mark.asyncio
async def test_testing_source_crash_without_restart_fails_the_job() -> None:
    source = testing.TestingSource(["a", "b", testing.TestingSource.CRASH, "c"])
    sink = testing.TestingSink()

    def build(job: Any) -> None:
        job.from_source(source).uid("source").sink_to(sink).uid("sink")

    with pytest.raises(JobFailedError) as info:
        await asyncio.wait_for(
            JobMaster(build_graph(build, {}, 1), ExecutionConfig()).run(), WAIT_S
        )
    assert "InjectedCrash" in str(info.value)
    assert "TestingSource.CRASH at element 2" in str(info.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("sink_kind", ["testing-sink", "two-phase-file-sink"])
async def test_crash_before_commit_then_restore_commits_exactly(
    tmp_path: Path, sink_kind: str
) -> None:
    """``before-commit`` (raise): checkpoint 1 completed with staged output, and the sink crashed
    before committing it; the restore from checkpoint 1 must commit that output (no gap), once
    (no duplicate)."""
    keys = keys_for(300)
    out_dir = tmp_path / "out"
    sink: Sink = (
        testing.TestingSink() if sink_kind == "testing-sink" else TwoPhaseCommitFileSink(out_dir)
    )
    source = ControlledSource("src")

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("source")
            .key_by(lambda k: k)
            .process(RunningCount(), name="count")
            .uid("count")
            .map(list)  # JSON-friendly for the file sink
            .sink_to(sink)
            .uid("sink")
        )

    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=None), restart_strategy=FixedDelayRestart(3, 0)
    )
    master, job = await start_job(build, config)
    source.push(*keys[:150])
    await until(lambda: len(PROCESSED) == 150, "the first half processed", job)
    arm("before-commit", 1, "raise")
    first = await asyncio.wait_for(
        master.coordinator.request_trigger(CheckpointKind.CHECKPOINT), WAIT_S
    )
    await until(
        lambda: master.attempt == 2 and all(t.state is TaskState.RUNNING for t in master.tasks),
        "the restart from checkpoint 1",
        job,
    )
    assert master.restore_point is not None
    assert master.restore_point.checkpoint_id == first.checkpoint_id
    source.push(*keys[150:])
    source.end()
    result = await asyncio.wait_for(job, WAIT_S)

    assert result.attempts == 2
    if isinstance(sink, testing.TestingSink):
        committed = [tuple(r) for r in sink.committed]
    else:
        committed = [
            tuple(orjson.loads(line))
            for path in committed_files(out_dir)
            for line in path.read_bytes().splitlines()
        ]
    assert sorted(committed) == sorted(running_counts(keys))


@pytest.mark.asyncio
@pytest.mark.parametrize("sink_kind", ["testing-sink", "two-phase-file-sink"])
async def test_failover_after_an_intermediate_savepoint_restores_the_latest_checkpoint(
    tmp_path: Path, sink_kind: str
) -> None:
    """An intermediate savepoint commits nothing and is not a failover target: a failure after it
    restores the latest checkpoint before it, and the committed output stays exact."""
    keys = keys_for(300)
    out_dir = tmp_path / "out"
    sink: Sink = (
        testing.TestingSink() if sink_kind == "testing-sink" else TwoPhaseCommitFileSink(out_dir)
    )
    source = ControlledSource("src")

    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("source")
            .key_by(lambda k: k)
            .process(RunningCount(), name="count")
            .uid("count")
            .map(list)
            .sink_to(sink)
            .uid("sink")
        )

    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=None), restart_strategy=FixedDelayRestart(3, 0)
    )
    master, job = await start_job(
        build, config, storage=CheckpointStorage(tmp_path / "chk", "test-job")
    )
    coordinator = master.coordinator
    source.push(*keys[:100])
    await until(lambda: len(PROCESSED) == 100, "the first 100 processed", job)
    checkpoint = await asyncio.wait_for(
        coordinator.request_trigger(CheckpointKind.CHECKPOINT), WAIT_S
    )
    source.push(*keys[100:200])
    await until(lambda: len(PROCESSED) == 200, "the next 100 processed", job)
    savepoint = await asyncio.wait_for(
        coordinator.request_trigger(CheckpointKind.SAVEPOINT, str(tmp_path / "sp")), WAIT_S
    )
    assert savepoint.checkpoint_id > checkpoint.checkpoint_id
    assert savepoint.path is not None and Path(savepoint.path).parent == tmp_path / "sp"
    # The next checkpoint fails in a task: the job fails over.
    arm("before-snapshot", 1, "raise")
    failed = coordinator.request_trigger(CheckpointKind.CHECKPOINT)
    await until(
        lambda: master.attempt == 2 and all(t.state is TaskState.RUNNING for t in master.tasks),
        "the restart",
        job,
    )
    with pytest.raises(CheckpointFailedError):
        await asyncio.wait_for(failed, WAIT_S)
    assert master.restore_point is not None
    assert master.restore_point.checkpoint_id == checkpoint.checkpoint_id
    assert master.restore_point.kind is CheckpointKind.CHECKPOINT
    source.push(*keys[200:])
    source.end()
    result = await asyncio.wait_for(job, WAIT_S)

    assert result.attempts == 2
    if isinstance(sink, testing.TestingSink):
        committed = [tuple(r) for r in sink.committed]
    else:
        committed = [
            tuple(orjson.loads(line))
            for path in committed_files(out_dir)
            for line in path.read_bytes().splitlines()
        ]
    assert sorted(committed) == sorted(running_counts(keys))


# --------------------------------------------------------------------------- barrier alignment


def _two_source_job(a: ControlledSource, b: ControlledSource, sink: Sink) -> Callable[[Any], None]:
    def build(job: Any) -> None:
        left = job.from_source(a, name="A").uid("src-a")
        right = job.from_source(b, name="B").uid("src-b")
        (
            left.union(right)
            .key_by(lambda r: r[0])
            .process(RunningCount(), name="count")
            .uid("count")
            .disable_chaining()
            .sink_to(sink)
            .uid("sink")
        )

    return build


def _task_of(master: JobMaster, uid: str) -> Any:
    return next(t for t in master.tasks if any(op.uid == uid for op in t.operators))


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [CheckpointingMode.EXACTLY_ONCE, CheckpointingMode.AT_LEAST_ONCE])
async def test_barrier_alignment_with_a_slow_input(mode: CheckpointingMode) -> None:
    a, b = ControlledSource("A"), ControlledSource("B")
    sink = testing.TestingSink()
    config = ExecutionConfig(checkpoint=CheckpointConfig(interval_s=None, mode=mode))
    master, job = await start_job(_two_source_job(a, b, sink), config)
    counter = _task_of(master, "count")
    assert counter.gate is not None and len(counter.gate.channels) == 2

    a.push("a1")
    b.push("b1")
    await until(lambda: {"a1", "b1"} <= set(PROCESSED), "a1 and b1 processed", job)

    # B is slow: its barrier waits until the test releases it.
    b.hold = asyncio.Event()
    WATCH["a2"] = asyncio.Event()
    checkpoint = master.coordinator.request_trigger(CheckpointKind.CHECKPOINT)
    await until(
        lambda: a.snapshots_started == 1 and b.snapshots_started == 1, "both snapshots", job
    )
    # A already sent its barrier; a2 follows it on A's channel.
    a.push("a2")
    gate = counter.gate
    if mode is CheckpointingMode.EXACTLY_ONCE:
        # a2 arrived behind A's barrier, on a channel that alignment blocked.
        await until(
            lambda: any(gate.channels[i].has_data() for i in gate.blocked_channels),
            "a2 queued on the blocked channel of A",
            job,
        )
        assert "a2" not in PROCESSED
    else:
        # At-least-once blocks nothing: a2 is processed before B's barrier arrives.
        await asyncio.wait_for(WATCH["a2"].wait(), WAIT_S)
        assert not gate.blocked_channels
    assert not checkpoint.done()
    b.hold.set()
    completed = await asyncio.wait_for(checkpoint, WAIT_S)

    counts = keyed_values(completed.operators["count"].subtask_states.snapshot(0), "count")
    if mode is CheckpointingMode.EXACTLY_ONCE:
        assert counts == {"a": 1, "b": 1}  # a2 came after the barrier: not in the snapshot
    else:
        assert counts == {"a": 2, "b": 1}  # a2 overtook B's barrier
    await until(lambda: "a2" in PROCESSED, "a2 processed", job)

    a.end()
    b.end()
    await asyncio.wait_for(job, WAIT_S)
    assert sorted(sink.committed) == [("a", 1), ("a", 2), ("b", 1)]


# --------------------------------------------------------------------------- coordinator rules


def _controlled_to_sink(source: ControlledSource, sink: ScriptedSink) -> Callable[[Any], None]:
    def build(job: Any) -> None:
        (
            job.from_source(source)
            .uid("source")
            .sink_to(sink, name="scripted")
            .uid("sink")
            .disable_chaining()
        )

    return build


@pytest.mark.asyncio
async def test_checkpoint_timeout_aborts_with_expired() -> None:
    source, sink = ControlledSource("src"), ScriptedSink()
    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=None, timeout_s=0.2, tolerable_failures=5)
    )
    master, job = await start_job(_controlled_to_sink(source, sink), config)
    source.push(1, 2, 3)
    sink.hold = asyncio.Event()  # the sink's snapshot blocks: the checkpoint cannot complete

    started = time.monotonic()
    with pytest.raises(CheckpointFailedError, match="expired"):
        await asyncio.wait_for(
            master.coordinator.request_trigger(CheckpointKind.CHECKPOINT), WAIT_S
        )
    assert time.monotonic() - started >= 0.2
    stats = master.coordinator.history[-1]
    assert stats.status is CheckpointStatus.FAILED
    assert stats.failure is not None and "expired" in stats.failure
    assert "0.2s" in stats.failure
    assert master.coordinator.consecutive_failures == 1
    assert not master.coordinator.pending

    # Released, the next checkpoint completes and resets the failure count.
    sink.hold.set()
    sink.hold = None
    completed = await asyncio.wait_for(
        master.coordinator.request_trigger(CheckpointKind.CHECKPOINT), WAIT_S
    )
    assert completed.checkpoint_id == stats.checkpoint_id + 1
    assert master.coordinator.consecutive_failures == 0
    source.end()
    await asyncio.wait_for(job, WAIT_S)
    assert sink.received == [1, 2, 3]


@pytest.mark.asyncio
async def test_checkpoint_stats_give_each_task_the_time_its_snapshot_took() -> None:
    """A task's snapshot time covers its operators' snapshot hooks (Flink's synchronous part),
    so a slow hook shows in the checkpoint's statistics: here the sink's, held by the test."""
    source, sink = ControlledSource("src"), ScriptedSink()
    config = ExecutionConfig(checkpoint=CheckpointConfig(interval_s=None))
    master, job = await start_job(_controlled_to_sink(source, sink), config)
    source.push(1, 2, 3)
    sink.hold = asyncio.Event()
    trigger = asyncio.ensure_future(master.coordinator.request_trigger(CheckpointKind.CHECKPOINT))
    await until(lambda: bool(sink.snapshot_ids), "the sink's snapshot started", job)
    held_from = time.monotonic()
    await until(lambda: time.monotonic() > held_from, "the clock moved on", job)
    held_ms = (time.monotonic() - held_from) * 1000.0
    sink.hold.set()
    completed = await asyncio.wait_for(trigger, WAIT_S)

    stats = next(
        s for s in master.coordinator.history if s.checkpoint_id == completed.checkpoint_id
    )
    assert stats.snapshot_ms.keys() == stats.alignment_ms.keys() == {"source/0", "sink/0"}
    assert stats.snapshot_ms["sink/0"] >= held_ms > 0
    assert stats.duration_ms is not None and stats.snapshot_ms["sink/0"] <= stats.duration_ms
    assert stats.to_json()["snapshot_ms"] == stats.snapshot_ms
    source.end()
    await asyncio.wait_for(job, WAIT_S)


def _count_periodic_ticks(master: JobMaster) -> Callable[[], int]:
    """Wrap the coordinator's periodic trigger to count how often the timer fired."""
    coordinator = master.coordinator
    original = coordinator._trigger_periodic
    ticks = [0]

    def counted() -> None:
        ticks[0] += 1
        original()

    coordinator._trigger_periodic = counted  # type: ignore[method-assign]
    return lambda: ticks[0]


@pytest.mark.asyncio
@pytest.mark.parametrize("max_concurrent", [1, 2])
async def test_max_concurrent_checkpoints_honoured(max_concurrent: int) -> None:
    source, sink = ControlledSource("src"), ScriptedSink()
    sink.hold = asyncio.Event()
    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=0.01, max_concurrent=max_concurrent)
    )
    master, job = await start_job(_controlled_to_sink(source, sink), config)
    ticks = _count_periodic_ticks(master)
    coordinator = master.coordinator
    await until(lambda: len(coordinator.pending) == max_concurrent, "pending checkpoints", job)
    # Many more periodic ticks while they are stuck: none may start another checkpoint.
    seen = ticks()
    await until(lambda: ticks() >= seen + 10, "ten more periodic ticks", job)
    assert len(coordinator.pending) == max_concurrent
    assert len(coordinator.history) == max_concurrent
    assert all(s.status is CheckpointStatus.IN_PROGRESS for s in coordinator.history)

    sink.hold.set()
    sink.hold = None
    await until(lambda: len(coordinator.completed_ids) >= max_concurrent + 1, "completions", job)
    source.end()
    await asyncio.wait_for(job, WAIT_S)
    # Over the whole run, never more than max_concurrent in flight at once.
    spans = [
        (s.trigger_time_ms, s.trigger_time_ms + (s.duration_ms or 0.0)) for s in coordinator.history
    ]
    for start, _ in spans:
        in_flight = sum(1 for s, e in spans if s <= start < e - 1)
        assert in_flight <= max_concurrent


@pytest.mark.asyncio
async def test_min_pause_between_checkpoints_honoured() -> None:
    source, sink = ControlledSource("src"), ScriptedSink()
    min_pause = 0.25
    config = ExecutionConfig(checkpoint=CheckpointConfig(interval_s=0.01, min_pause_s=min_pause))
    master, job = await start_job(_controlled_to_sink(source, sink), config)
    coordinator = master.coordinator
    await until(lambda: len(coordinator.completed_ids) >= 3, "three checkpoints", job)
    history = [s for s in coordinator.history if s.status is CheckpointStatus.COMPLETED][:3]
    source.end()
    await asyncio.wait_for(job, WAIT_S)

    assert len(history) == 3
    for previous, following in itertools.pairwise(history):
        assert previous.duration_ms is not None
        completed_at = previous.trigger_time_ms + previous.duration_ms
        # trigger_time_ms is whole milliseconds of wall time: allow 2 ms of rounding.
        assert following.trigger_time_ms - completed_at >= min_pause * 1000 - 2


@pytest.mark.asyncio
async def test_tolerable_failures_do_not_fail_the_job() -> None:
    source, sink = ControlledSource("src"), ScriptedSink()
    failing = {1, 2, 4, 5}
    sink.fail = lambda checkpoint_id: checkpoint_id in failing
    config = ExecutionConfig(checkpoint=CheckpointConfig(interval_s=0.01, tolerable_failures=2))
    master, job = await start_job(_controlled_to_sink(source, sink), config)
    coordinator = master.coordinator
    await until(lambda: len(coordinator.history) >= 7, "seven checkpoints", job)
    statuses = {s.checkpoint_id: s.status for s in coordinator.history}
    source.end()
    result = await asyncio.wait_for(job, WAIT_S)

    assert result.attempts == 1
    for checkpoint_id in range(1, 7):
        expected = (
            CheckpointStatus.FAILED if checkpoint_id in failing else CheckpointStatus.COMPLETED
        )
        assert statuses[checkpoint_id] is expected, checkpoint_id
    failure = next(s.failure for s in coordinator.history if s.checkpoint_id == 1)
    assert failure is not None and "scripted snapshot failure of checkpoint 1" in failure


@pytest.mark.asyncio
async def test_too_many_consecutive_checkpoint_failures_fail_the_job() -> None:
    source, sink = ControlledSource("src"), ScriptedSink()
    sink.fail = lambda checkpoint_id: True
    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=0.01, tolerable_failures=2),
        restart_strategy=NoRestart(),
    )
    master, job = await start_job(_controlled_to_sink(source, sink), config)
    with pytest.raises(JobFailedError) as info:
        await asyncio.wait_for(job, WAIT_S)

    assert isinstance(info.value.cause, TooManyCheckpointFailures)
    assert "TooManyCheckpointFailures" in str(info.value)
    assert "3 consecutive checkpoint failures (tolerated: 2)" in str(info.value)
    failed = [s for s in master.coordinator.history if s.status is CheckpointStatus.FAILED]
    assert [s.checkpoint_id for s in failed] == [1, 2, 3]


@pytest.mark.asyncio
async def test_too_many_checkpoint_failures_fail_over_with_restart() -> None:
    source, sink = ControlledSource("src"), ScriptedSink()
    sink.fail = lambda checkpoint_id: checkpoint_id <= 2
    config = ExecutionConfig(
        checkpoint=CheckpointConfig(interval_s=0.01, tolerable_failures=1),
        restart_strategy=FixedDelayRestart(1, 0),
    )
    master, job = await start_job(_controlled_to_sink(source, sink), config)
    coordinator = master.coordinator
    await until(
        lambda: master.attempt == 2 and len(coordinator.completed_ids) >= 1,
        "the second attempt and a completed checkpoint",
        job,
    )
    source.end()
    result = await asyncio.wait_for(job, WAIT_S)
    assert result.attempts == 2
    assert [s.status for s in coordinator.history[:2]] == [CheckpointStatus.FAILED] * 2


class SlowDiskStorage(CheckpointStorage):
    """Checkpoint storage on a slow disk: each write takes ``delay_s`` longer to return."""

    def __init__(self, directory: Path, delay_s: float) -> None:
        super().__init__(directory, "test-job")
        self.delay_s = delay_s

    async def write(self, checkpoint: Any, target_dir: str | None = None) -> None:
        await super().write(checkpoint, target_dir)
        await asyncio.sleep(self.delay_s)  # e.g. a slow fsync of the folder


@pytest.mark.asyncio
async def test_checkpoints_on_disk_are_the_retained_completed_ones_when_the_job_ends(
    tmp_path: Path,
) -> None:
    """Every task acknowledges a checkpoint and then finishes while the coordinator is still
    persisting it: that checkpoint must either complete (and subsume the older one, retention 1)
    or leave no completed folder behind. What is on disk must be what the coordinator retained."""
    source, sink = ControlledSource("src"), ScriptedSink()
    chk = tmp_path / "chk"
    # Writes slower than the interval: the next periodic trigger follows every completion at once.
    config = ExecutionConfig(checkpoint=CheckpointConfig(interval_s=0.01, retained=1))
    master, job = await start_job(
        _controlled_to_sink(source, sink), config, storage=SlowDiskStorage(chk, 0.2)
    )
    coordinator = master.coordinator
    source.push(1, 2, 3)
    await until(lambda: len(coordinator.completed_ids) >= 1, "a first checkpoint", job)
    source.end()
    await asyncio.wait_for(job, WAIT_S)
    # Storage writes run on the loop's default executor: let any still running write finish,
    # as the CLI's event loop does before the process exits.
    await asyncio.get_running_loop().shutdown_default_executor()

    on_disk = sorted(
        int(p.name[4:])
        for p in chk.iterdir()
        if p.name.startswith("chk-") and (p / "_metadata").exists()
    )
    retained = sorted(c.checkpoint_id for c in coordinator.completed)
    history = [(s.checkpoint_id, s.status.value, s.failure) for s in coordinator.history]
    assert on_disk == retained, (
        f"checkpoint folders with _metadata {on_disk}, but the coordinator retained {retained}; "
        f"history: {history}"
    )
    assert all(s.status is not CheckpointStatus.IN_PROGRESS for s in coordinator.history), history
    assert sink.received == [1, 2, 3]


@pytest.mark.asyncio
async def test_a_checkpoint_not_triggered_leaves_no_unretrieved_future_error() -> None:
    """A periodic trigger that finds no task running (a restore still in progress) is normal:
    the future nobody waits for must not end up as asyncio's 'Future exception was never
    retrieved' error, which a user reads as a crash. A waiter still gets the failure."""
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        coordinator = CheckpointCoordinator(CheckpointConfig(), None, {})
        waited = coordinator.trigger(CheckpointKind.CHECKPOINT)
        with pytest.raises(CheckpointFailedError, match="not triggered"):
            await waited
        coordinator.trigger(CheckpointKind.CHECKPOINT)  # nobody waits for this one
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert reported == []
