"""``examples/kafka_etl.py`` through the CLI: Kafka offsets live in checkpoints, so SIGKILLs followed
by ``--restore latest`` and a savepoint taken at one parallelism and resumed at another all give
exactly the committed output of an uninterrupted run (two-phase-commit file sink): per user every
purchase number n = 1..k once, with the running totals.

The input is ``examples/data/events.jsonl`` loaded with ``examples/load_events.py`` into a topic of
4 partitions (keyed by user, so each user's events keep their order) on the session broker.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kafka_fixtures
import pytest
from cli_helpers import (
    ROOT,
    RUN_TIMEOUT_S,
    checkpointed_run_args,
    max_completed,
    run_command,
    wait_for,
)
from etl_expectations import assert_exact_output, committed_records, expected_output
from kafka_fixtures import load_sample_events, unique_name

from state.storage import CheckpointKind, load_checkpoint

kafka_bootstrap = kafka_fixtures.kafka_bootstrap


EXAMPLE = ROOT / "examples" / "kafka_etl.py"
EVENTS = ROOT / "examples" / "data" / "events.jsonl"


# --------------------------------------------------------------------------- expected output


def total_expected() -> int:
    return sum(len(v) for v in expected_output().values())


# --------------------------------------------------------------------------- processes


def etl_command(
    bootstrap: str,
    topic: str,
    out: Path,
    chk: Path,
    parallelism: int,
    *,
    rate: int,
    bounded: bool,
    restore: str = "latest",
    rest: bool = False,
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "runtime",
        "run",
        str(EXAMPLE),
        "-p",
        str(parallelism),
        "--set",
        f"bootstrap={bootstrap}",
        "--set",
        f"input_topic={topic}",
        "--set",
        f"output={out}",
        "--set",
        f"rate={rate}",
        *checkpointed_run_args(chk, restore, rest),
    ]
    if bounded:
        command += ["--set", "bounded=true"]
    return command










def kill_rounds(command: list[str], chk: Path, tmp_path: Path, rounds: int) -> list[int]:
    """Starts the job ``rounds`` times and SIGKILLs it after 2, 3, 4, ... new completed
    checkpoints. Returns the latest completed checkpoint id at each kill."""
    killed_at: list[int] = []
    for round_ in range(rounds):
        start = max_completed(chk)
        stderr_path = tmp_path / f"stderr-{round_}.txt"
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for(
                lambda start=start, round_=round_: max_completed(chk) >= start + 2 + round_,
                f"{2 + round_} new checkpoints in round {round_}",
                proc,
                stderr_path,
            )
            proc.kill()
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -9, stderr_path.read_text()
        killed_at.append(max_completed(chk))
    return killed_at


# --------------------------------------------------------------------------- tests


def test_expected_output_is_not_trivial() -> None:
    expected = expected_output()
    assert len(expected) > 10
    assert total_expected() > 1000


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", [1, 3])
def test_sigkill_rounds_then_restore_latest_commits_exactly_once(
    kafka_bootstrap: str, tmp_path: Path, parallelism: int
) -> None:
    """Bounded runs throttled to 300 records/s per source subtask, SIGKILLed three times after new
    checkpoints; then a run restoring the latest checkpoint ends with the exact output."""
    topic = unique_name("etl-in")
    load_sample_events(kafka_bootstrap, topic)
    out, chk = tmp_path / "out", tmp_path / "chk"
    throttled = etl_command(kafka_bootstrap, topic, out, chk, parallelism, rate=300, bounded=True)
    killed_at = kill_rounds(throttled, chk, tmp_path, rounds=3)
    assert killed_at == sorted(killed_at)
    # Killed in the middle: part of the output was committed, not all.
    assert 0 < len(committed_records(out)) < total_expected()

    final = run_command(etl_command(kafka_bootstrap, topic, out, chk, parallelism, rate=0, bounded=True))
    assert final.returncode == 0, final.stderr
    assert f"restoring checkpoint {killed_at[-1]} from " in final.stderr, final.stderr
    assert_exact_output(out)


@pytest.mark.slow
def test_unbounded_runs_killed_then_a_bounded_restore_ends_with_exact_output(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The kill rounds run unbounded (no stop offsets in their checkpoints); the last run restores
    the latest checkpoint with ``bounded=true``: it must read to the end offsets and end, with
    every record processed exactly once."""
    topic = unique_name("etl-in")
    load_sample_events(kafka_bootstrap, topic)
    out, chk = tmp_path / "out", tmp_path / "chk"
    throttled = etl_command(kafka_bootstrap, topic, out, chk, 3, rate=300, bounded=False)
    killed_at = kill_rounds(throttled, chk, tmp_path, rounds=2)
    assert 0 < len(committed_records(out)) < total_expected()

    try:
        final = run_command(
            etl_command(kafka_bootstrap, topic, out, chk, 3, rate=0, bounded=True), timeout=20.0
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            "the bounded run restored from an unbounded run's checkpoint did not end within 20s "
            f"(3000 events): {exc.stderr!r}"
        )
    assert final.returncode == 0, final.stderr
    assert f"restoring checkpoint {killed_at[-1]} from " in final.stderr, final.stderr
    assert_exact_output(out)


@pytest.mark.slow
def test_savepoint_at_parallelism_2_resumed_at_3_reads_every_partition_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_name("etl-in")
    load_sample_events(kafka_bootstrap, topic)
    out, chk, sp = tmp_path / "out", tmp_path / "chk", tmp_path / "savepoints"
    stderr_path = tmp_path / "stderr-p2.txt"
    command = etl_command(
        kafka_bootstrap, topic, out, chk, 2, rate=300, bounded=True, restore="latest", rest=True
    )
    command += ["--savepoint-dir", str(sp)]
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        address_file = chk / "rest-address"
        wait_for(address_file.exists, "the rest-address file", proc, stderr_path)
        address = address_file.read_text().strip()
        wait_for(lambda: max_completed(chk) >= 3, "three completed checkpoints", proc, stderr_path)
        stop = run_command(
            [sys.executable, "-m", "runtime", "stop", "--address", address, "--dir", str(sp)]
        )
        assert stop.returncode == 0, stop.stderr
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert returncode == 0, stderr_path.read_text()
    match = re.search(r"stopped with savepoint (\d+) at (.+)", stop.stdout)
    assert match, stop.stdout
    savepoint = Path(match.group(2).strip())
    checkpoint = load_checkpoint(savepoint)
    assert checkpoint.kind is CheckpointKind.SAVEPOINT
    assert checkpoint.operators["kafka-events"].parallelism == 2
    # Stopped in the middle: part of the output is committed, not all of it.
    assert 0 < len(committed_records(out)) < total_expected()

    resumed = run_command(
        etl_command(
            kafka_bootstrap,
            topic,
            out,
            tmp_path / "chk-p3",
            3,
            rate=0,
            bounded=True,
            restore=str(savepoint),
        )
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"restoring savepoint {checkpoint.checkpoint_id} from " in resumed.stderr
    assert_exact_output(out)
