"""Crash recovery through the CLI: SIGKILL the job process (or let an armed crash point end it with
status 137), restart with ``--restore latest``, and the committed output of ``examples/file_etl.py``
is exactly right: per user every purchase number n = 1..k once, with the running totals.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import (
    ROOT,
    RUN_TIMEOUT_S,
    completed_checkpoint_ids,
    max_completed,
    pending_entries,
    run_command,
)
from etl_expectations import assert_exact_output, expected_output

from connectors.files import committed_files
from state.storage import load_checkpoint

EXAMPLE = ROOT / "examples" / "file_etl.py"
EVENTS = ROOT / "examples" / "data" / "events.jsonl"






def etl_command(out: Path, chk: Path, parallelism: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "runtime",
        "run",
        str(EXAMPLE),
        "-p",
        str(parallelism),
        "--set",
        "rate=2000",
        "--set",
        f"output={out}",
        "--checkpoint-dir",
        str(chk),
        "--checkpoint-interval",
        "100ms",
        "--restore",
        "latest",
        "--no-progress",
        "--rest-port",
        "-1",
        *extra,
    ]




def test_expected_output_is_not_trivial() -> None:
    expected = expected_output()
    assert len(expected) > 10
    assert sum(len(v) for v in expected.values()) > 1000


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", [1, 3])
def test_sigkill_at_checkpoints_then_restore_latest_is_exact(
    tmp_path: Path, parallelism: int
) -> None:
    out, chk = tmp_path / "out", tmp_path / "chk"
    command = etl_command(out, chk, parallelism)
    kills = 0
    killed_at: list[int] = []
    for round_ in range(4):
        start = max_completed(chk)
        with open(tmp_path / f"stderr-{round_}.txt", "w") as stderr:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                deadline = time.monotonic() + RUN_TIMEOUT_S
                # A different kill point each round: after 2, 3, 4, 5 new completed checkpoints.
                while proc.poll() is None and max_completed(chk) < start + 2 + round_:
                    assert time.monotonic() < deadline, "no checkpoint progress"
                    time.sleep(0.01)
                if proc.poll() is not None:
                    break  # the job ended before this kill point
                proc.kill()
                proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert proc.returncode == -9, (tmp_path / f"stderr-{round_}.txt").read_text()
        kills += 1
        killed_at.append(max_completed(chk))
        assert killed_at[-1] >= start + 2 + round_
    assert kills >= 2, f"the job ended before being killed twice (kills at {killed_at})"

    final = run_command(command)
    assert final.returncode == 0, final.stderr
    assert re.search(r"restoring checkpoint \d+ from ", final.stderr), final.stderr
    assert_exact_output(out)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", [1, 3])
def test_exit_before_commit_then_restore_commits_the_pending_files(
    tmp_path: Path, parallelism: int
) -> None:
    out, chk = tmp_path / "out", tmp_path / "chk"
    crashed = run_command(
        etl_command(
            out,
            chk,
            parallelism,
            "--set",
            "testing.crash-at=before-commit",
            "--set",
            "testing.crash-mode=exit",
        )
    )
    assert crashed.returncode == 137, crashed.stderr
    assert "injected crash at before-commit" in crashed.stderr
    # The checkpoint completed (its metadata is on disk), but nothing was committed yet.
    completed = completed_checkpoint_ids(chk)
    assert completed, "no checkpoint completed before the crash"
    assert committed_files(out) == []
    checkpoint = load_checkpoint(chk / f"chk-{completed[-1]}")
    sink_state = checkpoint.operators["output"]
    entries = [
        entry
        for subtask in sorted(sink_state.subtask_states)
        for entry in pending_entries(sink_state.subtask_states[subtask])
    ]
    assert entries, "the completed checkpoint names no pending files"
    for entry in entries:
        assert (out / entry["pending"]).exists(), entry

    restored = run_command(etl_command(out, chk, parallelism))
    assert restored.returncode == 0, restored.stderr
    assert f"restoring checkpoint {completed[-1]} from " in restored.stderr
    committed_names = {p.name for p in committed_files(out)}
    for entry in entries:
        assert entry["final"] in committed_names, entry
        assert not (out / entry["pending"]).exists(), entry
    assert_exact_output(out)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", [1, 3])
def test_exit_during_restore_then_clean_restore_is_exact(tmp_path: Path, parallelism: int) -> None:
    out, chk = tmp_path / "out", tmp_path / "chk"
    # First a crash that leaves a completed checkpoint with pending files to restore.
    first = run_command(
        etl_command(
            out,
            chk,
            parallelism,
            "--set",
            "testing.crash-at=before-commit",
            "--set",
            "testing.crash-mode=exit",
        )
    )
    assert first.returncode == 137, first.stderr
    before = completed_checkpoint_ids(chk)
    assert before

    during = run_command(
        etl_command(
            out,
            chk,
            parallelism,
            "--set",
            "testing.crash-at=during-restore",
            "--set",
            "testing.crash-mode=exit",
        )
    )
    assert during.returncode == 137, during.stderr
    assert "injected crash at during-restore" in during.stderr
    assert f"restoring checkpoint {before[-1]} from " in during.stderr
    assert completed_checkpoint_ids(chk) == before  # died before taking any checkpoint
    assert committed_files(out) == []  # and before committing anything

    clean = run_command(etl_command(out, chk, parallelism))
    assert clean.returncode == 0, clean.stderr
    assert f"restoring checkpoint {before[-1]} from " in clean.stderr
    assert_exact_output(out)


@pytest.mark.slow
def test_sigkill_then_restore_at_a_different_parallelism_is_exact(tmp_path: Path) -> None:
    """Killed at parallelism 1, restored from the latest checkpoint at parallelism 3."""
    out, chk = tmp_path / "out", tmp_path / "chk"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            etl_command(out, chk, 1), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while proc.poll() is None and max_completed(chk) < 3:
                assert time.monotonic() < deadline, "no checkpoint progress"
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -9, (tmp_path / "stderr.txt").read_text()
    restored = run_command(etl_command(out, chk, 3))
    assert restored.returncode == 0, restored.stderr
    assert "restoring checkpoint" in restored.stderr
    assert_exact_output(out)


def test_restore_latest_with_an_empty_checkpoint_dir_starts_from_the_beginning(
    tmp_path: Path,
) -> None:
    out, chk = tmp_path / "out", tmp_path / "chk"
    command = etl_command(out, chk, 1)
    command[command.index("rate=2000")] = "rate=0"
    result = run_command(command)
    assert result.returncode == 0, result.stderr
    assert "no valid checkpoint in" in result.stderr
    assert "starting from the beginning" in result.stderr
    assert_exact_output(out)
    assert os.listdir(chk)  # the final checkpoint was written
