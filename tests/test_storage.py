"""Checkpoint storage: damaged checkpoints are skipped for an older valid one, ``_metadata`` is
written atomically and last, savepoint folders can be moved, unencodable state fails naming the
state, and snapshots are never unpickled.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import logging
import os
import pickle
import re
import shutil
import types
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import orjson
import pytest
from cli_helpers import completed_checkpoint_ids, make_incomplete_checkpoint, run_cli
from etl_expectations import assert_exact_output

from connectors import CollectionSource
from runtime import (
    ExecutionConfig,
    JobFailedError,
    KeyedProcessFunction,
    MapFunction,
    RuntimeContext,
    run_job_async,
)
from runtime import testing as rt_testing
from state import StateSerializer, ValueStateDescriptor
from state.storage import (
    CheckpointKind,
    CheckpointStorage,
    CompletedCheckpoint,
    InvalidCheckpointError,
    load_checkpoint,
    load_latest_valid,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "file_etl.py"


def etl_args(out: Path, chk: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(EXAMPLE),
        "--set",
        f"output={out}",
        "--checkpoint-dir",
        str(chk),
        "--no-progress",
        "--rest-port",
        "-1",
        *extra,
    ]




def last_two(chk: Path) -> tuple[int, int]:
    ids = completed_checkpoint_ids(chk)
    assert len(ids) >= 2, ids
    return ids[-2], ids[-1]


@pytest.fixture(scope="module")
def etl_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished run of file_etl.py that retained its last two checkpoints."""
    base = tmp_path_factory.mktemp("etl")
    out, chk = base / "out", base / "chk"
    result = run_cli(
        *etl_args(
            out,
            chk,
            "-p",
            "2",
            "--set",
            "rate=2000",
            "--checkpoint-interval",
            "100ms",
            "--retained-checkpoints",
            "2",
        )
    )
    assert result.returncode == 0, result.stderr
    return out, chk


@pytest.fixture
def etl_copy(etl_run: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the run's output and checkpoint directories (tests damage them)."""
    out, chk = tmp_path / "out", tmp_path / "chk"
    shutil.copytree(etl_run[0], out)
    shutil.copytree(etl_run[1], chk)
    return out, chk


def test_the_run_left_valid_checkpoints(etl_run: tuple[Path, Path]) -> None:
    _, chk = etl_run
    for checkpoint_id in last_two(chk):
        assert load_checkpoint(chk / f"chk-{checkpoint_id}").checkpoint_id == checkpoint_id


# --------------------------------------------------------------------------- fallback


def _truncate_a_state_file(folder: Path) -> Path:
    state_files = sorted(p for p in folder.iterdir() if p.name != "_metadata" and p.stat().st_size)
    assert state_files, f"{folder} has no state files"
    victim = state_files[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return victim


def test_truncated_state_file_makes_load_latest_valid_fall_back(
    etl_copy: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, chk = etl_copy
    older, latest = last_two(chk)
    victim = _truncate_a_state_file(chk / f"chk-{latest}")

    with pytest.raises(InvalidCheckpointError, match=re.escape(victim.name)):
        load_checkpoint(chk / f"chk-{latest}")
    with caplog.at_level(logging.WARNING, logger="state.storage"):
        restored = load_latest_valid(chk)
    assert restored is not None
    assert restored.checkpoint_id == older
    assert any(f"chk-{latest}" in r.getMessage() for r in caplog.records), caplog.text


def test_missing_metadata_makes_load_latest_valid_fall_back(
    etl_copy: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, chk = etl_copy
    older, latest = last_two(chk)
    (chk / f"chk-{latest}" / "_metadata").unlink()
    with pytest.raises(InvalidCheckpointError, match="_metadata"):
        load_checkpoint(chk / f"chk-{latest}")
    with caplog.at_level(logging.WARNING, logger="state.storage"):
        restored = load_latest_valid(chk)
    assert restored is not None and restored.checkpoint_id == older
    assert any(f"chk-{latest}" in r.getMessage() for r in caplog.records), caplog.text


def test_damaged_metadata_makes_load_latest_valid_fall_back(etl_copy: tuple[Path, Path]) -> None:
    _, chk = etl_copy
    older, latest = last_two(chk)
    metadata = chk / f"chk-{latest}" / "_metadata"
    metadata.write_bytes(metadata.read_bytes()[:40])
    with pytest.raises(InvalidCheckpointError):
        load_checkpoint(chk / f"chk-{latest}")
    restored = load_latest_valid(chk)
    assert restored is not None and restored.checkpoint_id == older


def test_no_valid_checkpoint_at_all_gives_none(etl_copy: tuple[Path, Path]) -> None:
    _, chk = etl_copy
    for checkpoint_id in completed_checkpoint_ids(chk):
        (chk / f"chk-{checkpoint_id}" / "_metadata").unlink()
    assert load_latest_valid(chk) is None


@pytest.mark.slow
def test_cli_restore_latest_falls_back_and_says_so(etl_copy: tuple[Path, Path]) -> None:
    out, chk = etl_copy
    older, latest = last_two(chk)
    _truncate_a_state_file(chk / f"chk-{latest}")
    result = run_cli(*etl_args(out, chk, "-p", "2", "--restore", "latest"))
    assert result.returncode == 0, result.stderr
    assert f"chk-{latest}" in result.stderr  # the damaged one is named
    assert "damaged" in result.stderr
    assert f"restoring checkpoint {older} from {chk / f'chk-{older}'}" in result.stderr


@pytest.mark.slow
def test_cli_restore_latest_skips_a_checkpoint_without_metadata(
    etl_copy: tuple[Path, Path],
) -> None:
    out, chk = etl_copy
    older, latest = last_two(chk)
    (chk / f"chk-{latest}" / "_metadata").unlink()
    result = run_cli(*etl_args(out, chk, "--restore", "latest", "-p", "2"))
    assert result.returncode == 0, result.stderr
    assert f"chk-{latest}" in result.stderr
    assert f"restoring checkpoint {older} from " in result.stderr


def test_restore_of_an_explicitly_named_damaged_checkpoint_is_a_usage_error(
    etl_copy: tuple[Path, Path],
) -> None:
    out, chk = etl_copy
    _, latest = last_two(chk)
    victim = _truncate_a_state_file(chk / f"chk-{latest}")
    result = run_cli(*etl_args(out, chk, "--restore", str(chk / f"chk-{latest}")))
    assert result.returncode == 2, result.stderr
    assert victim.name in result.stderr


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def _set_operators_to_null(folder: Path) -> None:
    metadata = folder / "_metadata"
    metadata.write_bytes(orjson.dumps({**orjson.loads(metadata.read_bytes()), "operators": None}))


def test_restore_latest_with_a_mistyped_checkpoint_dir_warns_and_starts_fresh(
    tmp_path: Path,
) -> None:
    out, typo = tmp_path / "out", tmp_path / "chk-typo"
    result = run_cli(*etl_args(out, typo, "--restore", "latest", "--set", "rate=0"))
    assert result.returncode == 0, result.stderr
    assert _warnings(result.stderr) == [
        f"warning: --restore latest: no valid checkpoint in {typo} (the directory does not "
        "exist; check --checkpoint-dir): starting from the beginning"
    ]
    assert_exact_output(out)


@pytest.mark.slow
def test_restore_latest_with_no_valid_checkpoint_names_each_skipped_one_and_why(
    etl_copy: tuple[Path, Path], tmp_path: Path
) -> None:
    _, chk = etl_copy
    older, latest = last_two(chk)
    victim = _truncate_a_state_file(chk / f"chk-{older}")
    _set_operators_to_null(chk / f"chk-{latest}")
    make_incomplete_checkpoint(chk, latest + 1)
    out = tmp_path / "fresh-out"
    result = run_cli(*etl_args(out, chk, "-p", "2", "--restore", "latest", "--set", "rate=0"))
    assert result.returncode == 0, result.stderr
    headline, *skipped = _warnings(result.stderr)
    assert headline == (
        f"warning: --restore latest: no valid checkpoint in {chk} (the directory exists; none of "
        "its 3 chk-* folders is valid): starting from the beginning"
    )
    assert len(skipped) == 3, result.stderr
    assert skipped[0].startswith(f"warning:   skipped incomplete chk-{latest + 1}: ")
    assert "no _metadata file" in skipped[0]
    assert skipped[1].startswith(f"warning:   skipped damaged chk-{latest}: ")
    assert "damaged metadata (operators: expected an object, got None)" in skipped[1]
    assert skipped[2].startswith(f"warning:   skipped damaged chk-{older}: ")
    assert f"state file {victim.name} of operator" in skipped[2]
    assert_exact_output(out)


@pytest.mark.slow
def test_cli_restore_latest_falls_back_past_metadata_of_the_wrong_shape(
    etl_copy: tuple[Path, Path],
) -> None:
    out, chk = etl_copy
    older, latest = last_two(chk)
    _set_operators_to_null(chk / f"chk-{latest}")
    result = run_cli(*etl_args(out, chk, "-p", "2", "--restore", "latest"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    headline, skipped = _warnings(result.stderr)
    assert headline == (
        f"warning: --restore latest: 1 newer checkpoint folder(s) in {chk} are not valid; "
        f"falling back to checkpoint {older}"
    )
    assert skipped.startswith(f"warning:   skipped damaged chk-{latest}: ")
    assert "damaged metadata (operators: expected an object, got None)" in skipped
    assert f"restoring checkpoint {older} from {chk / f'chk-{older}'}" in result.stderr


def test_restore_of_a_path_that_does_not_exist_is_a_one_line_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "savepoint-typo"
    result = run_cli(*etl_args(tmp_path / "out", tmp_path / "chk", "--restore", str(missing)))
    assert result.returncode == 2, result.stderr
    assert [line for line in result.stderr.splitlines() if str(missing) in line] == [
        f"error: --restore {missing}: no such checkpoint or savepoint folder"
    ]
    assert "Traceback" not in result.stderr


def _deleted_incomplete(lines: list[str]) -> dict[str, int]:
    """Folder → index of the log line that says it was deleted as an incomplete checkpoint."""
    deleted = {}
    for index, line in enumerate(lines):
        match = re.search(r"deleted (\S+): checkpoint \d+ never completed", line)
        if match:
            deleted[match.group(1)] = index
    return deleted


def _seed_garbage_and_evidence(chk: Path, latest: int) -> tuple[list[Path], list[Path]]:
    """Incomplete checkpoints above ``latest`` (garbage), and folders no cleanup may touch: a
    damaged completed checkpoint, a savepoint without metadata, a folder not named chk-<int>."""
    garbage = [make_incomplete_checkpoint(chk, latest + i) for i in (1, 2)]
    damaged = chk / f"chk-{latest + 3}"
    shutil.copytree(chk / f"chk-{latest}", damaged)
    (damaged / "_metadata").write_bytes(b'{"format": 1')
    others = [chk / "savepoints" / "savepoint-1-20260101-000000", chk / "chk-notes"]
    for folder in others:
        folder.mkdir(parents=True)
        (folder / "part.state").write_bytes(b"kept")
    return garbage, [damaged, *others]


def _contents(folders: list[Path]) -> dict[Path, bytes]:
    return {p: p.read_bytes() for folder in folders for p in folder.iterdir()}


@pytest.mark.slow
def test_incomplete_checkpoint_folders_older_than_the_restored_one_are_deleted_at_restore(
    etl_copy: tuple[Path, Path],
) -> None:
    out, chk = etl_copy
    older, latest = last_two(chk)
    assert older > 1
    below = make_incomplete_checkpoint(chk, 1)
    above, untouchable = _seed_garbage_and_evidence(chk, latest)
    before = _contents([chk / f"chk-{older}", *untouchable])  # chk-{latest} is retention's

    result = run_cli(*etl_args(out, chk, "-p", "2", "--restore", "latest", "--log-level", "INFO"))

    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    restoring = next(i for i, line in enumerate(lines) if line.startswith("restoring checkpoint"))
    assert lines[restoring].startswith(f"restoring checkpoint {latest} from ")
    deleted = _deleted_incomplete(lines)
    assert deleted[str(below)] < restoring, result.stderr
    assert not below.exists()
    assert all(folder.exists() for folder in above)  # newer: left for the next checkpoint
    assert _contents([chk / f"chk-{older}", *untouchable]) == before


@pytest.mark.slow
def test_incomplete_checkpoint_folders_are_deleted_at_the_next_checkpoint(
    etl_copy: tuple[Path, Path], tmp_path: Path
) -> None:
    _, chk = etl_copy
    older, latest = last_two(chk)
    garbage, untouchable = _seed_garbage_and_evidence(chk, latest)
    before = _contents([chk / f"chk-{older}", chk / f"chk-{latest}", *untouchable])

    out = tmp_path / "fresh-out"
    result = run_cli(
        *etl_args(out, chk, "-p", "2", "--set", "rate=2000", "--log-level", "INFO"),
        *("--checkpoint-interval", "100ms"),
    )

    assert result.returncode == 0, result.stderr
    deleted = _deleted_incomplete(result.stderr.splitlines())
    assert all(str(folder) in deleted for folder in garbage), result.stderr
    assert not any(folder.exists() for folder in garbage)
    assert _contents([chk / f"chk-{older}", chk / f"chk-{latest}", *untouchable]) == before
    assert_exact_output(out)


# --------------------------------------------------------------------------- atomic metadata


def _copy_of(
    checkpoint: CompletedCheckpoint, kind: CheckpointKind, new_id: int
) -> CompletedCheckpoint:
    return CompletedCheckpoint(new_id, kind, checkpoint.timestamp_ms, checkpoint.operators)


def _is_write_mode(mode: Any) -> bool:
    if isinstance(mode, int):
        return bool(mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    return any(c in str(mode) for c in "wax+")


@pytest.mark.asyncio
async def test_metadata_is_written_last_and_atomically(
    etl_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, source_chk = etl_run
    checkpoint = load_checkpoint(source_chk / f"chk-{completed_checkpoint_ids(source_chk)[-1]}")
    target = tmp_path / "chk"
    events: list[tuple[str, str, str]] = []
    """("write", path, "") for every file opened for writing, ("rename", src, dst)."""

    fd_paths: dict[int, str] = {}

    def spy_opener(real: Any) -> Any:
        def spy(file: Any, mode: Any = "r", *args: Any, **kw: Any) -> Any:
            if not isinstance(file, int) and _is_write_mode(mode):
                events.append(("write", str(file), ""))
            result = real(file, mode, *args, **kw)
            if isinstance(result, int):
                fd_paths[result] = str(file)
            elif hasattr(result, "fileno"):
                fd_paths[result.fileno()] = str(file)
            return result

        return spy

    real_fsync = os.fsync

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", fd_paths.get(fd, "?"), ""))
        real_fsync(fd)

    def spy_renamer(real: Any, is_async: bool) -> Any:
        if is_async:

            async def spy_async(src: Any, dst: Any, *args: Any, **kw: Any) -> Any:
                events.append(("rename", str(src), str(dst)))
                return await real(src, dst, *args, **kw)

            return spy_async

        def spy(src: Any, dst: Any, *args: Any, **kw: Any) -> Any:
            events.append(("rename", str(src), str(dst)))
            return real(src, dst, *args, **kw)

        return spy

    import builtins

    monkeypatch.setattr(builtins, "open", spy_opener(builtins.open))
    monkeypatch.setattr(os, "open", spy_opener(os.open))
    monkeypatch.setattr(aiofiles, "open", spy_opener(aiofiles.open))
    monkeypatch.setattr(os, "fsync", spy_fsync)
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, spy_renamer(getattr(os, name), False))
        monkeypatch.setattr(aiofiles.os, name, spy_renamer(getattr(aiofiles.os, name), True))
    written = _copy_of(checkpoint, CheckpointKind.CHECKPOINT, 7)
    try:
        await CheckpointStorage(target, "file_etl").write(written)
    finally:
        monkeypatch.undo()

    folder = target / "chk-7"
    assert written.path is not None and Path(written.path) == folder
    ours = [e for e in events if str(folder) in e[1] or str(folder) in e[2]]
    # _metadata is never opened for writing: it only appears by renaming a complete temp file.
    assert not any(kind == "write" and Path(a).name == "_metadata" for kind, a, _ in ours), ours
    into_metadata = [e for e in ours if e[0] == "rename" and Path(e[2]).name == "_metadata"]
    assert len(into_metadata) == 1, ours
    temp = Path(into_metadata[0][1])
    assert temp.parent == folder
    assert not temp.exists()  # noqa: ASYNC240 (the write is over)
    # Every state file was written before the rename that publishes the checkpoint.
    rename_index = ours.index(into_metadata[0])
    state_writes = [
        i for i, (kind, a, _) in enumerate(ours) if kind == "write" and a.endswith(".state")
    ]
    assert state_writes and max(state_writes) < rename_index, ours
    # The folder is fsynced after the rename, so the rename itself is durable.
    assert ("fsync", str(folder), "") in ours[rename_index:], ours
    # Nothing but the state files and _metadata is left.
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []
    loaded = load_checkpoint(folder)
    assert loaded.checkpoint_id == 7
    assert set(loaded.operators) == set(checkpoint.operators)


@pytest.mark.asyncio
async def test_failure_before_the_metadata_rename_leaves_no_metadata(
    etl_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, source_chk = etl_run
    checkpoint = load_checkpoint(source_chk / f"chk-{completed_checkpoint_ids(source_chk)[-1]}")
    target = tmp_path / "chk"
    storage = CheckpointStorage(target, "file_etl")
    await storage.write(_copy_of(checkpoint, CheckpointKind.CHECKPOINT, 1))

    def crash(*args: Any, **kw: Any) -> None:
        raise OSError("simulated crash before the rename")

    async def async_crash(*args: Any, **kw: Any) -> None:
        crash()

    monkeypatch.setattr(aiofiles.os, "replace", async_crash)
    monkeypatch.setattr(aiofiles.os, "rename", async_crash)
    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        await storage.write(_copy_of(checkpoint, CheckpointKind.CHECKPOINT, 2))
    monkeypatch.undo()

    folder = target / "chk-2"
    assert folder.is_dir()  # state files were written...
    assert not (folder / "_metadata").exists()  # ...but it never became a checkpoint
    with pytest.raises(InvalidCheckpointError):
        load_checkpoint(folder)
    latest = load_latest_valid(target)
    assert latest is not None and latest.checkpoint_id == 1


# --------------------------------------------------------------------------- savepoints moved


@pytest.mark.asyncio
async def test_moved_savepoint_folder_still_loads(
    etl_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, source_chk = etl_run
    checkpoint = load_checkpoint(source_chk / f"chk-{completed_checkpoint_ids(source_chk)[-1]}")
    savepoint = _copy_of(checkpoint, CheckpointKind.SAVEPOINT, 42)
    await CheckpointStorage(None, "file_etl").write(savepoint, str(tmp_path / "first"))
    assert savepoint.path is not None
    original = Path(savepoint.path)
    assert original.parent == tmp_path / "first"
    assert str(tmp_path) not in (original / "_metadata").read_text()  # only relative paths

    moved = tmp_path / "elsewhere" / "deeper" / original.name
    moved.parent.mkdir(parents=True)
    shutil.move(str(original), str(moved))
    loaded = load_checkpoint(moved)
    assert loaded.kind is CheckpointKind.SAVEPOINT
    assert loaded.checkpoint_id == 42
    assert Path(loaded.path or "") == moved
    assert set(loaded.operators) == set(checkpoint.operators)
    for uid, entry in checkpoint.operators.items():
        assert sorted(loaded.operators[uid].subtask_states) == sorted(entry.subtask_states)
        for subtask in entry.subtask_states:
            assert loaded.operators[uid].subtask_states[subtask] == entry.subtask_states[subtask]

    listing = run_cli("checkpoints", str(tmp_path / "elsewhere"))
    assert listing.returncode == 0, listing.stderr
    assert "savepoint 42" in listing.stdout
    assert "valid" in listing.stdout and "INVALID" not in listing.stdout


@pytest.mark.slow
def test_cli_restores_a_moved_savepoint(etl_copy: tuple[Path, Path], tmp_path: Path) -> None:
    out, chk = etl_copy
    checkpoint = load_checkpoint(chk / f"chk-{completed_checkpoint_ids(chk)[-1]}")
    savepoint = _copy_of(checkpoint, CheckpointKind.SAVEPOINT, 99)
    asyncio.run(CheckpointStorage(None, "file_etl").write(savepoint, str(tmp_path / "sp")))
    moved = tmp_path / "moved" / Path(savepoint.path or "").name
    moved.parent.mkdir()
    shutil.move(str(savepoint.path), str(moved))
    result = run_cli(*etl_args(out, tmp_path / "chk2", "--restore", str(moved), "-p", "3"))
    assert result.returncode == 0, result.stderr
    assert f"restoring savepoint 99 from {moved}" in result.stderr


# --------------------------------------------------------------------------- encodability


class HoldsASet(KeyedProcessFunction[str, str, str]):
    def __init__(self, serializer: StateSerializer | None = None) -> None:
        self.serializer = serializer

    def open(self, ctx: RuntimeContext) -> None:
        self.state = ctx.get_state(ValueStateDescriptor("bad-state", serializer=self.serializer))

    def process_element(self, value: str, ctx: Any, out: Any) -> None:
        current = set(self.state.value() or set())
        current.add(value)
        self.state.update(current)  # stored as a list through the serializer
        out.collect(value)


class HoldsAnObject(KeyedProcessFunction[str, str, str]):
    def open(self, ctx: RuntimeContext) -> None:
        self.state = ctx.get_state(ValueStateDescriptor("bad-state"))

    def process_element(self, value: str, ctx: Any, out: Any) -> None:
        self.state.update(types.SimpleNamespace(seen=value))  # no snapshot encoding for it
        out.collect(value)


@pytest.mark.asyncio
async def test_unencodable_keyed_state_fails_naming_the_state_and_operator() -> None:
    sink = rt_testing.TestingSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(["x", "y", "x"]))
            .key_by(lambda v: v)
            .process(HoldsAnObject(), name="object holder")
            .uid("object-holder")
            .sink_to(sink)
        )

    with pytest.raises(JobFailedError) as info:
        await asyncio.wait_for(run_job_async(build, config=ExecutionConfig()), 30)
    message = str(info.value)
    assert "bad-state" in message
    assert "object holder" in message
    assert "SimpleNamespace" in message


@pytest.mark.asyncio
async def test_a_state_serializer_makes_the_same_state_encodable() -> None:
    sink = rt_testing.TestingSink()
    serializer = StateSerializer(to_data=sorted, from_data=set)

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(["x", "y", "x"]))
            .key_by(lambda v: v)
            .process(HoldsASet(serializer), name="set holder")
            .uid("set-holder")
            .sink_to(sink)
        )

    await asyncio.wait_for(run_job_async(build, config=ExecutionConfig()), 30)
    assert sorted(sink.committed) == ["x", "x", "y"]


class KeepsObjects(MapFunction[str, str]):
    def open(self, ctx: RuntimeContext) -> None:
        self.items = ctx.get_list_state("kept-objects")

    def map(self, value: str) -> str:
        self.items.add(object())
        return value


@pytest.mark.asyncio
async def test_unencodable_operator_state_fails_naming_the_state_and_operator(
    tmp_path: Path,
) -> None:
    sink = rt_testing.TestingSink()

    def build(job: Any) -> None:
        (
            job.from_source(CollectionSource(["x", "y"]))
            .map(KeepsObjects(), name="object keeper")
            .uid("object-keeper")
            .sink_to(sink)
        )

    for storage in (CheckpointStorage(None, "job"), CheckpointStorage(tmp_path / "chk", "job")):
        with pytest.raises(JobFailedError) as info:
            await asyncio.wait_for(run_job_async(build, storage=storage), 30)
        message = str(info.value)
        assert "kept-objects" in message or "object-keeper" in message, message
        assert "object keeper" in message or "object-keeper" in message, message
        assert "object" in message


# --------------------------------------------------------------------------- no pickle

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "jsonpickle"}


def _pickle_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"import {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.module and node.module.split(".")[0] in _PICKLE_MODULES:
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Name) and node.id in _PICKLE_MODULES:
            found.append(f"name {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in {"loads", "load", "Unpickler"}:
            base = node.value
            if isinstance(base, ast.Name) and base.id in _PICKLE_MODULES:
                found.append(f"{base.id}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in {"__import__"} and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and arg.value in _PICKLE_MODULES:
                    found.append(f"__import__({arg.value!r})")
    return [f"{path.relative_to(ROOT)}: {use}" for use in found]


def test_state_and_runtime_packages_never_use_pickle() -> None:
    files = [
        p for package in ("state", "runtime", "actors") for p in (ROOT / package).rglob("*.py")
    ]
    assert len(files) > 10
    uses = [use for path in files for use in _pickle_uses(path)]
    assert uses == []
    # And no textual way around the AST check (importlib by name, etc.).
    for path in files:
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            assert not re.search(r"""import_module\(\s*['"](c?pickle|dill|cloudpickle)""", code), (
                line
            )


class _Trap:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickle_payload_in_a_state_file_is_never_executed(
    etl_copy: tuple[Path, Path], tmp_path: Path
) -> None:
    _, chk = etl_copy
    folder = chk / f"chk-{completed_checkpoint_ids(chk)[-1]}"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Trap(marker))
    metadata = orjson.loads((folder / "_metadata").read_bytes())
    # Swap every state file for the payload, with matching size and checksum in the metadata.
    for meta in metadata["operators"].values():
        for info in meta["subtasks"].values():
            (folder / info["file"]).write_bytes(payload)
            info["size"] = len(payload)
            info["sha256"] = hashlib.sha256(payload).hexdigest()
    (folder / "_metadata").write_bytes(orjson.dumps(metadata))

    try:
        checkpoint = load_checkpoint(folder)
        for entry in checkpoint.operators.values():
            for subtask in entry.subtask_states:
                entry.subtask_states[subtask]  # decode it
    except Exception:  # refusing to load is fine; running code is not
        pass
    assert not marker.exists()
