"""Issue 8 as its users meet it: gaps found by running the CLI by hand after the fixes.

- A process function that collects what an ``async def`` function returns (``out.collect(
  fetch(value))``, a forgotten ``await``) emitted coroutine objects as records and the job exited
  0, although a process function that *returns* one fails its task.
- After a restore from an older savepoint moved the output of the newer checkpoints aside, those
  checkpoints stay in the checkpoint directory; when the resumed run dies before its first
  checkpoint, ``--restore latest`` (the README's crash recovery) restored the abandoned newest
  one, whose files are no longer in the output directory: a FileNotFoundError traceback, retried;
  and when that checkpoint's own files were still pending, it restored silently without the
  records its predecessors committed. Now the restore marks the checkpoints it left abandoned
  (``--restore latest`` skips them, saying so), and, for a crash before the marks, the sink's
  rollback manifest refuses them.
- ``--restore chk-N/_metadata`` (the metadata file, as Flink accepts) was "not a folder".
- A fresh start into committed output was refused without "delete the old output" as a way out,
  and suggested ``--restore`` also when the run keeps no checkpoints.
- A restore whose two-phase file sink state names files that are not in the output directory
  (``--set output=`` another directory than the checkpoint wrote to, the output deleted) failed
  the task with a FileNotFoundError traceback, retried by the restart strategy, instead of a
  refused restore (one line, exit 2).
- ``python -m runtime checkpoints`` reported a missing metadata field as
  ``checkpoint_id: expected a value, got 'nothing'``, as if the field held the string "nothing".
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
from cli_helpers import (
    ROOT,
    checkpoint_sink_entries,
    committed_output_checkpoints,
    completed_checkpoint_ids,
    kill_when,
    max_completed,
    read_address,
    run_cli,
    start_cli,
    stop_process,
    take_savepoint,
    wait_for,
)
from etl_expectations import assert_exact_output

from connectors.files import ROLLBACK_MANIFEST, committed_files, rolled_back_folder
from state.storage import ABANDONED

FILE_ETL = ROOT / "examples" / "file_etl.py"

COLLECTS_A_COROUTINE = textwrap.dedent(
    """\
    from connectors import CollectionSource
    from runtime import KeyedProcessFunction

    END_OF_INPUT = 1 << 62


    async def enrich(value):
        return value


    class Enrich(KeyedProcessFunction):
        def __init__(self, in_timer):
            self.in_timer = in_timer

        def process_element(self, value, ctx, out):
            if self.in_timer:
                ctx.timer_service().register_event_time_timer(END_OF_INPUT)
            else:
                out.collect(enrich(value))

        def on_timer(self, timestamp, ctx, out):
            out.collect(enrich(ctx.current_key))


    def build(job):
        in_timer = job.params.get_bool("in_timer", False)
        (
            job.from_source(CollectionSource([1, 2, 3]))
            .key_by(lambda v: v)
            .process(Enrich(in_timer), name="enrich")
            .print()
        )
    """
)


@pytest.mark.parametrize("in_timer", [False, True], ids=["process_element", "on_timer"])
def test_a_process_function_that_collects_a_coroutine_fails_naming_the_operator(
    tmp_path: Path, in_timer: bool
) -> None:
    job = tmp_path / "collects_coroutine.py"
    job.write_text(COLLECTS_A_COROUTINE)
    proc = run_cli(
        "run", str(job), "--set", f"in_timer={str(in_timer).lower()}", "--no-progress",
        "--rest-port", "-1",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "coroutine object" not in proc.stdout, proc.stdout
    assert "operator 'enrich' (subtask 1/1)" in proc.stderr, proc.stderr
    method = "on_timer()" if in_timer else "process_element()"
    assert f"{method} of the process function collected a coroutine" in proc.stderr, proc.stderr
    assert "map_async" in proc.stderr
    assert "was never awaited" not in proc.stderr, proc.stderr


def test_a_missing_metadata_field_is_reported_as_missing(tmp_path: Path) -> None:
    folder = tmp_path / "chk" / "chk-1"
    folder.mkdir(parents=True)
    (folder / "_metadata").write_text(json.dumps({"format": 1}))
    listing = run_cli("checkpoints", str(tmp_path / "chk"))
    assert listing.returncode == 0, listing.stderr
    assert "INVALID" in listing.stdout, listing.stdout
    assert "checkpoint_id: expected a value, but the field is missing" in listing.stdout
    assert "'nothing'" not in listing.stdout, listing.stdout


def file_etl_args(out: Path, chk: Path, *extra: str, rate: int, parallelism: int = 2) -> list[str]:
    return [
        "run", str(FILE_ETL), "-p", str(parallelism), "--set", f"output={out}", "--set", f"rate={rate}",
        "--checkpoint-dir", str(chk), "--no-progress", *extra,
    ]  # fmt: skip


def run_savepoint_then_abandon_it(
    tmp_path: Path,
    *first_extra: str,
    parallelism: int = 2,
    from_checkpoint: bool = False,
    marked: bool = True,
) -> tuple[Path, Path, int, int]:
    """A throttled file ETL takes a savepoint and goes on committing newer checkpoints (killed,
    or crashing as ``first_extra`` arms it); a run resumed from the savepoint moves their output
    aside, marks the newer checkpoints abandoned once it runs, and is killed before its first
    checkpoint. ``from_checkpoint``: an older checkpoint of the directory (all retained) stands
    in for the savepoint. ``marked=False`` deletes the abandoned markers afterwards, as a crash
    between moving the output and marking leaves the directory. Returns the output, the
    checkpoint dir, the newest checkpoint of the abandoned first run and the id restored."""
    out, chk, savepoints = tmp_path / "out", tmp_path / "chk", tmp_path / "savepoints"
    first_err, second_err = tmp_path / "first.stderr", tmp_path / "second.stderr"
    first = start_cli(
        first_err,
        *file_etl_args(
            out,
            chk,
            "--checkpoint-interval",
            "100ms",
            "--retained-checkpoints",
            "1000" if from_checkpoint else "1",
            "--savepoint-dir",
            str(savepoints),
            *first_extra,
            rate=300,
            parallelism=parallelism,
        ),
    )
    try:
        address = wait_for(lambda: read_address(chk), "the rest-address file", first, first_err)
        wait_for(lambda: max_completed(chk) >= 2, "two checkpoints", first, first_err)
        if from_checkpoint:
            savepoint_id = max_completed(chk)
            restore_point = chk / f"chk-{savepoint_id}"
        else:
            savepoint_id, _ = take_savepoint(address, savepoints)
            restore_point = savepoints
        if first_extra:
            assert first.wait(timeout=30) == 137, first_err.read_text()  # the armed crash
        else:

            def newer_checkpoints_committed() -> bool:
                latest = max_completed(chk)
                if latest < savepoint_id + 3:
                    return False
                entries = checkpoint_sink_entries(chk / f"chk-{latest}", "output")
                return all((out / e["final"]).exists() for e in entries)

            kill_when(newer_checkpoints_committed, "newer committed checkpoints", first, first_err)
    finally:
        stop_process(first)
    abandoned = max_completed(chk)
    assert abandoned > savepoint_id + 1, "no newer checkpoint committed output"

    second = start_cli(
        second_err,
        *file_etl_args(
            out,
            chk,
            "--checkpoint-interval",
            "1h",
            "--restore",
            str(restore_point),
            rate=300,
            parallelism=parallelism,
        ),
    )
    markers = [chk / f"chk-{c}" / ABANDONED for c in completed_checkpoint_ids(chk)]
    markers = [m for m in markers if int(m.parent.name[4:]) > savepoint_id]
    try:
        wait_for(
            lambda: all(m.exists() for m in markers), "the abandoned markers", second, second_err
        )
    finally:
        stop_process(second)
    assert any(rolled_back_folder(out, savepoint_id).glob("part-*.jsonl")), "nothing moved"
    assert max_completed(chk) == abandoned, "the resumed run completed a checkpoint"
    if not marked:
        for marker in markers:
            marker.unlink()
    return out, chk, abandoned, savepoint_id


def recover_latest(out: Path, chk: Path, parallelism: int = 2) -> subprocess.CompletedProcess[str]:
    """The README's recovery after a crash: resume from the latest valid checkpoint."""
    return run_cli(
        *file_etl_args(
            out, chk, "--checkpoint-interval", "100ms", "--restore", "latest", "--rest-port", "-1",
            rate=0, parallelism=parallelism,
        )
    )  # fmt: skip


@pytest.mark.slow
def test_restore_latest_of_a_run_abandoned_by_a_savepoint_restore_is_refused(
    tmp_path: Path,
) -> None:
    # Without the markers: the crash window between moving the output and marking.
    out, chk, abandoned, _ = run_savepoint_then_abandon_it(tmp_path, marked=False)
    recovered = recover_latest(out, chk)
    assert recovered.returncode == 2, recovered.stderr
    assert "Traceback" not in recovered.stderr, recovered.stderr
    [error] = [line for line in recovered.stderr.splitlines() if line.startswith("error: ")]
    assert f"checkpoint {abandoned} names" in error, error
    assert ".rolled-back-after-chk-" in error and "abandoned" in error, error


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of an output directory, dot-folders included, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("marked", [True, False], ids=["marked", "crash-before-marking"])
def test_restore_latest_of_an_abandoned_run_with_pending_files_is_not_silent(
    tmp_path: Path, marked: bool
) -> None:
    # One subtask, so that the crash leaves every file of the newest checkpoint pending.
    out, chk, abandoned, restored = run_savepoint_then_abandon_it(
        tmp_path,
        "--set", "testing.crash-at=before-commit:20", "--set", "testing.crash-mode=exit",
        parallelism=1, marked=marked,
    )  # fmt: skip
    before = output_files(out)
    recovered = recover_latest(out, chk, parallelism=1)
    if recovered.returncode == 0:
        assert_exact_output(out)
    else:
        assert recovered.returncode == 2, recovered.stderr
        assert "Traceback" not in recovered.stderr, recovered.stderr
        assert f"checkpoint {abandoned}" in recovered.stderr, recovered.stderr
        assert "abandoned" in recovered.stderr, recovered.stderr
        assert output_files(out) == before  # refused before anything was touched
    [error] = [line for line in recovered.stderr.splitlines() if line.startswith("error: ")]
    if marked:
        # --restore latest skips the abandoned checkpoint, saying why; the savepoint restored
        # instead is not in the checkpoint directory, so the start is fresh and refused.
        assert recovered.returncode == 2
        assert (
            f"warning:   skipped chk-{abandoned}: checkpoint {abandoned} abandoned: a later run "
            f"restored savepoint {restored} on " in recovered.stderr
        ), recovered.stderr
        assert "already holds" in error and "Delete the old output" in error, error
    else:
        # Nothing marked it: the sink's rollback manifest refuses it.
        assert recovered.returncode == 2
        folder = rolled_back_folder(out, restored)
        assert f"checkpoint {abandoned} was abandoned: a restore of checkpoint {restored}" in error
        assert str(folder) in error and str(folder / ROLLBACK_MANIFEST) in error, error
        assert f"Restore checkpoint {restored} again" in error, error


@pytest.mark.slow
def test_restore_latest_after_an_abandoned_run_restores_the_checkpoint_it_returned_to(
    tmp_path: Path,
) -> None:
    out, chk, abandoned, restored = run_savepoint_then_abandon_it(tmp_path, from_checkpoint=True)
    left = [c for c in completed_checkpoint_ids(chk) if c > restored]
    assert left and max(left) == abandoned

    listing = run_cli("checkpoints", str(chk))
    assert listing.returncode == 0, listing.stderr
    for line in listing.stdout.splitlines():
        checkpoint_id = int(line.split(": ", 1)[0].rsplit("chk-", 1)[1])
        if checkpoint_id in left:
            assert f"valid, ABANDONED (a later run restored checkpoint {restored} on " in line
        else:
            assert "ABANDONED" not in line, line

    # Asked for by path, an abandoned checkpoint is restored with a warning (and here the sink
    # refuses it: its files are moved aside).
    explicit = run_cli(
        *file_etl_args(
            out, chk, "--restore", str(chk / f"chk-{abandoned}"), "--rest-port", "-1", rate=0
        )
    )
    assert f"checkpoint {abandoned} was abandoned: a later run restored checkpoint" in (
        explicit.stderr
    ), explicit.stderr
    assert explicit.returncode == 2, explicit.stderr

    recovered = recover_latest(out, chk)
    assert recovered.returncode == 0, recovered.stderr
    assert (
        f"are abandoned (a restore of an older checkpoint left them); falling back to "
        f"checkpoint {restored}" in recovered.stderr
    ), recovered.stderr
    for checkpoint_id in left:
        assert f"skipped chk-{checkpoint_id}: checkpoint {checkpoint_id} abandoned" in (
            recovered.stderr
        )
    assert_exact_output(out)


@pytest.mark.slow
def test_a_refused_restore_marks_nothing_abandoned(tmp_path: Path) -> None:
    """A restore that a sink refuses leaves the user on the newest checkpoint's run."""
    out, chk = tmp_path / "out", tmp_path / "chk"
    first_err = tmp_path / "first.stderr"
    first = start_cli(
        first_err,
        *file_etl_args(out, chk, "--checkpoint-interval", "100ms", "--retained-checkpoints",
                       "1000", rate=300),
    )  # fmt: skip

    def newer_output_committed() -> bool:
        return max_completed(chk) >= 4 and max(committed_output_checkpoints(out), default=0) > 2

    kill_when(newer_output_committed, "output committed after checkpoint 2", first, first_err)
    newest = max_completed(chk)
    refused = run_cli(
        *file_etl_args(
            out, chk, "--restore", str(chk / "chk-2"), "--on-newer-committed-output", "fail",
            "--rest-port", "-1", rate=0,
        )
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert not list(chk.glob(f"chk-*/{ABANDONED}"))
    recovered = recover_latest(out, chk)
    assert recovered.returncode == 0, recovered.stderr
    assert f"restoring checkpoint {newest} from" in recovered.stderr, recovered.stderr
    assert_exact_output(out)


def test_restore_of_a_metadata_file_restores_its_folder(tmp_path: Path) -> None:
    out, chk = tmp_path / "out", tmp_path / "chk"
    finished = run_cli(
        *file_etl_args(out, chk, "--checkpoint-interval", "100ms", "--rest-port", "-1", rate=0)
    )
    assert finished.returncode == 0, finished.stderr
    latest = max_completed(chk)
    metadata = chk / f"chk-{latest}" / "_metadata"
    restored = run_cli(
        *file_etl_args(out, chk, "--restore", str(metadata), "--rest-port", "-1", rate=0)
    )
    assert restored.returncode == 0, restored.stderr
    assert f"restoring checkpoint {latest} from {metadata.parent}" in restored.stderr
    assert_exact_output(out)


def test_a_fresh_start_into_committed_output_without_a_checkpoint_dir_offers_real_ways_out(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    args = [
        "run", str(FILE_ETL), "--set", f"output={out}", "--set", "rate=0",
        "--checkpoint-interval", "100ms", "--no-progress", "--rest-port", "-1",
    ]  # fmt: skip
    assert run_cli(*args).returncode == 0
    committed = committed_files(out)
    again = run_cli(*args)
    assert again.returncode == 2, again.stderr
    [error] = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert "Delete the old output" in error and "another output directory" in error, error
    assert "restore a savepoint of the run that wrote them (--restore PATH)" in error, error
    assert "--restore latest" not in error, error
    assert "--allow-existing-output" in error, error
    assert committed_files(out) == committed


def test_a_restore_into_an_output_directory_without_its_files_is_refused_on_one_line(
    tmp_path: Path,
) -> None:
    out, chk, other = tmp_path / "out", tmp_path / "chk", tmp_path / "other-out"
    finished = run_cli(
        *file_etl_args(out, chk, "--checkpoint-interval", "100ms", "--rest-port", "-1", rate=0)
    )
    assert finished.returncode == 0, finished.stderr
    restored = run_cli(
        *file_etl_args(
            other, chk, "--restore", "latest", "--rest-port", "-1",
            "--restart-strategy", "fixed-delay:3:10ms", rate=0,
        )
    )  # fmt: skip
    assert restored.returncode == 2, restored.stderr
    assert "Traceback" not in restored.stderr, restored.stderr
    [error] = [line for line in restored.stderr.splitlines() if line.startswith("error: ")]
    latest = max_completed(chk)
    assert "two-phase file sink 'committed files'" in error, error
    assert f"checkpoint {latest}" in error and str(other) in error, error
    assert "-chk" in error and ".jsonl" in error, error  # the missing file
    assert "job attempt 1 failed" not in restored.stderr, restored.stderr  # no retry


@pytest.mark.slow
def test_a_later_run_in_another_checkpoint_dir_restores_its_checkpoints_of_abandoned_ids(
    tmp_path: Path,
) -> None:
    """Resumed from a savepoint into a new checkpoint dir, a run numbers its checkpoints from the
    savepoint on, repeating the ids that the rollback manifest lists as abandoned; its own
    checkpoints, taken after that rollback, still restore."""
    out, savepoints = tmp_path / "out", tmp_path / "savepoints"
    first_chk, second_chk = tmp_path / "chk-a", tmp_path / "chk-b"
    first_err, second_err = tmp_path / "first.stderr", tmp_path / "second.stderr"
    first = start_cli(
        first_err,
        *file_etl_args(
            out,
            first_chk,
            "--checkpoint-interval",
            "100ms",
            "--savepoint-dir",
            str(savepoints),
            rate=300,
        ),
    )
    try:
        address = wait_for(
            lambda: read_address(first_chk), "the rest-address file", first, first_err
        )
        wait_for(lambda: max_completed(first_chk) >= 2, "two checkpoints", first, first_err)
        savepoint_id, _ = take_savepoint(address, savepoints)

        def newer_output_committed() -> bool:
            newest_output = max(committed_output_checkpoints(out), default=0)
            return max_completed(first_chk) >= savepoint_id + 3 and newest_output > savepoint_id

        kill_when(newer_output_committed, "newer committed output", first, first_err)
    finally:
        stop_process(first)
    second = start_cli(
        second_err,
        *file_etl_args(
            out, second_chk, "--checkpoint-interval", "100ms", "--restore", str(savepoints),
            rate=300,
        ),
    )  # fmt: skip
    manifest = rolled_back_folder(out, savepoint_id) / ROLLBACK_MANIFEST

    def own_checkpoint_of_an_abandoned_id_committed() -> int | None:
        if not manifest.exists():
            return None
        listed = set(json.loads(manifest.read_text())["abandoned"])
        latest = max_completed(second_chk)
        if latest not in listed:
            return None
        entries = checkpoint_sink_entries(second_chk / f"chk-{latest}", "output")
        return latest if all((out / e["final"]).exists() for e in entries) else None

    repeated = kill_when(
        own_checkpoint_of_an_abandoned_id_committed, "a checkpoint with an abandoned id",
        second, second_err,
    )  # fmt: skip
    recovered = run_cli(
        *file_etl_args(
            out, second_chk, "--restore", "latest", "--rest-port", "-1", rate=0,
        )
    )  # fmt: skip
    assert recovered.returncode == 0, recovered.stderr
    assert f"restoring checkpoint {repeated} from" in recovered.stderr, recovered.stderr
    assert_exact_output(out)
