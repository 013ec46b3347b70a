"""Savepoints through the CLI and the control endpoint: savepoint, stop with savepoint, resume at
another parallelism with the same result as an uninterrupted run; ``checkpoints`` listing and its
``--against`` dry run; uid mismatches; ``/status`` and ``/checkpoints``; cancel runs ``close()``.
"""

from __future__ import annotations

import collections
import re
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_helpers import (
    ROOT,
    RUN_TIMEOUT_S,
    get_json,
    post_json,
    read_address,
    run_cli,
    set_args,
    start_cli,
    stop_process,
    wait_for,
)

from connectors.files import committed_files
from state.storage import CheckpointKind, load_checkpoint

EXAMPLE = ROOT / "examples" / "file_etl.py"
EVENTS = ROOT / "examples" / "data" / "events.jsonl"


def records_in(address: str, uid: str) -> int:
    status = get_json(address, "/status")
    return sum(op["records_in"] for op in status["operators"] if op["uid"] == uid)


def committed_records(out: Path) -> collections.Counter[tuple[str, int, float]]:
    records: collections.Counter[tuple[str, int, float]] = collections.Counter()
    for path in committed_files(out):
        for line in path.read_bytes().splitlines():
            if line.strip():
                record = orjson.loads(line)
                records[(record["user"], record["n"], record["total"])] += 1
    return records


def etl_args(out: Path, *extra: str) -> list[str]:
    return ["run", str(EXAMPLE), "--set", f"output={out}", "--no-progress", *extra]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> collections.Counter[Any]:
    """The committed output of file_etl.py run to its end without interruption."""
    base = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(*etl_args(base / "out", "--rest-port", "-1"))
    assert result.returncode == 0, result.stderr
    records = committed_records(base / "out")
    assert sum(records.values()) > 1000
    assert max(records.values()) == 1
    return records


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """file_etl.py throttled, a savepoint taken while it runs, then stopped with a savepoint."""
    base = tmp_path_factory.mktemp("stopped")
    out, chk, sp = base / "out", base / "chk", base / "savepoints"
    stderr = base / "job.stderr"
    proc = start_cli(
        stderr,
        *etl_args(out, "--set", "rate=1000", "--checkpoint-dir", str(chk), "--rest-port", "0"),
        *("--savepoint-dir", str(sp)),
    )
    try:
        address = wait_for(lambda: read_address(chk), "the rest-address file", proc, stderr)
        wait_for(
            lambda: records_in(address, "running-totals") >= 200, "some progress", proc, stderr
        )
        savepoint = run_cli("savepoint", "--address", address, "--dir", str(sp))
        assert savepoint.returncode == 0, savepoint.stderr
        progressed = records_in(address, "running-totals")
        wait_for(
            lambda: records_in(address, "running-totals") >= progressed + 100,
            "progress after the savepoint",
            proc,
            stderr,
        )
        stop = run_cli("stop", "--address", address, "--dir", str(sp))
        assert stop.returncode == 0, stop.stderr
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {
        "out": out,
        "chk": chk,
        "savepoints": sp,
        "address": address,
        "savepoint": savepoint,
        "stop": stop,
        "returncode": returncode,
        "stderr": stderr.read_text(),
    }


def _savepoint_path(stdout: str, pattern: str) -> Path:
    match = re.search(pattern, stdout)
    assert match, stdout
    return Path(match.group("path").strip())


@pytest.fixture(scope="module")
def savepoint_folder(stopped_run: dict[str, Any]) -> Path:
    return _savepoint_path(
        stopped_run["savepoint"].stdout, r"savepoint (?P<id>\d+) written to (?P<path>.+)"
    )


@pytest.fixture(scope="module")
def stop_folder(stopped_run: dict[str, Any]) -> Path:
    return _savepoint_path(
        stopped_run["stop"].stdout, r"stopped with savepoint (?P<id>\d+) at (?P<path>.+)"
    )


# --------------------------------------------------------------------------- savepoint and stop


def test_savepoint_and_stop_write_savepoint_folders(
    stopped_run: dict[str, Any], savepoint_folder: Path, stop_folder: Path
) -> None:
    assert stopped_run["returncode"] == 0, stopped_run["stderr"]
    assert f"stopped with savepoint {stop_folder}" in stopped_run["stderr"]
    savepoints = stopped_run["savepoints"]
    for folder in (savepoint_folder, stop_folder):
        assert folder.parent == savepoints
        assert (folder / "_metadata").exists()
        assert load_checkpoint(folder).kind is CheckpointKind.SAVEPOINT
    first, stopped = load_checkpoint(savepoint_folder), load_checkpoint(stop_folder)
    assert stopped.checkpoint_id > first.checkpoint_id
    assert {"events", "running-totals", "output"} <= set(stopped.operators)
    # It stopped in the middle: only part of the output was committed.
    committed = sum(committed_records(stopped_run["out"]).values())
    assert 0 < committed < 1500


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", [3, 1])
def test_resume_from_the_stop_savepoint_gives_the_uninterrupted_result(
    stopped_run: dict[str, Any],
    stop_folder: Path,
    uninterrupted: collections.Counter[Any],
    tmp_path: Path,
    parallelism: int,
) -> None:
    out = tmp_path / "out"
    shutil.copytree(stopped_run["out"], out)
    result = run_cli(
        *etl_args(
            out,
            "--restore",
            str(stop_folder),
            "-p",
            str(parallelism),
            "--checkpoint-dir",
            str(tmp_path / "chk"),
            "--rest-port",
            "-1",
        )
    )
    assert result.returncode == 0, result.stderr
    assert re.search(rf"restoring savepoint \d+ from {re.escape(str(stop_folder))}", result.stderr)
    assert committed_records(out) == uninterrupted


@pytest.mark.slow
def test_stop_at_parallelism_3_and_resume_at_1_gives_the_uninterrupted_result(
    uninterrupted: collections.Counter[Any], tmp_path: Path
) -> None:
    out, chk, sp = tmp_path / "out", tmp_path / "chk", tmp_path / "sp"
    stderr = tmp_path / "job.stderr"
    proc = start_cli(
        stderr,
        *etl_args(
            out,
            "-p",
            "3",
            "--set",
            "rate=1000",
            "--checkpoint-dir",
            str(chk),
            "--checkpoint-interval",
            "200ms",
            "--rest-port",
            "0",
            "--savepoint-dir",
            str(sp),
        ),
    )
    try:
        address = wait_for(lambda: read_address(chk), "the rest-address file", proc, stderr)
        wait_for(
            lambda: records_in(address, "running-totals") >= 300, "some progress", proc, stderr
        )
        stop = run_cli("stop", "--address", address, "--dir", str(sp))
        assert stop.returncode == 0, stop.stderr
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, stderr.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    folder = _savepoint_path(stop.stdout, r"stopped with savepoint (?P<id>\d+) at (?P<path>.+)")
    assert 0 < sum(committed_records(out).values()) < 2000

    result = run_cli(*etl_args(out, "--restore", str(folder), "-p", "1", "--rest-port", "-1"))
    assert result.returncode == 0, result.stderr
    assert "restoring savepoint" in result.stderr
    assert committed_records(out) == uninterrupted


# --------------------------------------------------------------------------- checkpoints command


def test_checkpoints_lists_savepoints_with_id_kind_and_validity(
    stopped_run: dict[str, Any], savepoint_folder: Path, stop_folder: Path, tmp_path: Path
) -> None:
    listing = run_cli("checkpoints", str(stopped_run["savepoints"]))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    for folder in (savepoint_folder, stop_folder):
        checkpoint_id = load_checkpoint(folder).checkpoint_id
        line = next(line for line in lines if line.startswith(f"{folder}:"))
        assert f"savepoint {checkpoint_id}," in line
        assert "valid" in line and "INVALID" not in line

    # A damaged copy is listed as INVALID, with the reason.
    damaged_root = tmp_path / "copy"
    shutil.copytree(stopped_run["savepoints"], damaged_root)
    damaged = damaged_root / savepoint_folder.name
    victim = next(p for p in sorted(damaged.iterdir()) if p.suffix == ".state")
    victim.write_bytes(victim.read_bytes()[:-1])
    listing = run_cli("checkpoints", str(damaged_root))
    assert listing.returncode == 0, listing.stderr
    line = next(line for line in listing.stdout.splitlines() if line.startswith(f"{damaged}:"))
    assert "INVALID" in line and victim.name in line
    intact = next(
        line
        for line in listing.stdout.splitlines()
        if line.startswith(f"{damaged_root / stop_folder.name}:")
    )
    assert "INVALID" not in intact


def test_checkpoints_lists_retained_checkpoints(tmp_path: Path) -> None:
    out, chk = tmp_path / "out", tmp_path / "chk"
    result = run_cli(*etl_args(out, "--checkpoint-dir", str(chk), "--rest-port", "-1"))
    assert result.returncode == 0, result.stderr
    listing = run_cli("checkpoints", str(chk))
    assert listing.returncode == 0, listing.stderr
    folders = sorted(p for p in chk.iterdir() if p.name.startswith("chk-"))
    assert folders
    for folder in folders:
        line = next(line for line in listing.stdout.splitlines() if line.startswith(f"{folder}:"))
        assert re.search(rf"checkpoint {folder.name[4:]},", line), line
        assert "valid" in line
        assert "running-totals (finished)" in line  # the final checkpoint of a finished job


def _renamed_uid_job(tmp_path: Path) -> Path:
    """file_etl.py with the running totals' uid changed (and the bundled input passed in)."""
    text = EXAMPLE.read_text()
    assert '.uid("running-totals")' in text
    job = tmp_path / "etl_v2.py"
    job.write_text(text.replace('.uid("running-totals")', '.uid("running-totals-v2")'))
    return job


def test_checkpoints_against_reports_restores_empty_and_dropped(
    stop_folder: Path, tmp_path: Path
) -> None:
    same = run_cli("checkpoints", str(stop_folder), "--against", str(EXAMPLE), "--set", "output=x")
    assert same.returncode == 0, same.stderr
    assert re.search(r"restores state: .*running-totals", same.stdout), same.stdout
    assert re.search(r"starts empty: +none", same.stdout), same.stdout
    assert re.search(r"state dropped: +none", same.stdout), same.stdout

    renamed = _renamed_uid_job(tmp_path)
    other = run_cli(
        "checkpoints",
        str(stop_folder),
        "--against",
        str(renamed),
        "--set",
        "output=x",
        "--set",
        f"input={EVENTS}",
        "-p",
        "3",
    )
    assert other.returncode == 0, other.stderr
    restores = next(line for line in other.stdout.splitlines() if "restores state:" in line)
    empty = next(line for line in other.stdout.splitlines() if "starts empty:" in line)
    dropped = next(line for line in other.stdout.splitlines() if "state dropped:" in line)
    assert "events" in restores and "running-totals" not in restores
    assert "running-totals-v2" in empty
    assert "running-totals" in dropped


def test_restore_with_unmatched_uids_fails_unless_allowed(
    stopped_run: dict[str, Any], stop_folder: Path, tmp_path: Path
) -> None:
    renamed = _renamed_uid_job(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(stopped_run["out"], out)
    args = [
        "run",
        str(renamed),
        "--set",
        f"output={out}",
        "--set",
        f"input={EVENTS}",
        "--restore",
        str(stop_folder),
        "--no-progress",
        "--rest-port",
        "-1",
    ]
    refused = run_cli(*args)
    assert refused.returncode == 2, refused.stderr
    assert "running-totals" in refused.stderr
    assert "--allow-non-restored-state" in refused.stderr
    assert committed_records(out) == committed_records(stopped_run["out"])  # nothing ran

    allowed = run_cli(*args, "--allow-non-restored-state")
    assert allowed.returncode == 0, allowed.stderr
    assert re.search(r"restoring savepoint \d+ from ", allowed.stderr)


# --------------------------------------------------------------------------- control endpoint

TRACKED_JOB = '''
from pathlib import Path

from connectors import GeneratorSource, TwoPhaseCommitFileSink
from runtime import MapFunction


class Tracker(MapFunction):
    """Leaves a marker file per subtask for open(), finish() and close()."""

    def __init__(self, markers):
        self.markers = markers

    def open(self, ctx):
        self.subtask = ctx.subtask_index
        Path(self.markers, f"open-{self.subtask}").touch()

    def map(self, value):
        return value

    def finish(self):
        Path(self.markers, f"finish-{self.subtask}").touch()

    def close(self):
        Path(self.markers, f"close-{self.subtask}").touch()


def build(job):
    (
        job.from_source(GeneratorSource(lambda i: {"i": i}, rate=200))
        .uid("gen")
        .map(Tracker(job.params["markers"]), name="tracker")
        .uid("tracker")
        .sink_to(TwoPhaseCommitFileSink(job.params["output"]), name="files")
        .uid("out")
    )
'''


def test_status_checkpoints_endpoints_and_cancel(tmp_path: Path) -> None:
    job_file = tmp_path / "tracked.py"
    job_file.write_text(TRACKED_JOB)
    markers, out, chk = tmp_path / "markers", tmp_path / "out", tmp_path / "chk"
    markers.mkdir()
    stderr = tmp_path / "job.stderr"
    proc = start_cli(
        stderr,
        "run",
        str(job_file),
        "-p",
        "2",
        "--set",
        f"markers={markers}",
        "--set",
        f"output={out}",
        "--checkpoint-dir",
        str(chk),
        "--checkpoint-interval",
        "100ms",
        "--rest-port",
        "0",
        "--no-progress",
    )
    try:
        address = wait_for(lambda: read_address(chk), "the rest-address file", proc, stderr)
        status = wait_for(
            lambda: (
                (s := get_json(address, "/status"))["status"] == "running"
                and all(t["state"] == "running" for t in s["tasks"])
                and s
            ),
            "every task running",
            proc,
            stderr,
        )
        assert status["job"] == "tracked"
        assert status["attempt"] == 1
        assert len(status["tasks"]) >= 2
        assert all(set(t) == {"name", "state", "taskmanager"} for t in status["tasks"])
        assert all(t["taskmanager"] is None for t in status["tasks"])
        assert status["taskmanagers"] == []
        by_uid = {op["uid"]: op for op in status["operators"]}
        assert {"gen", "tracker", "out"} <= set(by_uid)
        for op in status["operators"]:
            assert set(op) == {
                *("uid", "name", "parallelism", "records_in", "records_out"),
                *("watermark", "idle", "subtasks", "late_records_dropped"),
                *("records_in_per_s", "records_out_per_s", "busy_ms_per_s", "idle_ms_per_s"),
                *("backpressured_ms_per_s", "input_watermark", "vertex"),
            }
            assert op["late_records_dropped"] == 0  # no window operator here
            assert op["parallelism"] == 2
            # No event time in this job: no watermark yet, and no subtask is idle (all have splits).
            assert op["watermark"] is None and op["idle"] is False
            assert [
                {key: s[key] for key in ("subtask", "watermark", "idle")} for s in op["subtasks"]
            ] == [{"subtask": i, "watermark": None, "idle": False} for i in range(2)]
        assert by_uid["tracker"]["name"] == "tracker"

        checkpoints = wait_for(
            lambda: (c := get_json(address, "/checkpoints"))["counts"]["completed"] >= 2 and c,
            "two completed checkpoints",
            proc,
            stderr,
        )
        assert set(checkpoints) == {"counts", "latest_completed", "history"}
        assert set(checkpoints["counts"]) == {"in-progress", "completed", "failed"}
        latest = checkpoints["latest_completed"]
        assert set(latest) == {"id", "path", "state_size"}
        assert (Path(latest["path"]) / "_metadata").exists()
        assert latest["state_size"] > 0
        fields = {
            "id",
            "kind",
            "status",
            "trigger_time_ms",
            "duration_ms",
            "state_size",
            "alignment_ms",
            "snapshot_ms",
            "failure",
            "path",
        }
        history = checkpoints["history"]
        assert history and all(set(row) == fields for row in history)
        done = [row for row in history if row["status"] == "completed"]
        assert latest["id"] in {row["id"] for row in done}
        for row in done:
            assert row["kind"] == "checkpoint"
            assert row["duration_ms"] >= 0 and row["failure"] is None
            assert isinstance(row["alignment_ms"], dict)
            assert row["snapshot_ms"].keys() == row["alignment_ms"].keys()
        ids = [row["id"] for row in history]
        assert ids == sorted(ids)

        # A savepoint request without a directory is refused.
        status, answer = post_json(address, "/savepoints", {})
        assert status == 400, answer
        assert "dir" in answer["error"]

        assert not any(markers.glob("close-*"))
        cancel = run_cli("cancel", "--address", address)
        assert cancel.returncode == 0, cancel.stderr
        assert "cancel requested" in cancel.stdout
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = stderr.read_text()
    assert returncode == 130, text
    assert "cancelled through the control endpoint" in text
    # close() ran in every subtask; finish() did not (a cancel is not a graceful end).
    assert sorted(p.name for p in markers.glob("open-*")) == ["open-0", "open-1"]
    assert sorted(p.name for p in markers.glob("close-*")) == ["close-0", "close-1"]
    assert not any(markers.glob("finish-*"))
    # Checkpoints are retained on cancel by default.
    assert any((p / "_metadata").exists() for p in chk.glob("chk-*"))

    gone = run_cli("cancel", "--address", address)
    assert gone.returncode == 1
    assert "cannot reach the job" in gone.stderr


def test_a_savepoint_requested_while_the_job_fails_for_good_is_answered_with_the_failure(
    tmp_path: Path,
) -> None:
    """The savepoint's snapshot crashes the task and no restart is allowed: the request gets the
    job's end as its answer and the job exits, instead of both waiting for a savepoint that can
    never complete."""
    out, chk, stderr = tmp_path / "out", tmp_path / "chk", tmp_path / "job.stderr"
    job = start_cli(
        stderr,
        "run",
        str(ROOT / "examples" / "file_etl.py"),
        *set_args(output=out, rate=200, **{"testing.crash-at": "before-snapshot"}),
        "--restart-strategy",
        "none",
        "--checkpoint-dir",
        str(chk),
        "--no-progress",
        "--rest-port",
        "0",
    )
    try:
        address = wait_for(lambda: read_address(chk), "the rest-address file", job, stderr)
        taken = run_cli("savepoint", "--address", address)
        assert taken.returncode != 0, taken.stdout
        assert "the job has ended (failed)" in taken.stderr, taken.stderr
        assert job.wait(timeout=RUN_TIMEOUT_S) == 1, stderr.read_text()
        assert "injected crash at before-snapshot" in stderr.read_text()
    finally:
        stop_process(job)
