"""Restores that cannot map keyed state are refused, never silent: one max parallelism per keyed
operator (partitioner, state and timers), and key types and state kinds recorded in snapshots.

The CLI tests run a keyed running count with one end-of-input timer per key, stop it with a
savepoint midway, resume, and compare the committed output with a plain Python computation.
"""

from __future__ import annotations

import collections
import enum
import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    operator_records_in,
    read_address,
    run_cli,
    set_args,
    start_cli,
    stop_process,
    stop_with_savepoint,
    wait_for,
)
from etl_expectations import committed_records

from actors.partitioner import KeyGroupPartitioner
from connectors import CollectionSource
from runtime import Job, JobDefinitionError, KeyedCoProcessFunction
from runtime.plan.graph import JobGraph, build_job_graph
from state.keyed import (
    IncompatibleStateError,
    KeyedStateBackend,
    ListStateDescriptor,
    MapStateDescriptor,
    ValueStateDescriptor,
)
from state.keygroups import KeyGroupRange
from state.serde import packb, unpackb

USERS = 40
COUNT = 2400

COUNTING_JOB = '''
from connectors import GeneratorSource, TwoPhaseCommitFileSink
from runtime import KeyedProcessFunction
from state import ListStateDescriptor, ValueStateDescriptor

END_OF_INPUT_TIMER = 1 << 62


class CountWithTimer(KeyedProcessFunction):
    """A running count per key, and one timer per key that reports the final count at the end."""

    def __init__(self, count_as_list):
        self.count_as_list = count_as_list

    def open(self, ctx):
        if self.count_as_list:
            self.count = ctx.get_state(ListStateDescriptor("count"))
        else:
            self.count = ctx.get_state(ValueStateDescriptor("count", default=0))

    def current(self):
        return len(self.count.get()) if self.count_as_list else self.count.value()

    def process_element(self, value, ctx, out):
        n = self.current() + 1
        if self.count_as_list:
            self.count.add(n)
        else:
            self.count.update(n)
        if n == 1:
            ctx.timer_service().register_event_time_timer(END_OF_INPUT_TIMER)
        out.collect({"user": value["user"], "n": n})

    def on_timer(self, timestamp, ctx, out):
        out.collect({"user": str(ctx.current_key), "final": self.current()})


def build(job):
    users = job.params.get_int("users", 40)
    keys = job.params.get("keys", "str")
    key_selector = {
        "str": lambda e: e["user"],
        "int": lambda e: int(e["user"][1:]),
    }[keys]
    counted = (
        job.from_source(
            GeneratorSource(
                lambda i: {"user": f"u{i % users}", "i": i},
                rate=job.params.get_float("rate", 0.0),
                count=job.params.get_int("count", 1000),
            )
        )
        .uid("generator")
        .key_by(key_selector)
        .process(CountWithTimer(job.params.get_bool("count_as_list", False)), name="count")
        .uid("count")
    )
    maxp = job.params.get_int("operator_max_parallelism", 0)
    if maxp:
        counted.set_max_parallelism(maxp)
    counted.sink_to(TwoPhaseCommitFileSink(job.params["output"]), name="files").uid("out")
'''


def expected_counts(count: int = COUNT, users: int = USERS) -> collections.Counter[str]:
    return collections.Counter(f"u{i % users}" for i in range(count))


def assert_exactly_once(out: Path, counts: collections.Counter[str]) -> None:
    """Every (user, n) for n = 1..count once, and one end-of-input timer per user with its count."""
    records = committed_records(out)
    seen = collections.Counter((r["user"], r["n"]) for r in records if "n" in r)
    expected = collections.Counter(
        (user, n) for user, total in counts.items() for n in range(1, total + 1)
    )
    restarted = sorted({user for (user, n), c in seen.items() if c > 1})
    assert seen == expected, f"keys whose count restarted: {restarted}"
    finals = collections.Counter((r["user"], r["final"]) for r in records if "final" in r)
    assert finals == collections.Counter(counts.items()), "timers fired twice or lost"


def job_args(job: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(job),
        *set_args(output=out, count=COUNT, users=USERS),
        "-p",
        "2",
        "--no-progress",
        *extra,
    ]


def resume(job: Path, out: Path, savepoint: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the counting job to its end from ``savepoint``."""
    return run_cli(*job_args(job, out, "--restore", str(savepoint), "--rest-port", "-1", *extra))


def stop_midway(tmp_path: Path, job: Path, out: Path, *extra: str) -> Path:
    """Run the counting job throttled, stop it with a savepoint midway; the savepoint folder."""
    chk, savepoints, stderr = tmp_path / "chk", tmp_path / "savepoints", tmp_path / "first.stderr"
    proc = start_cli(
        stderr,
        *job_args(job, out, "--set", "rate=150", "--checkpoint-dir", str(chk), *extra),
        *("--savepoint-dir", str(savepoints)),
    )
    try:
        address = wait_for(lambda: read_address(chk), "the rest-address file", proc, stderr)
        wait_for(
            lambda: operator_records_in(address, "count") >= 300, "some progress", proc, stderr
        )
        savepoint = stop_with_savepoint(address, savepoints)
        assert proc.wait(timeout=60) == 0, stderr.read_text()
    finally:
        stop_process(proc)
    stopped_at = sum(1 for r in committed_records(out) if "n" in r)
    assert 0 < stopped_at < COUNT, "the job was not stopped midway"
    return savepoint


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    path = tmp_path / "counting.py"
    path.write_text(COUNTING_JOB)
    return path


# --------------------------------------------------------------------------- max parallelism


@pytest.mark.slow
def test_operator_max_parallelism_resume_keeps_every_keys_state_and_timer(
    tmp_path: Path, job_file: Path
) -> None:
    out = tmp_path / "out"
    savepoint = stop_midway(tmp_path, job_file, out, "--set", "operator_max_parallelism=64")
    resumed = resume(job_file, out, savepoint, "--set", "operator_max_parallelism=64")
    assert resumed.returncode == 0, resumed.stderr
    assert_exactly_once(out, expected_counts())


@pytest.mark.slow
def test_restore_with_another_max_parallelism_is_refused_naming_operator_and_values(
    tmp_path: Path, job_file: Path
) -> None:
    out = tmp_path / "out"
    savepoint = stop_midway(tmp_path, job_file, out, "--set", "operator_max_parallelism=64")
    before = committed_records(out)
    refused = resume(job_file, out, savepoint)
    assert refused.returncode == 2, refused.stderr
    assert "uid count" in refused.stderr
    assert "max parallelism 64" in refused.stderr and "128" in refused.stderr
    assert "set_max_parallelism(64)" in refused.stderr
    assert committed_records(out) == before  # nothing ran

    dry_run = run_cli(
        "checkpoints",
        str(savepoint),
        "--against",
        str(job_file),
        "--set",
        "output=x",
        "--max-parallelism",
        "64",
        "-p",
        "2",
    )
    assert dry_run.returncode == 0, dry_run.stderr
    assert "error:" not in dry_run.stdout, dry_run.stdout

    # The job-wide --max-parallelism is the way out when the operator sets none.
    resumed = resume(job_file, out, savepoint, "--max-parallelism", "64")
    assert resumed.returncode == 0, resumed.stderr
    assert_exactly_once(out, expected_counts())


def test_max_parallelism_option_validates_and_applies_to_the_job(
    tmp_path: Path, job_file: Path
) -> None:
    out = tmp_path / "out"
    too_small = run_cli(*job_args(job_file, out, "--max-parallelism", "1", "--rest-port", "-1"))
    assert too_small.returncode == 2, too_small.stderr
    assert "parallelism 2" in too_small.stderr and "max parallelism 1" in too_small.stderr
    assert "--max-parallelism" in too_small.stderr

    not_a_number = run_cli(*job_args(job_file, out, "--max-parallelism", "0"))
    assert not_a_number.returncode == 2
    assert "--max-parallelism" in not_a_number.stderr

    chk = tmp_path / "chk"
    ran = run_cli(
        *job_args(
            job_file,
            out,
            "--max-parallelism",
            "8",
            "--checkpoint-dir",
            str(chk),
            "--rest-port",
            "-1",
        )
    )
    assert ran.returncode == 0, ran.stderr
    assert_exactly_once(out, expected_counts())
    listing = run_cli("checkpoints", str(chk), "--against", str(job_file), "--set", "output=x")
    assert listing.returncode == 0, listing.stderr
    assert "max parallelism 8" in listing.stdout and "128" in listing.stdout, listing.stdout


# --------------------------------------------------------------------------- key type and kind


@pytest.mark.slow
def test_changed_key_type_is_refused_unless_allowed(tmp_path: Path, job_file: Path) -> None:
    out = tmp_path / "out"
    savepoint = stop_midway(tmp_path, job_file, out)
    before = committed_records(out)
    refused = resume(job_file, out, savepoint, "--set", "keys=int")
    # A refused restore: not retried by a restart strategy, one line, no traceback.
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    assert "'count' (uid count" in refused.stderr
    assert "key type str" in refused.stderr and "new key type int" in refused.stderr
    assert "--allow-non-restored-state" in refused.stderr
    assert committed_records(out) == before  # nothing was committed by the failed run

    # Knowingly dropped: the counters restart at 1 under the new keys (as documented).
    allowed = resume(job_file, out, savepoint, "--set", "keys=int", "--allow-non-restored-state")
    assert allowed.returncode == 0, allowed.stderr
    assert "drops the restored keyed state and timers" in allowed.stderr
    counted = collections.Counter((r["user"], r["n"]) for r in committed_records(out) if "n" in r)
    counted.subtract((r["user"], r["n"]) for r in before if "n" in r)
    remaining = expected_counts() - collections.Counter(r["user"] for r in before if "n" in r)
    assert +counted == collections.Counter(
        (user, n) for user, total in remaining.items() for n in range(1, total + 1)
    )
    # The restored timers (of the str keys) were dropped with the state: one timer per new key.
    finals = collections.Counter(
        (r["user"], r["final"]) for r in committed_records(out) if "final" in r
    )
    assert finals == collections.Counter(
        {(user[1:], total): 1 for user, total in remaining.items()}
    )


@pytest.mark.slow
def test_state_redeclared_with_another_kind_is_refused_unless_allowed(
    tmp_path: Path, job_file: Path
) -> None:
    out = tmp_path / "out"
    savepoint = stop_midway(tmp_path, job_file, out)
    refused = resume(job_file, out, savepoint, "--set", "count_as_list=true")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    assert "'count' (uid count" in refused.stderr
    assert "state 'count'" in refused.stderr
    assert "value state" in refused.stderr and "list state" in refused.stderr
    assert "--allow-non-restored-state" in refused.stderr

    allowed = resume(
        job_file, out, savepoint, "--set", "count_as_list=true", "--allow-non-restored-state"
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "state 'count' was restored as value state" in allowed.stderr  # the warning
    restarted = [r for r in committed_records(out) if r.get("n") == 1]
    assert len(restarted) == 2 * USERS  # every counter started at 1 twice: before and after


# --------------------------------------------------------------------------- job graph


def keyed_edges_into(graph: JobGraph, uid: str) -> list[KeyGroupPartitioner]:
    target = next(v for v in graph.vertices if v.head.uid == uid)
    partitioners = [e.partitioner_factory() for e in graph.inputs_of(target)]
    assert partitioners and all(isinstance(p, KeyGroupPartitioner) for p in partitioners)
    return partitioners  # type: ignore[return-value]


class Both(KeyedCoProcessFunction[Any, Any, Any]):
    def process_element1(self, value: Any, ctx: Any, out: Any) -> None:
        out.collect(value)

    def process_element2(self, value: Any, ctx: Any, out: Any) -> None:
        out.collect(value)


def test_every_keyed_input_routes_by_the_max_parallelism_of_the_operator_it_feeds() -> None:
    job = Job(parallelism=2, max_parallelism=128)
    first = job.from_source(CollectionSource([1, 2]))
    second = job.from_source(CollectionSource([3, 4]))
    (
        first.union(second)
        .key_by(lambda v: v)
        .reduce(lambda a, b: a + b)
        .uid("union-reduce")
        .set_max_parallelism(64)
        .print()
    )
    (
        first.connect(second)
        .key_by(lambda v: v, lambda v: v)
        .process(Both())
        .uid("co")
        .set_max_parallelism(32)
        .print()
    )
    first.key_by(lambda v: v).reduce(lambda a, b: a).uid("default").print()
    graph = build_job_graph(job)
    assert [p.max_parallelism for p in keyed_edges_into(graph, "union-reduce")] == [64, 64]
    assert [p.max_parallelism for p in keyed_edges_into(graph, "co")] == [32, 32]
    assert [p.max_parallelism for p in keyed_edges_into(graph, "default")] == [128]
    assert graph.operators["union-reduce"].max_parallelism == 64


def test_max_parallelism_out_of_range_is_refused_when_the_job_is_built() -> None:
    job = Job()
    stream = job.from_source(CollectionSource([1])).key_by(lambda v: v).reduce(max)
    with pytest.raises(JobDefinitionError, match=r"max parallelism must be in 1\.\.32768"):
        stream.set_max_parallelism(0)


# --------------------------------------------------------------------------- state level

MAXP = 16
ALL_GROUPS = KeyGroupRange(0, MAXP - 1)


def round_trip(snapshot: dict[str, Any]) -> dict[str, Any]:
    decoded: dict[str, Any] = unpackb(packb(snapshot))
    return decoded


def counted_snapshot(keys: list[Any]) -> dict[str, Any]:
    backend = KeyedStateBackend("operator 'old' (uid old)", ALL_GROUPS, MAXP)
    count = backend.get_state(ValueStateDescriptor("count", default=0))
    seen = backend.get_state(ListStateDescriptor("seen"))
    for key in keys:
        backend.set_current_key(key)
        count.update(count.value() + 1)
        seen.add(key)
    return round_trip(backend.snapshot())


class Color(enum.StrEnum):
    RED = "red"


def test_keyed_snapshot_records_kind_and_key_types_per_state() -> None:
    snapshot = counted_snapshot(["a", Color.RED, 7, ("t", 1)])
    assert snapshot["count"]["kind"] == "value"
    assert snapshot["seen"]["kind"] == "list"
    # A StrEnum key is stored, and comes back, as str: recorded as str.
    assert snapshot["count"]["key_types"] == ["int", "str", "tuple"]


def test_state_of_another_kind_is_refused_or_dropped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    snapshot = counted_snapshot(["a", "b"])
    refusing = KeyedStateBackend("operator 'new' (uid new)", ALL_GROUPS, MAXP)
    refusing.restore([snapshot])
    with pytest.raises(IncompatibleStateError) as refused:
        refusing.get_state(MapStateDescriptor("count"))
    message = str(refused.value)
    assert "operator 'new' (uid new)" in message
    assert "state 'count'" in message and "value state" in message and "map state" in message
    assert "--allow-non-restored-state" in message

    allowing = KeyedStateBackend(
        "operator 'new' (uid new)", ALL_GROUPS, MAXP, allow_non_restored_state=True
    )
    allowing.restore([snapshot])
    with caplog.at_level(logging.WARNING, logger="state.keyed"):
        dropped = allowing.get_state(MapStateDescriptor("count"))
    assert "state 'count'" in caplog.text
    allowing.set_current_key("a")
    assert dropped.is_empty()
    assert allowing.get_state(ListStateDescriptor("seen")).get() == ["a"]  # the others restore


def test_first_key_of_another_type_is_refused_or_drops_all_keyed_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    snapshot = counted_snapshot(["u1", "u2"])
    same = KeyedStateBackend("operator 'new' (uid new)", ALL_GROUPS, MAXP)
    same.restore([snapshot])
    assert same.restored_key_types == frozenset({"str"})
    assert same.check_first_key("u3") is False

    refusing = KeyedStateBackend("operator 'new' (uid new)", ALL_GROUPS, MAXP)
    refusing.restore([snapshot])
    with pytest.raises(IncompatibleStateError) as refused:
        refusing.check_first_key(1)
    message = str(refused.value)
    assert "operator 'new' (uid new)" in message
    assert "key type str" in message and "new key type int" in message
    assert "--allow-non-restored-state" in message

    allowing = KeyedStateBackend(
        "operator 'new' (uid new)", ALL_GROUPS, MAXP, allow_non_restored_state=True
    )
    allowing.restore([snapshot])
    count = allowing.get_state(ValueStateDescriptor("count", default=0))
    with caplog.at_level(logging.WARNING, logger="state.keyed"):
        assert allowing.check_first_key(1) is True
    assert "drops the restored keyed state and timers" in caplog.text
    allowing.set_current_key("u1")
    assert count.value() == 0
    after = round_trip(allowing.snapshot())
    assert set(after) == {"count"}  # the restored, undeclared "seen" is dropped too
    assert after["count"]["keys"] == [] and after["count"]["key_types"] == []


def test_snapshot_without_the_new_fields_restores_without_checks() -> None:
    old_format = {
        "count": {"kind": "value", "keys": ["u1"], "values": [5]},
        "carried": {"kind": "restored", "keys": ["u1"], "values": [[1]]},
    }
    backend = KeyedStateBackend("operator 'new' (uid new)", ALL_GROUPS, MAXP)
    backend.restore([old_format])
    assert backend.restored_key_types == frozenset()
    assert backend.check_first_key(1) is False
    carried = backend.get_state(ListStateDescriptor("carried"))  # unknown kind: no check
    backend.set_current_key("u1")
    assert carried.get() == [1]
    assert backend.get_state(ValueStateDescriptor("count")).value() == 5


def test_undeclared_restored_state_is_carried_with_its_kind_and_key_types() -> None:
    snapshot = counted_snapshot(["a", 3])
    middle = KeyedStateBackend("operator 'mid' (uid mid)", ALL_GROUPS, MAXP)
    middle.restore([snapshot])
    middle.get_state(ValueStateDescriptor("count", default=0))  # "seen" is never declared
    carried = round_trip(middle.snapshot())
    assert carried["seen"] == snapshot["seen"]
    later = KeyedStateBackend("operator 'late' (uid late)", ALL_GROUPS, MAXP)
    later.restore([carried])
    with pytest.raises(IncompatibleStateError, match="list state"):
        later.get_state(ValueStateDescriptor("seen"))
