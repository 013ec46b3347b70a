"""Queryable state: ``GET /state/{uid}?key=K`` answers from the latest completed checkpoint of the
running job, never from live state, and ``python -m runtime state`` answers the same offline from
a checkpoint directory or a checkpoint or savepoint folder."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import get_json, run_cli, write_savepoint
from loop_helpers import (
    ControlledSource,
    HeldSink,
    start_job_on_master,
    take_checkpoint,
    wait_until,
    word_count_job,
)

from runtime import TumblingEventTimeWindows
from runtime.config import ExecutionConfig
from runtime.shell.cli import main
from runtime.shell.queryable import StateQueryError, load_queried_checkpoint, query_state
from runtime.shell.rest import ControlServer
from state import KeyedStateBackend, KeyGroupRange, ValueStateDescriptor
from state.keygroups import DEFAULT_MAX_PARALLELISM, key_group_for_key, subtask_for_key_group
from state.storage import CheckpointKind, CheckpointStorage, load_checkpoint


@contextlib.asynccontextmanager
async def word_count_with_endpoint(
    tmp_path: Path,
) -> AsyncIterator[tuple[Any, ControlledSource, HeldSink, str]]:
    """The word count of ``loop_helpers`` running with checkpoints in ``tmp_path/chk`` (taken
    only when the test asks) and its control endpoint."""
    source, sink = ControlledSource("lines"), HeldSink()
    master, job = await start_job_on_master(
        word_count_job(source, sink),
        ExecutionConfig(),
        name="queryable",
        storage=CheckpointStorage(tmp_path / "chk", "queryable"),
    )
    server = ControlServer(master, lambda: None, port=0)
    address = await server.start()
    try:
        yield master, source, sink, address
    finally:
        await server.stop()
        source.end()
        await job


async def query(address: str, uid: str, key: str | None) -> tuple[int, Any]:
    """``GET /state/{uid}?key=...``: the HTTP status and the JSON answer."""
    path = f"/state/{urllib.parse.quote(uid)}"
    if key is not None:
        path += "?" + urllib.parse.urlencode({"key": key})
    try:
        return 200, await asyncio.to_thread(get_json, address, path)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def fed(source: ControlledSource, sink: HeldSink, *lines: str) -> None:
    """Push ``lines`` and wait until the sink got the count of every word in them."""
    expected = len(sink.results) + sum(len(line.split()) for line in lines)
    source.push(*lines)
    await wait_until(lambda: len(sink.results) == expected, f"{expected} counts at the sink")


def owner_of(key: Any, parallelism: int) -> tuple[int, int]:
    key_group = key_group_for_key(key, DEFAULT_MAX_PARALLELISM)
    return key_group, subtask_for_key_group(DEFAULT_MAX_PARALLELISM, parallelism, key_group)


@pytest.mark.asyncio
async def test_state_is_the_checkpointed_value_not_the_live_one(tmp_path: Path) -> None:
    async with word_count_with_endpoint(tmp_path) as (master, source, sink, address):
        await fed(source, sink, "to be or not to be")
        first = await take_checkpoint(master)
        status, answer = await query(address, "word-counts", "be")
        key_group, subtask = owner_of("be", 2)
        assert (status, answer) == (
            200,
            {
                "uid": "word-counts",
                "operator": "count",
                "key": "be",
                "key_type": "str",
                "key_group": key_group,
                "subtask": subtask,
                "checkpoint": {
                    "id": first.checkpoint_id,
                    "kind": "checkpoint",
                    "timestamp_ms": first.timestamp_ms,
                    "path": first.path,
                },
                "state": {"reduce": {"kind": "value", "value": ["be", 2]}},
            },
        )

        # The job counts on: the live count of "be" is 5, the checkpointed one still 2.
        await fed(source, sink, "be be be")
        assert sink.results[-1] == ("be", 5)
        status, answer = await query(address, "word-counts", "be")
        assert status == 200
        assert answer["checkpoint"]["id"] == first.checkpoint_id
        assert answer["state"] == {"reduce": {"kind": "value", "value": ["be", 2]}}

        # The next completed checkpoint is what the next query reads.
        second = await take_checkpoint(master)
        status, answer = await query(address, "word-counts", "be")
        assert status == 200
        assert answer["checkpoint"]["id"] == second.checkpoint_id > first.checkpoint_id
        assert answer["state"] == {"reduce": {"kind": "value", "value": ["be", 5]}}


@pytest.mark.asyncio
async def test_state_queries_that_cannot_be_answered_say_what_exists(tmp_path: Path) -> None:
    async with word_count_with_endpoint(tmp_path) as (master, source, sink, address):
        await fed(source, sink, "to be")
        status, answer = await query(address, "word-counts", "be")
        assert status == 404
        assert answer["error"].startswith("no completed checkpoint yet")

        checkpoint = await take_checkpoint(master)
        status, answer = await query(address, "word-count", "be")
        assert status == 404
        assert (
            f"no operator with uid 'word-count' in checkpoint {checkpoint.checkpoint_id}"
            in (answer["error"])
        )
        assert "word-counts" in answer["error"]

        status, answer = await query(address, "word-counts", "question")
        assert status == 404
        assert answer["error"] == (
            "key 'question' has no state in operator 'count' (uid 'word-counts') (str keys) at "
            f"checkpoint {checkpoint.checkpoint_id}"
        )

        status, answer = await query(address, "word-counts", None)
        assert (status, answer) == (
            400,
            {"error": "give the key to look up: /state/word-counts?key=KEY"},
        )

        status, answer = await query(address, "split-words", "be")
        assert status == 404
        assert "operator 'split words' (uid 'split-words') has no keyed state" in answer["error"]


def _sum_amounts(a: tuple[str, int, int], b: tuple[str, int, int]) -> tuple[str, int, int]:
    return a[0], a[1] + b[1], max(a[2], b[2])


@pytest.mark.asyncio
async def test_a_window_operator_shows_each_open_window_of_the_key(tmp_path: Path) -> None:
    source = ControlledSource("purchases")

    def build(job: Any) -> None:
        (
            job.from_source(source, name="purchases")
            .assign_timestamps_and_watermarks(lambda record: record[2], "20s")
            .key_by(lambda record: record[0])
            .window(TumblingEventTimeWindows.of(10_000))
            .reduce(_sum_amounts, name="amount per window")
            .uid("windows")
            .sink_to(HeldSink(), name="totals")
        )

    master, job = await start_job_on_master(build, ExecutionConfig(), name="windowed")
    try:
        # Two windows of alice, both still open: 20 s of out-of-orderness hold the watermark back.
        source.push(("alice", 3, 1_000), ("alice", 4, 2_000), ("alice", 5, 12_000))
        checkpoint = await take_checkpoint(master)
        answer = query_state(checkpoint, "windows", "alice")
    finally:
        source.end()
        await job
    assert answer["state"] == {
        "window-contents": {
            "kind": "map",
            "value": [
                {"window": [0, 10_000], "value": ["alice", 7, 2_000]},
                {"window": [10_000, 20_000], "value": ["alice", 5, 12_000]},
            ],
        }
    }


def _keyed_snapshot(states: dict[str, tuple[str, list[Any], list[Any]]]) -> dict[str, Any]:
    """A keyed operator's snapshot as ``KeyedStateBackend.snapshot`` lays it out."""
    return {
        "keyed": {
            name: {
                "kind": kind,
                "key_types": sorted({type(k).__name__ for k in keys}),
                "keys": keys,
                "values": values,
            }
            for name, (kind, keys, values) in states.items()
        }
    }


def _cli_state(path: Path, uid: str, key: str) -> tuple[int, Any, str]:
    done = run_cli("state", str(path), "--uid", uid, "--key", key)
    answer = json.loads(done.stdout) if done.returncode == 0 else None
    return done.returncode, answer, done.stderr


def test_states_sharing_one_key_column_are_each_found_by_key(tmp_path: Path) -> None:
    """Two states written together are stored with one key column (format 2): a query finds
    the key in both."""
    backend = KeyedStateBackend(
        "totals", KeyGroupRange(0, DEFAULT_MAX_PARALLELISM - 1), DEFAULT_MAX_PARALLELISM
    )
    total = backend.get_state(ValueStateDescriptor("total"))
    count = backend.get_state(ValueStateDescriptor("count"))
    for user, amount in (("ann", 2.5), ("bob", 4.0), ("ann", 1.0)):
        backend.current_key = user
        total.update((total.value() or 0.0) + amount)
        count.update((count.value() or 0) + 1)
    keyed = backend.snapshot()
    assert "keys_of" in keyed["total"]  # the layout this test is about
    savepoint = write_savepoint(
        tmp_path / "savepoints", 3, {"totals": ("totals", {0: {"keyed": keyed}})}
    )
    answer = query_state(load_checkpoint(savepoint), "totals", "ann")
    assert answer["state"] == {
        "count": {"kind": "value", "value": 2},
        "total": {"kind": "value", "value": 3.5},
    }


def test_keys_are_read_as_the_key_type_the_state_records(tmp_path: Path) -> None:
    savepoint = write_savepoint(
        tmp_path / "savepoints",
        7,
        {
            "by-id": (
                "per id",
                {0: _keyed_snapshot({"seen": ("list", [42, 7], [["a", "b"], []])})},
            ),
            "by-pair": (
                "per pair",
                {0: _keyed_snapshot({"total": ("reducing", [("eu", 1)], [9.5])})},
            ),
            "tags": (
                "tags",
                {0: _keyed_snapshot({"tags": ("map", ["k"], [{"x": {1, 2}, 3: None}])})},
            ),
        },
    )
    checkpoint = load_checkpoint(savepoint)
    answer = query_state(checkpoint, "by-id", "42")
    assert (answer["key"], answer["key_type"]) == (42, "int")
    assert answer["state"] == {"seen": {"kind": "list", "value": ["a", "b"]}}
    assert (answer["checkpoint"]["kind"], answer["checkpoint"]["id"]) == ("savepoint", 7)

    answer = query_state(checkpoint, "by-pair", '["eu", 1]')
    assert (answer["key"], answer["key_type"]) == (["eu", 1], "tuple")
    assert answer["state"] == {"total": {"kind": "reducing", "value": 9.5}}

    answer = query_state(checkpoint, "tags", "k")
    assert answer["state"] == {"tags": {"kind": "map", "value": {"x": [1, 2], "3": None}}}

    with pytest.raises(StateQueryError) as mismatch:
        query_state(checkpoint, "by-id", "forty-two")
    assert mismatch.value.status == 400
    assert str(mismatch.value) == (
        "key 'forty-two' cannot be read as a key of operator 'per id' (uid 'by-id'), "
        "whose keys are int: give a key of that type (tuple keys as a JSON array)"
    )
    with pytest.raises(StateQueryError) as missing:
        query_state(checkpoint, "by-id", "43")
    assert missing.value.status == 404
    assert str(missing.value) == (
        "key '43' has no state in operator 'per id' (uid 'by-id') (int keys) at savepoint 7"
    )

    with pytest.raises(StateQueryError) as no_key:
        query_state(checkpoint, "by-pair", '["eu", {"a": 1}]')  # no tuple holds a dict
    assert no_key.value.status == 400
    assert "whose keys are tuple" in str(no_key.value)

    # On the command line: the error line and exit 2 for a key of the wrong type.
    code, _, stderr = _cli_state(savepoint, "by-id", "forty-two")
    assert (code, stderr) == (2, f"error: {mismatch.value}\n")


@pytest.mark.slow
@pytest.mark.asyncio
async def test_the_state_command_reads_a_checkpoint_dir_and_a_savepoint(tmp_path: Path) -> None:
    chk = tmp_path / "chk"
    async with word_count_with_endpoint(tmp_path) as (master, source, sink, address):
        await fed(source, sink, "to be or not to be")
        await take_checkpoint(master)
        await fed(source, sink, "be")
        savepoint = await master.coordinator.request_trigger(
            CheckpointKind.SAVEPOINT, str(tmp_path / "savepoints")
        )
        await fed(source, sink, "be")
        latest = await take_checkpoint(master)
        await fed(source, sink, "be")  # live: 5; neither the checkpoint nor the savepoint
        status, served = await query(address, "word-counts", "be")
        assert status == 200

        code, answer, stderr = await asyncio.to_thread(_cli_state, chk, "word-counts", "be")
        assert code == 0, stderr
        assert answer == served  # the endpoint's answer, from the same checkpoint
        assert answer["checkpoint"]["id"] == latest.checkpoint_id
        assert answer["state"] == {"reduce": {"kind": "value", "value": ["be", 4]}}

        assert savepoint.path is not None
        code, answer, stderr = await asyncio.to_thread(
            _cli_state, Path(savepoint.path), "word-counts", "be"
        )
        assert code == 0, stderr
        assert answer["checkpoint"] == {
            "id": savepoint.checkpoint_id,
            "kind": "savepoint",
            "timestamp_ms": savepoint.timestamp_ms,
            "path": savepoint.path,
        }
        assert answer["state"] == {"reduce": {"kind": "value", "value": ["be", 3]}}

    code, _, stderr = await asyncio.to_thread(_cli_state, tmp_path / "nothing", "word-counts", "be")
    assert code == 2
    assert stderr.startswith(f"error: {tmp_path / 'nothing'} does not exist")
    code, _, stderr = await asyncio.to_thread(_cli_state, chk, "counts", "be")
    assert code == 1
    assert "no operator with uid 'counts' in checkpoint" in stderr


def test_the_state_command_names_a_path_it_cannot_read(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("not a checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, message in [
        (
            not_a_folder,
            f"{not_a_folder} is not a folder: give a checkpoint directory or a checkpoint or "
            "savepoint folder",
        ),
        (empty, f"no valid checkpoint or savepoint in {empty} (it holds none)"),
    ]:
        with pytest.raises(StateQueryError) as refused:
            load_queried_checkpoint(path)
        assert (refused.value.status, str(refused.value)) == (400, message)


def test_the_state_command_reports_a_path_the_system_cannot_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    too_long = "x" * 5000  # the file system refuses the name (ENAMETOOLONG)
    assert main(["state", too_long, "--uid", "word-counts", "--key", "be"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot read the checkpoint at {too_long}: ")
    assert error.count("\n") == 1
