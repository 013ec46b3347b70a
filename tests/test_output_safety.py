"""The two-phase-commit file sink keeps its committed output exactly once across restores that do
not continue where the output stands, and restored state cannot reach files outside the sink's
output directory or the file source's input (issue 8, items 4, 10, 13 and 14).

All through the CLI with ``examples/file_etl.py``: SIGKILL, damaged or deleted checkpoints, crafted
savepoints, then a restore; the committed output is compared with a plain Python computation.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_helpers import (
    ROOT,
    checkpoint_sink_entries,
    completed_checkpoint_ids,
    damage_checkpoint,
    damage_latest_checkpoint,
    kill_when,
    max_completed,
    run_cli,
    start_cli,
    write_savepoint,
)
from etl_expectations import EVENTS, assert_exact_output, committed_records, expected_output

from connectors.files import ROLLBACK_MANIFEST, committed_files, rolled_back_folder

EXAMPLE = ROOT / "examples" / "file_etl.py"
SINK_UID = "output"
SINK_NAME = "committed files"


def etl_args(out: Path, *extra: str, rate: int = 0, parallelism: int = 2) -> list[str]:
    return [
        "run",
        str(EXAMPLE),
        "-p",
        str(parallelism),
        "--set",
        f"rate={rate}",
        "--set",
        f"output={out}",
        "--no-progress",
        "--rest-port",
        "-1",
        *extra,
    ]


def restore_latest_args(out: Path, chk: Path, *extra: str, rate: int = 0) -> list[str]:
    return etl_args(
        out,
        "--checkpoint-dir",
        str(chk),
        "--checkpoint-interval",
        "100ms",
        "--retained-checkpoints",
        "2",
        "--restore",
        "latest",
        *extra,
        rate=rate,
    )


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line of a refused restore or start (status 2, no traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return error


def file_contents(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in committed_files(out)}


def pair_counts(records: list[dict[str, Any]]) -> collections.Counter[tuple[str, int]]:
    return collections.Counter((r["user"], r["n"]) for r in records)


# --------------------------------------------------------------------------- item 4


@pytest.fixture(scope="module")
def fallback(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A job SIGKILLed right after its latest checkpoint committed its files, with two retained
    checkpoints; then the latest one is damaged, so ``--restore latest`` falls back."""
    base = tmp_path_factory.mktemp("fallback")
    out, chk, stderr = base / "out", base / "chk", base / "first.stderr"
    proc = start_cli(stderr, *restore_latest_args(out, chk, rate=2000))

    def latest_checkpoint_committed() -> int | None:
        latest = max_completed(chk)
        if len(completed_checkpoint_ids(chk)) < 2 or latest < 3:
            return None
        entries = checkpoint_sink_entries(chk / f"chk-{latest}", SINK_UID)
        own = [e for e in entries if e["checkpoint"] == latest]
        if own and all((out / e["final"]).exists() for e in entries):
            return latest
        return None

    latest = kill_when(
        latest_checkpoint_committed, "the latest checkpoint committing its files", proc, stderr
    )
    completed = completed_checkpoint_ids(chk)
    assert completed[-1] == latest and len(completed) == 2, completed
    restored = completed[0]
    newer = sorted(
        e["final"]
        for e in checkpoint_sink_entries(chk / f"chk-{latest}", SINK_UID)
        if e["checkpoint"] > restored
    )
    assert newer, "the latest checkpoint committed no files"
    assert damage_latest_checkpoint(chk) == latest
    return {
        "out": out,
        "chk": chk,
        "restored": restored,
        "damaged": latest,
        "newer": newer,
        "committed": file_contents(out),
    }


def restore_a_copy(
    fallback: dict[str, Any], tmp_path: Path, *extra: str
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``--restore latest`` on a copy of the damaged run; the copy's output folder and the run."""
    out, chk = tmp_path / "out", tmp_path / "chk"
    shutil.copytree(fallback["out"], out)
    shutil.copytree(fallback["chk"], chk)
    return out, run_cli(*restore_latest_args(out, chk, *extra))


@pytest.mark.slow
def test_fallback_to_an_older_checkpoint_moves_newer_committed_output_aside(
    fallback: dict[str, Any], tmp_path: Path
) -> None:
    out, result = restore_a_copy(fallback, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"restoring checkpoint {fallback['restored']} from " in result.stderr
    assert_exact_output(out)
    moved = rolled_back_folder(out, fallback["restored"])
    assert moved.name.startswith(".")
    assert sorted(p.name for p in moved.iterdir()) == sorted(
        [*fallback["newer"], ROLLBACK_MANIFEST]
    )
    manifest = orjson.loads((moved / ROLLBACK_MANIFEST).read_bytes())
    assert manifest["restored"] == fallback["restored"]
    assert manifest["abandoned"] == [fallback["damaged"]]
    for name in fallback["newer"]:
        assert (moved / name).read_bytes() == fallback["committed"][name]
        assert name in result.stderr
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert any("moved" in line and str(moved) in line for line in warnings), result.stderr


@pytest.mark.slow
def test_fallback_with_policy_fail_refuses_the_restore_naming_the_output(
    fallback: dict[str, Any], tmp_path: Path
) -> None:
    out, result = restore_a_copy(fallback, tmp_path, "--on-newer-committed-output", "fail")
    error = refusal(result)
    assert str(out) in error
    assert f"restoring checkpoint {fallback['restored']}" in error
    assert str(fallback["damaged"]) in error
    assert any(name in error for name in fallback["newer"])
    assert "--on-newer-committed-output" in error
    # Nothing was changed: the output is as the killed job left it.
    assert file_contents(out) == fallback["committed"]
    assert not rolled_back_folder(out, fallback["restored"]).exists()


@pytest.mark.slow
def test_fallback_with_policy_keep_commits_the_newer_records_again_and_says_so(
    fallback: dict[str, Any], tmp_path: Path
) -> None:
    out, result = restore_a_copy(fallback, tmp_path, "--on-newer-committed-output", "keep")
    assert result.returncode == 0, result.stderr
    assert any(
        " WARNING " in line and "duplicates" in line for line in result.stderr.splitlines()
    ), result.stderr
    # The files of the newer checkpoints stay, and their records are committed once more.
    newer_records = [
        orjson.loads(line)
        for name in fallback["newer"]
        for line in (out / name).read_bytes().splitlines()
        if line.strip()
    ]
    assert newer_records
    once = collections.Counter(
        (user, n) for user, rows in expected_output().items() for n, _ in rows
    )
    assert pair_counts(committed_records(out)) - once == pair_counts(newer_records)


# --------------------------------------------------------------------------- item 10


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["every checkpoint damaged", "checkpoint dir deleted"])
def test_restore_latest_without_a_valid_checkpoint_refuses_to_write_into_committed_output(
    tmp_path: Path, lost: str
) -> None:
    out, chk = tmp_path / "out", tmp_path / "chk"
    first = run_cli(*restore_latest_args(out, chk))
    assert first.returncode == 0, first.stderr
    assert_exact_output(out)
    committed = file_contents(out)
    if lost == "every checkpoint damaged":
        for checkpoint_id in completed_checkpoint_ids(chk):
            damage_checkpoint(chk / f"chk-{checkpoint_id}")
    else:
        shutil.rmtree(chk)

    refused = run_cli(*restore_latest_args(out, chk))
    error = refusal(refused)
    assert str(out) in error
    assert "--restore" in error
    assert "another output directory" in error
    assert "--allow-existing-output" in error
    assert file_contents(out) == committed

    allowed = run_cli(*restore_latest_args(out, chk, "--allow-existing-output"))
    assert allowed.returncode == 0, allowed.stderr
    # Knowingly: everything is written a second time next to the first output.
    once = pair_counts(committed_records(out))
    assert set(once.values()) == {2}
    assert len(once) == sum(len(rows) for rows in expected_output().values())


# --------------------------------------------------------------------------- item 13


@pytest.mark.slow
def test_restore_deletes_pending_files_of_a_checkpoint_that_never_completed(
    tmp_path: Path,
) -> None:
    out, chk, stderr = tmp_path / "out", tmp_path / "chk", tmp_path / "first.stderr"
    proc = start_cli(stderr, *restore_latest_args(out, chk, rate=2000))

    def leftover_pending_files() -> list[str] | None:
        latest = max_completed(chk)
        if not latest:
            return None
        referenced = {
            e["pending"] for e in checkpoint_sink_entries(chk / f"chk-{latest}", SINK_UID)
        }
        leftovers = sorted(p.name for p in out.glob(".part-*.pending") if p.name not in referenced)
        return leftovers or None

    leftovers = kill_when(
        leftover_pending_files, "pending files of a checkpoint still in flight", proc, stderr
    )
    committed = file_contents(out)

    result = run_cli(*restore_latest_args(out, chk))
    assert result.returncode == 0, result.stderr
    assert "restoring checkpoint" in result.stderr
    for name in leftovers:
        assert not (out / name).exists(), name
    assert not list(out.glob(".part-*.pending"))
    for name, data in committed.items():
        assert (out / name).read_bytes() == data, name
    assert_exact_output(out)


# --------------------------------------------------------------------------- item 14


def list_state_snapshot(name: str, items: list[Any]) -> dict[str, Any]:
    """A subtask snapshot with one even-split operator list state, as operators record it."""
    return {"operator": {name: {"mode": "even-split", "items": items}}}


@pytest.mark.parametrize("form", ["absolute", "parent"])
def test_restore_refuses_sink_state_that_names_files_outside_the_output_directory(
    tmp_path: Path, form: str
) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    planted = elsewhere / ".part-0-0badc0de-00001-chk6.pending"
    planted.write_bytes(b'{"planted": true}\n')
    target = elsewhere / "part-0-0badc0de-00001-chk6.jsonl"
    if form == "absolute":
        entry = {"checkpoint": 6, "pending": str(planted), "final": str(target)}
    else:
        entry = {
            "checkpoint": 6,
            "pending": f"../elsewhere/{planted.name}",
            "final": f"../elsewhere/{target.name}",
        }
    savepoint = write_savepoint(
        tmp_path / "sp", 7, {SINK_UID: (SINK_NAME, {0: list_state_snapshot("sink", [entry])})}
    )

    result = run_cli(*etl_args(out, "--restore", str(savepoint), parallelism=1))
    error = refusal(result)
    assert SINK_NAME in error
    assert "checkpoint 7" in error
    assert entry["pending"] in error
    assert planted.read_bytes() == b'{"planted": true}\n'
    assert not target.exists()
    assert committed_files(out) == []


@pytest.mark.parametrize("layout", ["input file", "input directory"])
def test_restore_refuses_file_source_splits_outside_the_configured_input(
    tmp_path: Path, layout: str
) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(EVENTS, inputs / "events.jsonl")
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(b'{"user": "intruder", "kind": "purchase", "amount": 1.0, "ts": 0}\n')
    if layout == "input file":
        configured, split_path = inputs / "events.jsonl", str(secret)
    else:
        configured, split_path = inputs, f"{inputs}/../{secret.name}"
    split = {"path": split_path, "offset": 0, "line": 0}
    savepoint = write_savepoint(
        tmp_path / "sp", 7, {"events": ("events", {0: list_state_snapshot("splits", [split])})}
    )

    result = run_cli(
        *etl_args(out, "--set", f"input={configured}", "--restore", str(savepoint), parallelism=1)
    )
    error = refusal(result)
    assert "file source" in error
    assert "checkpoint 7" in error
    assert split_path in error
    assert not out.exists() or committed_files(out) == []
