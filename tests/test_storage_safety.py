"""Checkpoint storage refuses what it cannot trust, says what it skipped, and cleans up after
itself: metadata of the wrong shape is damaged (with the field and what was expected), file names
in metadata never lead out of the checkpoint folder, sizes are checked before reading, ``--restore
DIR`` of several savepoints picks the newest valid one, and ``chk-N`` folders that never completed
are deleted while completed ones are left alone.
"""

from __future__ import annotations

import asyncio
import copy
import re
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_helpers import (
    ROOT,
    completed_checkpoint_ids,
    make_incomplete_checkpoint,
    max_completed,
    read_address,
    run_cli,
    start_cli,
    stop_process,
    stop_with_savepoint,
    take_savepoint,
    wait_for,
)
from etl_expectations import assert_exact_output

from state import KeyedStateBackend, KeyGroupRange, ValueStateDescriptor
from state.snapshot import OperatorSnapshot
from state.storage import (
    CheckpointKind,
    CheckpointStorage,
    CompletedCheckpoint,
    InvalidCheckpointError,
    OperatorCheckpoint,
    SnapshotMap,
    find_latest_valid,
    find_newest_snapshot,
    load_checkpoint,
    load_latest_valid,
    remove_incomplete_checkpoints,
)

EXAMPLE = ROOT / "examples" / "file_etl.py"

# --------------------------------------------------------------------------- valid checkpoints


def _operators() -> dict[str, OperatorCheckpoint]:
    totals = SnapshotMap()
    totals[0] = {"keyed": {"alice": 3}}
    totals[1] = {"keyed": {"bob": 5}}
    source = SnapshotMap()
    source[0] = {"splits": ["events.jsonl"], "offset": 120}
    return {
        "totals": OperatorCheckpoint("totals", "RunningTotals", 2, 128, totals),
        "source": OperatorCheckpoint("source", "FileSource", 1, 128, source, {0}),
    }


def write_checkpoint(
    directory: Path, checkpoint_id: int, kind: CheckpointKind = CheckpointKind.CHECKPOINT
) -> Path:
    """A real checkpoint (or savepoint, into ``directory``) written by the storage; its folder."""
    checkpoint = CompletedCheckpoint(checkpoint_id, kind, 1_700_000_000_000, _operators())
    storage = CheckpointStorage(directory, "safety")
    asyncio.run(storage.write(checkpoint, str(directory)))
    assert checkpoint.path is not None
    return Path(checkpoint.path)


@pytest.fixture
def chk(tmp_path: Path) -> Path:
    """A checkpoint directory with two valid checkpoints, chk-1 and chk-2."""
    directory = tmp_path / "chk"
    for checkpoint_id in (1, 2):
        write_checkpoint(directory, checkpoint_id)
    return directory


def metadata_of(folder: Path) -> Any:
    return orjson.loads((folder / "_metadata").read_bytes())


def rewrite_metadata(folder: Path, change: Callable[[Any], Any]) -> None:
    metadata = change(copy.deepcopy(metadata_of(folder)))
    (folder / "_metadata").write_bytes(orjson.dumps(metadata))


def test_a_checkpoint_of_format_1_restores_its_keyed_states(tmp_path: Path) -> None:
    """Format 1 wrote every keyed state with its own key column; this code writes format 2 (a
    state may name another's key column) and still restores format 1."""
    own_keys = {
        "count": {"kind": "value", "key_types": ["str"], "keys": ["a", "b"], "values": [1, 2]},
        "total": {"kind": "value", "key_types": ["str"], "keys": ["a", "b"], "values": [0.5, 7.0]},
    }
    states = SnapshotMap()
    states[0] = OperatorSnapshot(keyed=own_keys).to_data()
    operators = {"totals": OperatorCheckpoint("totals", "Totals", 1, 128, states)}
    checkpoint = CompletedCheckpoint(1, CheckpointKind.CHECKPOINT, 1_700_000_000_000, operators)
    asyncio.run(CheckpointStorage(tmp_path, "format-1").write(checkpoint, None))
    assert checkpoint.path is not None
    folder = Path(checkpoint.path)
    assert metadata_of(folder)["format"] == 2
    rewrite_metadata(folder, _set("format", value=1))

    loaded = load_checkpoint(folder)
    backend = KeyedStateBackend("restored", KeyGroupRange(0, 127), 128)
    backend.restore(
        [
            snapshot.keyed or {}
            for _, snapshot in loaded.operators["totals"].subtask_states.snapshots()
        ]
    )
    count, total = (backend.get_state(ValueStateDescriptor(name)) for name in ("count", "total"))
    values = {}
    for key in ("a", "b"):
        backend.current_key = key
        values[key] = (count.value(), total.value())
    assert values == {"a": (1, 0.5), "b": (2, 7.0)}


# --------------------------------------------------------------------------- item 11: shapes


def _set(*path: Any, value: Any) -> Callable[[Any], Any]:
    def change(metadata: Any) -> Any:
        target = metadata
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return metadata

    return change


def _delete(*path: Any) -> Callable[[Any], Any]:
    def change(metadata: Any) -> Any:
        target = metadata
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return metadata

    return change


def _rename_subtask(new_key: str) -> Callable[[Any], Any]:
    def change(metadata: Any) -> Any:
        subtasks = metadata["operators"]["totals"]["subtasks"]
        subtasks[new_key] = subtasks.pop("0")
        return metadata

    return change


TOTALS = ("operators", "totals")
SUBTASK_0 = (*TOTALS, "subtasks", "0")

BAD_SHAPES: list[tuple[str, Callable[[Any], Any], str]] = [
    ("only-format", lambda _: {"format": 1}, "checkpoint_id: expected a value"),
    ("a-list", lambda _: [], "the metadata: expected an object"),
    ("a-string", lambda _: "chk", "the metadata: expected an object"),
    ("format-3", _set("format", value=3), "format: expected format version 1 or 2"),
    ("operators-null", _set("operators", value=None), "operators: expected an object"),
    ("operators-list", _set("operators", value=[]), "operators: expected an object"),
    ("unknown-kind", _set("kind", value="snapshot"), "kind: expected 'checkpoint' or 'savepoint'"),
    ("id-string", _set("checkpoint_id", value="2"), "checkpoint_id: expected an integer >= 0"),
    ("id-bool", _set("checkpoint_id", value=True), "checkpoint_id: expected an integer >= 0"),
    ("id-negative", _set("checkpoint_id", value=-2), "checkpoint_id: expected an integer >= 0"),
    ("timestamp-float", _set("timestamp_ms", value=1.5), "timestamp_ms: expected an integer"),
    ("timestamp-huge", _set("timestamp_ms", value=10**18), "timestamp_ms: expected an integer"),
    ("job-number", _set("job", value=7), "job: expected a string"),
    ("state-size-string", _set("state_size", value="9"), "state_size: expected an integer"),
    ("operator-null", _set(*TOTALS, value=None), "operators['totals']: expected an object"),
    ("name-missing", _delete(*TOTALS, "name"), "operators['totals'].name: expected a value"),
    (
        "parallelism-zero",
        _set(*TOTALS, "parallelism", value=0),
        "operators['totals'].parallelism: expected an integer >= 1",
    ),
    (
        "max-parallelism-string",
        _set(*TOTALS, "max_parallelism", value="128"),
        "operators['totals'].max_parallelism: expected an integer >= 1",
    ),
    (
        "finished-null",
        _set(*TOTALS, "finished_subtasks", value=None),
        "operators['totals'].finished_subtasks: expected a list of subtask indexes",
    ),
    (
        "finished-strings",
        _set(*TOTALS, "finished_subtasks", value=["0"]),
        "operators['totals'].finished_subtasks[0]: expected an integer >= 0",
    ),
    (
        "finished-out-of-range",
        _set(*TOTALS, "finished_subtasks", value=[2]),
        "operators['totals'].finished_subtasks[0]: expected an integer >= 0 and <= 1",
    ),
    (
        "subtasks-list",
        _set(*TOTALS, "subtasks", value=[]),
        "operators['totals'].subtasks: expected an object",
    ),
    (
        "subtask-key-not-int",
        _rename_subtask("first"),
        "operators['totals'].subtasks: expected subtask indexes 0..1 as keys, got 'first'",
    ),
    (
        "subtask-key-out-of-range",
        _rename_subtask("5"),
        "operators['totals'].subtasks: expected subtask indexes 0..1 as keys, got '5'",
    ),
    (
        "subtask-null",
        _set(*SUBTASK_0, value=None),
        "operators['totals'].subtasks['0']: expected an object",
    ),
    (
        "file-number",
        _set(*SUBTASK_0, "file", value=5),
        "operators['totals'].subtasks['0'].file: expected a string",
    ),
    (
        "size-string",
        _set(*SUBTASK_0, "size", value="12"),
        "operators['totals'].subtasks['0'].size: expected an integer >= 0",
    ),
    (
        "size-negative",
        _set(*SUBTASK_0, "size", value=-1),
        "operators['totals'].subtasks['0'].size: expected an integer >= 0",
    ),
    (
        "sha256-number",
        _set(*SUBTASK_0, "sha256", value=123),
        "operators['totals'].subtasks['0'].sha256: expected 64 lowercase hex digits",
    ),
    (
        "sha256-short",
        _set(*SUBTASK_0, "sha256", value="abc"),
        "operators['totals'].subtasks['0'].sha256: expected 64 lowercase hex digits",
    ),
]


@pytest.mark.parametrize(
    ("change", "reason"),
    [pytest.param(change, reason, id=case) for case, change, reason in BAD_SHAPES],
)
def test_metadata_of_the_wrong_shape_is_damaged_and_skipped_with_the_reason(
    chk: Path, change: Callable[[Any], Any], reason: str
) -> None:
    latest = chk / "chk-2"
    rewrite_metadata(latest, change)

    with pytest.raises(InvalidCheckpointError) as raised:
        load_checkpoint(latest)
    assert f"{latest / '_metadata'}: damaged metadata (" in str(raised.value)
    assert reason in str(raised.value)

    search = find_latest_valid(chk)
    assert search.checkpoint is not None and search.checkpoint.checkpoint_id == 1
    assert [(s.folder, s.completed) for s in search.skipped] == [(latest, True)]
    assert reason in search.skipped[0].reason
    restored = load_latest_valid(chk)
    assert restored is not None and restored.checkpoint_id == 1


def test_cli_checkpoints_lists_every_bad_shape_as_invalid_with_the_reason(chk: Path) -> None:
    folders = {}
    for number, (case, change, reason) in enumerate(BAD_SHAPES, start=10):
        folder = chk / f"chk-{number}"
        shutil.copytree(chk / "chk-2", folder)
        rewrite_metadata(folder, change)
        folders[case] = (folder, reason)

    result = run_cli("checkpoints", str(chk))

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = {line.partition(": ")[0]: line for line in result.stdout.splitlines()}
    for case, (folder, reason) in folders.items():
        line = lines.get(str(folder), "")
        assert line.startswith(f"{folder}: INVALID ("), (case, result.stdout)
        assert reason in line, (case, line)
    for valid in ("chk-1", "chk-2"):
        assert "valid; operators: " in lines[str(chk / valid)], result.stdout


# --------------------------------------------------------------------------- item 14: paths, sizes


def _point_subtask_0_at(folder: Path, file_name: str) -> None:
    """Record ``file_name`` for subtask 0 of "totals", keeping the recorded size and checksum (a
    file with exactly that content is put where the name leads)."""
    original = folder / metadata_of(folder)["operators"]["totals"]["subtasks"]["0"]["file"]
    target = Path(file_name) if Path(file_name).is_absolute() else folder / file_name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(original, target)
    rewrite_metadata(folder, _set(*SUBTASK_0, "file", value=file_name))


@pytest.mark.parametrize(
    "file_name",
    [
        pytest.param("ABSOLUTE", id="absolute-path-outside"),
        pytest.param("../outside.state", id="dot-dot"),
        pytest.param("nested/totals-0.state", id="separator"),
        pytest.param("..", id="parent-itself"),
    ],
)
def test_a_state_file_named_by_a_path_makes_the_checkpoint_invalid(
    chk: Path, tmp_path: Path, file_name: str
) -> None:
    latest = chk / "chk-2"
    if file_name == "ABSOLUTE":
        file_name = str(tmp_path / "elsewhere" / "outside.state")
    if file_name != "..":
        _point_subtask_0_at(latest, file_name)
    else:
        rewrite_metadata(latest, _set(*SUBTASK_0, "file", value=file_name))

    with pytest.raises(InvalidCheckpointError) as raised:
        load_checkpoint(latest)
    message = str(raised.value)
    assert "damaged metadata" in message
    assert "operators['totals'].subtasks['0'].file: expected a plain file name" in message
    assert repr(file_name) in message
    restored = load_latest_valid(chk)
    assert restored is not None and restored.checkpoint_id == 1


def test_a_state_file_that_is_a_symlink_out_of_the_folder_makes_the_checkpoint_invalid(
    chk: Path, tmp_path: Path
) -> None:
    latest = chk / "chk-2"
    name = metadata_of(latest)["operators"]["totals"]["subtasks"]["0"]["file"]
    outside = tmp_path / "outside.state"
    shutil.move(latest / name, outside)
    (latest / name).symlink_to(outside)

    expected = f"{name} of operator 'totals' resolves outside the folder"
    with pytest.raises(InvalidCheckpointError, match=re.escape(expected)):
        load_checkpoint(latest)


def test_a_state_file_larger_than_recorded_is_refused_without_reading_it(chk: Path) -> None:
    latest = chk / "chk-2"
    info = metadata_of(latest)["operators"]["totals"]["subtasks"]["0"]
    huge = 64 * 1024 * 1024
    with open(latest / info["file"], "r+b") as f:
        f.truncate(huge)  # sparse: no disk used, but reading it whole would take 64 MiB

    tracemalloc.start()
    try:
        with pytest.raises(InvalidCheckpointError) as raised:
            load_checkpoint(latest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"{info['file']} of operator 'totals' is damaged" in str(raised.value)
    assert f"{huge} bytes, expected {info['size']}" in str(raised.value)
    assert peak < huge // 8, f"{peak} bytes allocated: the file was read"


# --------------------------------------------------------------------------- item 13: garbage


def test_remove_incomplete_checkpoints_deletes_only_older_incomplete_chk_folders(
    chk: Path,
) -> None:
    incomplete = [make_incomplete_checkpoint(chk, i) for i in (3, 4, 5, 7)]
    damaged = chk / "chk-6"
    shutil.copytree(chk / "chk-2", damaged)
    rewrite_metadata(damaged, lambda _: [])
    others = [chk / "chk-x", chk / "savepoint-3-20260101-000000", chk / "chk-3.old"]
    for folder in others:
        folder.mkdir()
        (folder / "part.state").write_bytes(b"kept")

    removed = remove_incomplete_checkpoints(chk, below_id=7, keep={4})

    assert removed == [incomplete[0], incomplete[2]]
    assert not incomplete[0].exists() and not incomplete[2].exists()
    assert incomplete[1].exists()  # still being taken
    assert incomplete[3].exists()  # not older than the checkpoint that completed
    assert completed_checkpoint_ids(chk) == [1, 2, 6]
    assert metadata_of(damaged) == []
    assert all((folder / "part.state").read_bytes() == b"kept" for folder in others)


# --------------------------------------------------------------------------- item 6: --restore DIR


@pytest.fixture(scope="module")
def savepoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """file_etl.py throttled: a savepoint while it runs, then stopped with a second savepoint, both
    into one directory (as ``stop --dir`` writes them)."""
    base = tmp_path_factory.mktemp("savepoints")
    out, chk, sp = base / "out", base / "chk", base / "sp"
    stderr = base / "job.stderr"
    proc = start_cli(
        stderr,
        *_etl_args(out, chk, "--set", "rate=1000", "--checkpoint-interval", "100ms"),
        *("--rest-port", "0", "--savepoint-dir", str(sp)),
    )
    try:
        address = wait_for(lambda: read_address(chk), "the rest-address file", proc, stderr)
        wait_for(lambda: max_completed(chk) >= 2, "two checkpoints", proc, stderr)
        first_id, first = take_savepoint(address, sp)
        wait_for(lambda: max_completed(chk) > first_id, "a checkpoint after it", proc, stderr)
        stopped = stop_with_savepoint(address, sp)
        assert proc.wait(timeout=60) == 0, stderr.read_text()
    finally:
        stop_process(proc)
    return {"out": out, "sp": sp, "first": first, "stop": stopped}


def _etl_args(out: Path, chk: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(EXAMPLE),
        *("--set", f"output={out}", "--checkpoint-dir", str(chk), "--no-progress"),
        *extra,
    ]


@pytest.mark.slow
def test_restore_a_directory_of_savepoints_restores_the_newest_and_says_which(
    savepoints: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(savepoints["out"], out)
    stop = savepoints["stop"]
    stop_id = load_checkpoint(stop).checkpoint_id

    result = run_cli(
        *_etl_args(out, tmp_path / "chk", "--restore", str(savepoints["sp"]), "--rest-port", "-1")
    )

    assert result.returncode == 0, result.stderr
    assert f"restoring the newest valid snapshot in it, {stop.name}" in result.stderr
    assert f"restoring savepoint {stop_id} from {stop}" in result.stderr
    assert_exact_output(out)


@pytest.mark.slow
def test_a_directory_of_savepoints_whose_newest_is_damaged_gives_the_older_one(
    savepoints: dict[str, Path], tmp_path: Path
) -> None:
    sp = tmp_path / "sp"
    shutil.copytree(savepoints["sp"], sp)
    stop, first = sp / savepoints["stop"].name, sp / savepoints["first"].name
    rewrite_metadata(stop, _set("operators", value=None))

    search = find_newest_snapshot(sp)

    assert search.checkpoint is not None and search.checkpoint.path == str(first)
    assert [s.folder for s in search.skipped] == [stop]
    assert "operators: expected an object" in search.skipped[0].reason


@pytest.mark.slow
def test_restore_a_directory_of_savepoints_none_valid_is_an_error_naming_each(
    savepoints: dict[str, Path], tmp_path: Path
) -> None:
    sp = tmp_path / "sp"
    shutil.copytree(savepoints["sp"], sp)
    stop, first = sp / savepoints["stop"].name, sp / savepoints["first"].name
    rewrite_metadata(stop, _set("kind", value="snapshot"))
    (first / "_metadata").unlink()

    result = run_cli(*_etl_args(tmp_path / "out", tmp_path / "chk", "--restore", str(sp)))

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: --restore {sp}: none of its 2 snapshot folders is valid:" in result.stderr
    assert f"{first.name}: {first}: no _metadata file" in result.stderr
    assert f"{stop.name}: {stop / '_metadata'}: damaged metadata (kind: expected" in result.stderr
    assert not (tmp_path / "out").exists()
