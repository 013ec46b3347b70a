"""SIGTERM to ``python -m runtime run`` (docker stop, Kubernetes, systemd): with checkpointing the
job stops with a savepoint into its checkpoint directory and exits 0, resumable exactly there;
without, it is cancelled gracefully (``close()`` everywhere, sinks flushed, no ``finish()``) and
exits 143; a second SIGTERM or the ``--shutdown-timeout`` forces the exit (143).
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import kafka_fixtures
import orjson
import pytest
from aiokafka import TopicPartition
from cli_helpers import (
    RUN_TIMEOUT_S,
    WAIT_S,
    operator_records_in,
    printed_address,
    read_address,
    registry_entry,
    run_cli,
    start_cli,
    stderr_contains,
    stop_process,
    wait_for,
)
from etl_expectations import assert_exact_output, committed_records, expected_output
from kafka_fixtures import create_topics, load_sample_events, unique_name
from loop_helpers import wait_until
from test_kafka_sink import as_row, read_until, topic_consumer

from connectors import CollectionSource
from runtime import Job, JobFailedError, RuntimeContext
from runtime.api.sinks import Sink, SinkWriter
from runtime.master.jobmaster import JobMaster
from runtime.shell.runner import build_graph
from state.storage import load_checkpoint

kafka_bootstrap = kafka_fixtures.kafka_bootstrap

ROOT = Path(__file__).resolve().parents[1]
FILE_ETL = ROOT / "examples" / "file_etl.py"
KAFKA_ETL = ROOT / "examples" / "kafka_etl.py"
EXIT_TERMINATED = 143
Start = Callable[..., subprocess.Popen[bytes]]

TRACKED_LINES_JOB = '''
from pathlib import Path

from connectors import GeneratorSource, JsonLinesFileSink
from runtime import MapFunction


class Tracker(MapFunction):
    """Leaves a marker file for open(), finish() and close()."""

    def __init__(self, markers):
        self.markers = markers

    def open(self, ctx):
        Path(self.markers, "open").touch()

    def map(self, value):
        return value

    def finish(self):
        Path(self.markers, "finish").touch()

    def close(self):
        Path(self.markers, "close").touch()


def build(job):
    (
        job.from_source(GeneratorSource(lambda i: {"i": i}, rate=300))
        .uid("gen")
        .map(Tracker(job.params["markers"]), name="tracker")
        .uid("tracker")
        .sink_to(JsonLinesFileSink(job.params["output"]), name="lines")
        .uid("lines")
    )
'''

HANGING_CLOSE_JOB = '''
import asyncio
import time
from pathlib import Path

from connectors import GeneratorSource, JsonLinesFileSink
from runtime.api.sinks import Sink, SinkWriter


class HangingSink(Sink):
    """A sink whose close() never returns: awaiting forever ("async") or blocking the loop."""

    def __init__(self, markers, how):
        self.markers = markers
        self.how = how

    def create_writer(self, context):
        return HangingWriter(self.markers, self.how)


class HangingWriter(SinkWriter):
    def __init__(self, markers, how):
        self.markers = markers
        self.how = how

    async def write(self, values):
        pass

    async def close(self):
        Path(self.markers, "closing").touch()
        if self.how == "sync":
            time.sleep(3600)
        else:
            await asyncio.Event().wait()


def build(job):
    events = job.from_source(GeneratorSource(lambda i: {"i": i}, rate=300)).uid("gen")
    events.sink_to(JsonLinesFileSink(job.params["output"]), name="lines").uid("lines")
    (
        events.sink_to(HangingSink(job.params["markers"], job.params["hang"]), name="hanging")
        .uid("hanging")
        .disable_chaining()
    )
'''

FAILING_SAVEPOINT_JOB = '''
from connectors import GeneratorSource, JsonLinesFileSink
from runtime.api.sinks import Sink, SinkWriter


class UnsnapshottableSink(Sink):
    def create_writer(self, context):
        return UnsnapshottableWriter()


class UnsnapshottableWriter(SinkWriter):
    async def write(self, values):
        pass

    async def snapshot_state(self, checkpoint_id):
        raise RuntimeError(f"this sink cannot take snapshot {checkpoint_id}")


def build(job):
    events = job.from_source(GeneratorSource(lambda i: {"i": i}, rate=300)).uid("gen")
    events.sink_to(JsonLinesFileSink(job.params["output"]), name="lines").uid("lines")
    events.sink_to(UnsnapshottableSink(), name="unsnapshottable").uid("unsnapshottable")
'''


@pytest.fixture
def start() -> Iterator[Start]:
    """``start_cli`` whose processes are killed at the end of the test, whatever happened."""
    started: list[subprocess.Popen[bytes]] = []

    def start_job(stderr: Path, *args: str) -> subprocess.Popen[bytes]:
        proc = start_cli(stderr, *args)
        started.append(proc)
        return proc

    yield start_job
    for proc in started:
        stop_process(proc)


def _start_job(tmp_path: Path, start: Start, job_text: str, *extra: str) -> subprocess.Popen[bytes]:
    """Run ``job_text`` with ``markers=tmp_path/markers``, ``output=tmp_path/out.jsonl`` and a
    control endpoint, its stderr going to ``tmp_path/job.stderr``."""
    job = tmp_path / "job.py"
    job.write_text(job_text)
    (tmp_path / "markers").mkdir()
    return start(
        tmp_path / "job.stderr",
        "run",
        str(job),
        "--set",
        f"markers={tmp_path / 'markers'}",
        "--set",
        f"output={tmp_path / 'out.jsonl'}",
        "--rest-port",
        "0",
        "--no-progress",
        *extra,
    )


def _json_lines(path: Path) -> list[int]:
    return [orjson.loads(line)["i"] for line in path.read_bytes().splitlines()]


def _terminate(proc: subprocess.Popen[bytes], stderr: Path) -> tuple[int, str]:
    """SIGTERM ``proc``; its exit code and stderr once it has ended."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=RUN_TIMEOUT_S), stderr.read_text()


def _wait_for_sink_records(
    proc: subprocess.Popen[bytes], stderr: Path, uid: str, at_least: int
) -> int:
    """Wait until sink ``uid`` received ``at_least`` records (the job runs without a checkpoint
    directory, so its address comes from its start-up line); returns the count seen."""
    address = wait_for(lambda: printed_address(stderr), "the control endpoint line", proc, stderr)
    return int(
        wait_for(
            lambda: (n := operator_records_in(address, uid)) >= at_least and n,
            f"{at_least} records at {uid}",
            proc,
            stderr,
        )
    )


def test_sigterm_without_checkpointing_closes_everything_and_flushes_the_sink(
    tmp_path: Path, start: Start
) -> None:
    markers, out, stderr = tmp_path / "markers", tmp_path / "out.jsonl", tmp_path / "job.stderr"
    proc = _start_job(tmp_path, start, TRACKED_LINES_JOB)
    seen = _wait_for_sink_records(proc, stderr, "lines", 50)
    returncode, text = _terminate(proc, stderr)

    assert returncode == EXIT_TERMINATED, text
    assert "Traceback" not in text
    assert "SIGTERM" in text and "cancel" in text
    # Every record the sink received is on disk, in order, as whole lines.
    written = _json_lines(out)
    assert len(written) >= seen > 0
    assert written == list(range(len(written)))
    # A cancel closes every operator and finishes none.
    assert (markers / "close").exists()
    assert not (markers / "finish").exists()


@pytest.mark.slow
@pytest.mark.parametrize("restore", ["path", "latest"])
def test_sigterm_with_checkpointing_stops_with_a_savepoint_that_resumes_exactly(
    tmp_path: Path, start: Start, restore: str
) -> None:
    out, chk, stderr = tmp_path / "out", tmp_path / "chk", tmp_path / "job.stderr"
    etl = ["run", str(FILE_ETL), "--set", f"output={out}", "--no-progress"]
    proc = start(
        stderr,
        *etl,
        "--set",
        "rate=1000",
        "--checkpoint-interval",
        "100ms",
        "--checkpoint-dir",
        str(chk),
        "--rest-port",
        "0",
    )
    address = wait_for(lambda: read_address(chk), "the rest-address file", proc, stderr)
    wait_for(
        lambda: operator_records_in(address, "running-totals") >= 200, "progress", proc, stderr
    )
    returncode, text = _terminate(proc, stderr)

    assert returncode == 0, text
    assert "Traceback" not in text
    match = re.search(r"stopped with savepoint (\S+); resume with --restore (\S+)", text)
    assert match, text
    assert match.group(1) == match.group(2)
    savepoint = Path(match.group(1))
    assert savepoint.parent == chk / "savepoints"
    assert (savepoint / "_metadata").exists()
    # It stopped in the middle: only part of the output is committed so far.
    total = sum(len(rows) for rows in expected_output().values())
    assert 0 < len(committed_records(out)) < total

    # By its path, or as a restart loop would: "latest" is the savepoint, newer than every
    # checkpoint (resuming from the latest checkpoint would replay what the savepoint committed).
    target = str(savepoint) if restore == "path" else "latest"
    resumed = run_cli(*etl, "--restore", target, "--checkpoint-dir", str(chk))
    assert resumed.returncode == 0, resumed.stderr
    assert f"restoring savepoint {load_checkpoint(savepoint).checkpoint_id} from " in resumed.stderr
    assert_exact_output(out)


async def _wait_until_every_transaction_ended(
    bootstrap: str, partitions: list[TopicPartition], job_log: str
) -> None:
    """Until the last stable offsets (read_committed) reach the high watermarks: no transaction
    is open. Commit markers are written after the commit returns, so this is polled. ``job_log``
    (the job's stderr) goes into the failure message."""
    topic = partitions[0].topic
    deadline = time.monotonic() + WAIT_S
    async with (
        topic_consumer(bootstrap, topic, len(partitions), "read_uncommitted") as uncommitted,
        topic_consumer(bootstrap, topic, len(partitions), "read_committed") as committed,
    ):
        while True:
            ends = await uncommitted.end_offsets(partitions)
            stable = await committed.end_offsets(partitions)
            if stable == ends:
                return
            assert time.monotonic() < deadline, (
                f"open transactions: {stable=} {ends=}; the job's log:\n{job_log}"
            )
            await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_sigterm_with_the_exactly_once_kafka_sink_commits_and_leaves_no_transaction_open(
    kafka_bootstrap: str, tmp_path: Path, start: Start
) -> None:
    source, output = unique_name("sigterm-in"), unique_name("sigterm-out")
    load_sample_events(kafka_bootstrap, source)
    await create_topics(kafka_bootstrap, output, partitions=4)
    partitions = [TopicPartition(output, p) for p in range(4)]
    chk, stderr = tmp_path / "chk", tmp_path / "job.stderr"
    # Two sink subtasks commit on the same checkpoint notice: the dev broker needs them one at a
    # time (connectors.kafka.exactly_once.transaction_ends_one_at_a_time).
    etl = [
        "run",
        str(KAFKA_ETL),
        "-p",
        "2",
        "--set",
        f"bootstrap={kafka_bootstrap}",
        "--set",
        f"input_topic={source}",
        "--set",
        f"output_topic={output}",
        "--set",
        "guarantee=exactly-once",
        "--set",
        f"transactional_id={unique_name('sigterm-etl')}",
        "--set",
        "bounded=true",
        "--checkpoint-interval",
        "100ms",
        "--checkpoint-dir",
        str(chk),
        "--no-progress",
    ]
    # INFO: if a transaction stays open, the failure message shows each checkpoint and commit.
    proc = start(stderr, *etl, "--set", "rate=300", "--rest-port", "0", "--log-level", "INFO")
    address = wait_for(lambda: read_address(chk), "the rest-address file", proc, stderr)
    wait_for(
        lambda: operator_records_in(address, "kafka-totals") >= 200,
        "output in transactions",
        proc,
        stderr,
    )
    returncode, text = _terminate(proc, stderr)

    assert returncode == 0, text
    match = re.search(r"stopped with savepoint (\S+); resume with --restore", text)
    assert match, text
    expected = {
        (user, n, total) for user, rows in expected_output().items() for n, total in rows
    }
    # Nothing is left in an open transaction: every record written is committed, and it is only
    # part of the output.
    await _wait_until_every_transaction_ended(kafka_bootstrap, partitions, text)
    async with topic_consumer(kafka_bootstrap, output, 4, "read_committed") as committed:
        before = [
            as_row(r.value)
            for r in await read_until(committed, bool, "the output committed by the stop")
        ]
    assert 0 < len(before) < len(expected)
    assert len(set(before)) == len(before) and set(before) <= expected

    # Its savepoint holds the sink's state: resuming from it is what the file-sink test above
    # checks end to end.
    assert "kafka-totals" in load_checkpoint(match.group(1)).operators


def test_sigterm_falls_back_to_a_graceful_cancel_when_the_savepoint_fails(
    tmp_path: Path, start: Start
) -> None:
    out, chk, stderr = tmp_path / "out.jsonl", tmp_path / "chk", tmp_path / "job.stderr"
    proc = _start_job(tmp_path, start, FAILING_SAVEPOINT_JOB, "--checkpoint-dir", str(chk))
    address = wait_for(lambda: read_address(chk), "the rest-address file", proc, stderr)
    wait_for(
        lambda: operator_records_in(address, "lines") >= 50, "records at the sink", proc, stderr
    )
    returncode, text = _terminate(proc, stderr)

    assert returncode == EXIT_TERMINATED, text
    assert "Traceback" not in text
    assert "this sink cannot take snapshot" in text
    assert "cancel" in text
    assert not list(chk.glob("savepoints/*/_metadata"))
    written = _json_lines(out)
    assert written and written == list(range(len(written))), text


def test_sigterm_with_an_interval_but_no_checkpoint_dir_cancels_and_says_why(
    tmp_path: Path, start: Start
) -> None:
    markers, out, stderr = tmp_path / "markers", tmp_path / "out.jsonl", tmp_path / "job.stderr"
    proc = _start_job(tmp_path, start, TRACKED_LINES_JOB, "--checkpoint-interval", "100ms")
    seen = _wait_for_sink_records(proc, stderr, "lines", 50)
    returncode, text = _terminate(proc, stderr)

    assert returncode == EXIT_TERMINATED, text
    assert "--checkpoint-dir" in text
    assert len(_json_lines(out)) >= seen
    assert (markers / "close").exists()


def _start_hanging(
    tmp_path: Path, start: Start, hang: str, *extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    proc = _start_job(tmp_path, start, HANGING_CLOSE_JOB, "--set", f"hang={hang}", *extra)
    stderr = tmp_path / "job.stderr"
    _wait_for_sink_records(proc, stderr, "hanging", 20)
    return proc, stderr


def test_a_second_sigterm_forces_the_exit_while_close_hangs(tmp_path: Path, start: Start) -> None:
    proc, stderr = _start_hanging(tmp_path, start, "async")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: (tmp_path / "markers" / "closing").exists(), "close()", proc, stderr)
    returncode, text = _terminate(proc, stderr)

    assert returncode == EXIT_TERMINATED, text
    assert "second SIGTERM" in text
    assert "Traceback" not in text
    # The sink that could close did: its lines are on disk.
    written = _json_lines(tmp_path / "out.jsonl")
    assert written and written == list(range(len(written))), text


@pytest.mark.parametrize("hang", ["async", "sync"])
def test_the_shutdown_timeout_forces_the_exit_while_close_hangs(
    tmp_path: Path, start: Start, hang: str
) -> None:
    proc, stderr = _start_hanging(tmp_path, start, hang, "--shutdown-timeout", "1s")
    returncode, text = _terminate(proc, stderr)

    assert returncode == EXIT_TERMINATED, text
    assert (tmp_path / "markers" / "closing").exists()
    assert "shutdown timeout of 1s" in text
    assert "Traceback" not in text
    assert not registry_entry(proc.pid).exists()  # the forced exit took the job off the list


def test_sigint_still_exits_130(tmp_path: Path, start: Start) -> None:
    stderr = tmp_path / "job.stderr"
    proc = _start_job(tmp_path, start, TRACKED_LINES_JOB)
    _wait_for_sink_records(proc, stderr, "lines", 20)
    proc.send_signal(signal.SIGINT)
    returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    assert returncode == 130, stderr.read_text()
    assert stderr_contains(stderr, "Ctrl-C")


class _HeldClose(Sink):
    """A sink whose close() takes as long as the test holds it (as a flush in a thread does)."""

    def __init__(self) -> None:
        self.close_started = False
        self.closed = False
        self.release = asyncio.Event()

    def create_writer(self, context: RuntimeContext) -> SinkWriter:
        return _HeldCloseWriter(self)


class _HeldCloseWriter(SinkWriter):
    def __init__(self, sink: _HeldClose) -> None:
        self.sink = sink

    async def write(self, values: list[object]) -> None:
        pass

    async def close(self) -> None:
        self.sink.close_started = True
        await self.sink.release.wait()
        self.sink.closed = True


@pytest.mark.asyncio
async def test_a_cancel_while_a_failing_task_closes_lets_close_finish() -> None:
    # SIGTERM's fallback cancels the job while a failed stop with savepoint closes its tasks.
    sink = _HeldClose()

    def refuse(value: int) -> int:
        raise ValueError(f"refusing {value}")

    def build(job: Job) -> None:
        job.from_source(CollectionSource([1, 2, 3])).map(refuse).sink_to(sink)

    master = JobMaster(build_graph(build))
    job = asyncio.create_task(master.run())
    await wait_until(lambda: sink.close_started, "the failing task closing its sink", job)
    job.cancel()
    names = {task.name for task in master.tasks}
    await wait_until(
        lambda: any(t.cancelling() for t in asyncio.all_tasks() if t.get_name() in names),
        "the cancel reaching the closing task",
    )
    sink.release.set()
    with pytest.raises((asyncio.CancelledError, JobFailedError)):
        await job
    assert sink.closed
