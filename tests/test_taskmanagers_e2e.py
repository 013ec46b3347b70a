"""``python -m runtime run --taskmanagers N`` end to end: the job process is the JobManager, its
subtasks run on N TaskManager processes, and what users rely on holds across them.

- SIGKILL of the whole job (the JobManager) with 2 TaskManagers takes the TaskManagers with it, and
  ``--restore latest`` on 1 (no TaskManager process) or 3 TaskManagers, at another parallelism,
  commits the file ETL's output exactly once.
- A TaskManager lost while the job master waits for the cancel of a failed attempt's tasks on it
  ends that wait at once.
- The Kafka ETL (4 partitions) on 2 TaskManagers, bounded, uninterrupted or with the JobManager
  killed once, commits exactly once through the two-phase file sink.
- A stop with savepoint on 2 TaskManagers (``/stop`` or SIGTERM) resumes on 1 TaskManager at
  another parallelism exactly once.
- Backpressure crosses processes: a sink subtask held in another TaskManager holds its source back
  within the records that credits and buffer sizes allow.

Exactly once is checked against a plain computation over the input (``etl_expectations``): per user
every purchase number 1..k once, with its running total.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import kafka_fixtures
import pytest
from cli_helpers import (
    ROOT,
    RUN_TIMEOUT_S,
    file_etl_args,
    get_json,
    job_on_taskmanagers,
    kill_leftover_taskmanagers,
    kill_when,
    max_completed,
    operator_records_in,
    operator_records_out,
    printed_address,
    run_cli,
    set_args,
    start_cli,
    status_tasks,
    stderr_contains,
    stop_process,
    stop_with_savepoint,
    task_placement,
    wait_for,
    wait_until_gone,
)
from etl_expectations import assert_exact_output, committed_records, expected_output
from kafka_fixtures import kafka_etl_args, load_sample_events, unique_name

from actors.network import DEFAULT_SENDER_QUEUE
from runtime.api.sources import DEFAULT_SOURCE_BATCH
from runtime.config import ExecutionConfig
from state.storage import CheckpointKind, load_checkpoint

kafka_bootstrap = kafka_fixtures.kafka_bootstrap

HELD_JOB = ROOT / "tests" / "jobs" / "held_across_processes.py"
NO_ORPHANS_S = 5.0
"""How long TaskManagers may outlive their JobManager ("a few seconds", issue 9)."""


@pytest.fixture
def taskmanager_pids() -> Iterator[list[int]]:
    """Where a test records the pids of the TaskManagers it made start; any of them that still
    runs at the end is killed, so a failed no-orphans check leaves no process behind."""
    pids: list[int] = []
    yield pids
    kill_leftover_taskmanagers(pids)


def total_expected() -> int:
    return sum(len(rows) for rows in expected_output().values())


def kill_jobmanager_mid_run(
    proc: subprocess.Popen[bytes],
    stderr: Path,
    chk: Path,
    out: Path,
    pids: list[int],
    checkpoints: int,
) -> int:
    """SIGKILLs the job ``proc`` once ``checkpoints`` checkpoints completed and output was
    committed, checks that its TaskManagers (``pids``) exit within :data:`NO_ORPHANS_S` and that
    only part of the output is committed; returns the latest completed checkpoint's id."""
    kill_when(
        lambda: max_completed(chk) >= checkpoints and committed_records(out),
        f"{checkpoints} completed checkpoints and committed output",
        proc,
        stderr,
    )
    assert proc.returncode == -signal.SIGKILL, stderr.read_text()
    # No orphans: the TaskManagers notice their JobManager is gone and exit.
    wait_until_gone(pids, "the TaskManagers of the killed job", timeout=NO_ORPHANS_S)
    # Killed in the middle: part of the output is committed, not all of it.
    assert 0 < len(committed_records(out)) < total_expected()
    return max_completed(chk)


# --------------------------------------------------------------------------- JobManager killed


@pytest.mark.slow
@pytest.mark.parametrize(("taskmanagers", "parallelism"), [(1, 2), (3, 3)])
def test_sigkill_of_the_jobmanager_takes_its_taskmanagers_and_restore_latest_is_exact(
    tmp_path: Path, taskmanager_pids: list[int], taskmanagers: int, parallelism: int
) -> None:
    out, chk, stderr = tmp_path / "out", tmp_path / "chk", tmp_path / "job.stderr"
    proc = start_cli(
        stderr,
        *file_etl_args(out, chk, "-p", "2", "--taskmanagers", "2", rate=1000, rest=True),
    )
    try:
        job_on_taskmanagers(proc, stderr, 2, taskmanager_pids)
        killed_at = kill_jobmanager_mid_run(proc, stderr, chk, out, taskmanager_pids, 2)
    finally:
        stop_process(proc)

    # The restored run is throttled too, so that its placement can be seen while it runs.
    restored_stderr = tmp_path / "restored.stderr"
    extra = ("-p", str(parallelism), "--taskmanagers", str(taskmanagers))
    proc = start_cli(restored_stderr, *file_etl_args(out, chk, *extra, rate=1000, rest=True))
    try:
        if taskmanagers > 1:
            job_on_taskmanagers(proc, restored_stderr, taskmanagers, taskmanager_pids)
        else:
            address = wait_for(
                lambda: printed_address(restored_stderr),
                "the control endpoint",
                proc,
                restored_stderr,
            )
            status = get_json(address, "/status")
            assert status["taskmanagers"] == [], status
            assert all(task["taskmanager"] is None for task in status["tasks"]), status
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop_process(proc)
    text = restored_stderr.read_text()
    assert returncode == 0, text
    assert f"restoring checkpoint {killed_at} from " in text, text
    wait_until_gone(taskmanager_pids, "the TaskManagers of the ended job", timeout=NO_ORPHANS_S)
    assert_exact_output(out)


# --------------------------------------------------------------------------- TaskManagers lost


@pytest.mark.slow
def test_a_taskmanager_lost_while_the_failed_attempt_is_cancelled_ends_the_attempt_at_once(
    tmp_path: Path, taskmanager_pids: list[int]
) -> None:
    out, chk, stderr = tmp_path / "out", tmp_path / "chk", tmp_path / "job.stderr"
    restarts = ("--restart-strategy", "fixed-delay:3:100ms")
    proc = start_cli(
        stderr,
        *file_etl_args(out, chk, "-p", "2", "--taskmanagers", "2", *restarts, rate=1000, rest=True),
    )
    try:
        _, (first, second) = job_on_taskmanagers(proc, stderr, 2, taskmanager_pids)
        wait_for(lambda: max_completed(chk) >= 1, "a completed checkpoint", proc, stderr)
        # The second cannot answer the cancel of its tasks that follows the first one's loss, so
        # the job master waits for them; then the second dies too.
        os.kill(second["pid"], signal.SIGSTOP)
        os.kill(first["pid"], signal.SIGKILL)
        wait_for(
            lambda: stderr_contains(stderr, f"TaskManager {first['id']} (pid {first['pid']}) lost"),
            f"the loss of {first['id']}",
            proc,
            stderr,
        )
        os.kill(second["pid"], signal.SIGKILL)
        wait_for(
            lambda: stderr_contains(stderr, "job attempt 1 failed"), "the failover", proc, stderr
        )
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop_process(proc)
    # The loss of the second ended the wait for its tasks' cancel: it never timed out.
    assert "of their cancel; killing it" not in stderr.read_text()
    assert returncode == 0, stderr.read_text()
    assert_exact_output(out)


# --------------------------------------------------------------------------- Kafka ETL


def kafka_sources_on_two_taskmanagers(address: str) -> None:
    """The Kafka source's two subtasks (two partitions each) run on two TaskManagers."""
    sources = {
        task["name"]: task["taskmanager"]
        for task in status_tasks(address)
        if "Kafka events" in task["name"]
    }
    assert len(sources) == 2, sources
    assert len(set(sources.values())) == 2, f"the source subtasks share a TaskManager: {sources}"


def kafka_etl_on_two_taskmanagers(
    bootstrap: str, topic: str, out: Path, chk: Path, *extra: str, rest: bool = False
) -> list[str]:
    """:func:`kafka_etl_args` of the bounded ETL from ``topic`` into the two-phase file sink in
    ``out``, at parallelism 2 on 2 TaskManagers, checkpoints every 100ms in ``chk``."""
    return kafka_etl_args(
        bootstrap,
        topic,
        chk,
        *set_args(output=out),
        *("-p", "2", "--taskmanagers", "2", "--checkpoint-interval", "100ms"),
        *extra,
        rest=rest,
    )


@pytest.mark.slow
def test_kafka_etl_of_four_partitions_on_two_taskmanagers_commits_exactly_once(
    kafka_bootstrap: str, tmp_path: Path, taskmanager_pids: list[int]
) -> None:
    topic = unique_name("tm-etl-in")
    load_sample_events(kafka_bootstrap, topic, partitions=4)
    out, chk, stderr = tmp_path / "out", tmp_path / "chk", tmp_path / "job.stderr"
    args = kafka_etl_on_two_taskmanagers(
        kafka_bootstrap, topic, out, chk, *set_args(rate=500), rest=True
    )
    proc = start_cli(stderr, *args)
    try:
        address, _ = job_on_taskmanagers(proc, stderr, 2, taskmanager_pids)
        kafka_sources_on_two_taskmanagers(address)
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop_process(proc)
    assert returncode == 0, stderr.read_text()
    # Periodic checkpoints completed across the processes before the final one.
    assert max_completed(chk) >= 2
    wait_until_gone(taskmanager_pids, "the TaskManagers of the ended job", timeout=NO_ORPHANS_S)
    assert_exact_output(out)


@pytest.mark.slow
def test_kafka_etl_on_two_taskmanagers_killed_then_restored_commits_exactly_once(
    kafka_bootstrap: str, tmp_path: Path, taskmanager_pids: list[int]
) -> None:
    topic = unique_name("tm-etl-in")
    load_sample_events(kafka_bootstrap, topic, partitions=4)
    out, chk, stderr = tmp_path / "out", tmp_path / "chk", tmp_path / "job.stderr"

    def etl(*extra: str, rest: bool = False) -> list[str]:
        return kafka_etl_on_two_taskmanagers(kafka_bootstrap, topic, out, chk, *extra, rest=rest)

    proc = start_cli(stderr, *etl(*set_args(rate=300), rest=True))
    try:
        address, _ = job_on_taskmanagers(proc, stderr, 2, taskmanager_pids)
        kafka_sources_on_two_taskmanagers(address)
        killed_at = kill_jobmanager_mid_run(proc, stderr, chk, out, taskmanager_pids, 3)
    finally:
        stop_process(proc)

    restored = run_cli(*etl())
    assert restored.returncode == 0, restored.stderr
    assert f"restoring checkpoint {killed_at} from " in restored.stderr, restored.stderr
    assert_exact_output(out)


# --------------------------------------------------------------------------- stop with savepoint


@pytest.mark.slow
@pytest.mark.parametrize("how", ["rest", "sigterm"])
def test_stop_with_savepoint_on_two_taskmanagers_resumes_on_one_at_another_parallelism(
    tmp_path: Path, taskmanager_pids: list[int], how: str
) -> None:
    out, chk, stderr = tmp_path / "out", tmp_path / "chk", tmp_path / "job.stderr"
    proc = start_cli(
        stderr,
        *file_etl_args(out, chk, "-p", "2", "--taskmanagers", "2", rate=1000, rest=True),
        *(("--savepoint-dir", str(tmp_path / "savepoints")) if how == "rest" else ()),
    )
    try:
        address, _ = job_on_taskmanagers(proc, stderr, 2, taskmanager_pids)
        wait_for(
            lambda: operator_records_in(address, "running-totals") >= 200, "progress", proc, stderr
        )
        if how == "rest":
            savepoint = stop_with_savepoint(address, tmp_path / "savepoints")
            returncode = proc.wait(timeout=RUN_TIMEOUT_S)
        else:
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=RUN_TIMEOUT_S)
            match = re.search(
                r"stopped with savepoint (\S+); resume with --restore", stderr.read_text()
            )
            assert match, stderr.read_text()
            savepoint = Path(match.group(1))
    finally:
        stop_process(proc)
    assert returncode == 0, stderr.read_text()
    assert "Traceback" not in stderr.read_text()
    wait_until_gone(taskmanager_pids, "the TaskManagers of the stopped job", timeout=NO_ORPHANS_S)
    checkpoint = load_checkpoint(savepoint)
    assert checkpoint.kind is CheckpointKind.SAVEPOINT
    assert checkpoint.operators["running-totals"].parallelism == 2
    # Stopped in the middle: part of the output is committed, not all of it.
    assert 0 < len(committed_records(out)) < total_expected()

    resumed = run_cli(
        *file_etl_args(out, chk, "-p", "3", "--taskmanagers", "1", restore=str(savepoint))
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"restoring savepoint {checkpoint.checkpoint_id} from " in resumed.stderr
    assert_exact_output(out)


# --------------------------------------------------------------------------- backpressure


def source_lead_bound(fan_out: int) -> int:
    """The most records a source may have emitted while one of its ``fan_out`` round-robin
    channels delivers nothing: per channel, a buffer for every credit the receiver can grant (its
    exclusive credits and all floating buffers of its gate), the sender's queue, the buffer the
    receiving task holds and the writer's partial buffer; round robin gives each channel as much;
    plus the batch the source counts before it emits it."""
    config = ExecutionConfig()
    buffers_per_channel = config.exclusive_credits + config.floating_buffers
    buffers_per_channel += DEFAULT_SENDER_QUEUE + 2
    return fan_out * buffers_per_channel * config.buffer_size + DEFAULT_SOURCE_BATCH


@pytest.mark.slow
def test_a_sink_held_in_another_taskmanager_holds_its_source_back_within_the_credits(
    tmp_path: Path, taskmanager_pids: list[int]
) -> None:
    markers, stderr = tmp_path / "markers", tmp_path / "job.stderr"
    markers.mkdir()
    bound = source_lead_bound(fan_out=2)
    records = 10 * bound
    proc = start_cli(
        stderr,
        "run",
        str(HELD_JOB),
        "-p",
        "2",
        "--taskmanagers",
        "2",
        "--set",
        f"markers={markers}",
        "--set",
        f"records={records}",
        "--set",
        f"clock_records={2 * records}",
        "--no-progress",
        "--rest-port",
        "0",
    )
    try:
        address, deployed = job_on_taskmanagers(proc, stderr, 2, taskmanager_pids)
        placement = task_placement(address)
        source_tm = placement["numbers (1/1)"]
        sinks = {name: tm for name, tm in placement.items() if name.startswith("held ")}
        assert set(sinks.values()) == {tm["id"] for tm in deployed}, (
            f"the held sink's subtasks must run on both TaskManagers: {placement}"
        )
        remote_sink = next(name for name, tm in sinks.items() if tm != source_tm)
        remote_index = int(remote_sink.removeprefix("held (").split("/")[0]) - 1
        clocks = [n for n, tm in placement.items() if n.startswith("clock") and tm == source_tm]
        assert clocks, f"no clock subtask beside the source: {placement}"

        wait_for(
            lambda: (markers / f"holding-{remote_index}").exists(),
            f"{remote_sink} holding a write of records from the other process",
            proc,
            stderr,
        )
        # The clock beside the source ran to its end (and its TaskManager reported it): a source
        # that nothing held back would have emitted about as many records in the meantime (the
        # tasks of a TaskManager take turns, one buffer each), ten times the bound.
        wait_for(
            lambda: operator_records_out(address, "clock") == 2 * records,
            f"the clock at its end (one subtask beside the source: {clocks[0]})",
            proc,
            stderr,
        )
        emitted = operator_records_out(address, "numbers")
        assert 0 < emitted <= bound, (
            f"the source emitted {emitted} records while {remote_sink} in another TaskManager "
            f"took none; credits and buffer sizes allow at most {bound}"
        )

        (markers / "release").touch()
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop_process(proc)
    assert returncode == 0, stderr.read_text()
    # Only the channel that crosses processes was held, and after the release every record
    # arrived exactly once.
    assert [p.name for p in markers.glob("holding-*")] == [f"holding-{remote_index}"]
    written = sorted(
        int(line) for path in markers.glob("out-*.txt") for line in path.read_text().split()
    )
    assert written == list(range(records))
    wait_until_gone(taskmanager_pids, "the TaskManagers of the ended job", timeout=NO_ORPHANS_S)
