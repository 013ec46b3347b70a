"""``examples/windowed_counts.py`` through the CLI: window contents and timers are in the
checkpoints, so a SIGKILL in the middle of the job and ``--restore latest`` (at another
parallelism) commit every window's final result exactly once through the two-phase file sink.
"""

from __future__ import annotations

from pathlib import Path

import kafka_fixtures
import pytest
from cli_helpers import (
    ROOT,
    checkpointed_run_args,
    max_completed,
    run_cli,
    set_args,
    start_cli,
    wait_for,
)
from etl_expectations import (
    assert_exact_windowed_counts,
    committed_records,
    expected_windowed_counts,
)
from kafka_fixtures import kafka_etl_args, load_sample_events, unique_name

EXAMPLE = ROOT / "examples" / "windowed_counts.py"
kafka_bootstrap = kafka_fixtures.kafka_bootstrap


def windowed_counts_args(out: Path, chk: Path, parallelism: int, rate: int = 0) -> list[str]:
    return [
        "run",
        str(EXAMPLE),
        *set_args(output=out, rate=rate),
        *checkpointed_run_args(chk),
        "-p",
        str(parallelism),
    ]


def test_windowed_counts_example_commits_each_window_once(tmp_path: Path) -> None:
    out, chk = tmp_path / "out", tmp_path / "chk"
    done = run_cli(*windowed_counts_args(out, chk, 2))
    assert done.returncode == 0, done.stderr
    assert_exact_windowed_counts(out)
    # The bundled events are in order: nothing is late.
    assert committed_records(out / "late") == []


@pytest.mark.slow
def test_sigkill_in_a_windowed_job_then_restore_latest_commits_each_window_once(
    tmp_path: Path,
) -> None:
    out, chk = tmp_path / "out", tmp_path / "chk"
    stderr = tmp_path / "stderr-killed.txt"
    # 1803 purchases of 3000 events at 1000 events/s per source subtask: ~1.5 s of input.
    proc = start_cli(stderr, *windowed_counts_args(out, chk, 2, rate=1000))
    try:
        wait_for(lambda: max_completed(chk) >= 4, "4 completed checkpoints", proc, stderr)
        committed_before = len(committed_records(out))
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9, stderr.read_text()
    assert 0 < committed_before < len(expected_windowed_counts()), "not killed in the middle"
    restored = run_cli(*windowed_counts_args(out, chk, 3))
    assert restored.returncode == 0, restored.stderr
    assert "restoring checkpoint" in restored.stderr
    assert_exact_windowed_counts(out)


@pytest.mark.slow
def test_windowed_counts_from_kafka_commit_each_window_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """From a 4-partition topic at parallelism 2, watermarks per partition: every window's
    result is committed exactly once, nothing is late."""
    topic = unique_name("windowed-events")
    load_sample_events(kafka_bootstrap, topic)
    out, chk = tmp_path / "out", tmp_path / "chk"
    done = run_cli(
        *kafka_etl_args(
            kafka_bootstrap, topic, chk, *set_args(output=out), "-p", "2", example=EXAMPLE.name
        )
    )
    assert done.returncode == 0, done.stderr
    assert_exact_windowed_counts(out)
    assert committed_records(out / "late") == []
