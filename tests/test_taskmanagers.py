"""``python -m runtime run --taskmanagers N``: the job's subtasks on TaskManager processes.

Real processes throughout: the job process is the JobManager, its TaskManagers are the
``python -m runtime taskmanager`` children it starts. The same jobs give the same output as in
one process; the subtasks really run in the TaskManagers; a TaskManager killed mid-run is
replaced and the job recovers exactly once; failures read as they do in one process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_helpers import (
    ROOT,
    get_json,
    max_completed,
    operator_idle,
    operator_records_in,
    operator_watermark,
    printed_address,
    run_cli,
    start_cli,
    stop_process,
    wait_for,
    wait_until_gone,
)
from etl_expectations import assert_exact_output, committed_records
from loop_helpers import wait_until

from actors.operator import RestoreContext
from actors.wire import decode_message, encode_message
from connectors import CollectSink, GeneratorSource
from runtime.cluster.deployment import assign_subtasks, slots_per_taskmanager
from runtime.cluster.messages import (
    DeployAttempt,
    RestoreContextData,
    RestoredStateData,
    SubtaskDeployment,
    TaskManagerAddress,
)
from runtime.master.jobmaster import JobMaster
from runtime.shell.rest import ControlServer
from runtime.shell.runner import build_graph
from state.snapshot import RestoredState

WORDCOUNT = ROOT / "examples" / "wordcount.py"
FILE_ETL = ROOT / "examples" / "file_etl.py"

QUIET = ("--no-progress", "--rest-port", "-1")


def write_job(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def running_status(address: str, taskmanagers: int) -> dict[str, Any] | None:
    """``/status`` once every task of the current attempt runs (or, a source subtask without
    splits, finished) on ``taskmanagers`` TaskManagers."""
    status: dict[str, Any] = get_json(address, "/status")
    tasks = status["tasks"]
    if len(status["taskmanagers"]) != taskmanagers or not tasks:
        return None
    if any(task["state"] not in ("running", "finished") for task in tasks):
        return None
    return status


@dataclass
class RunningJob:
    proc: subprocess.Popen[bytes]
    stderr: Path
    address: str
    status: dict[str, Any]
    """``/status`` once every task ran."""

    def wait(self, timeout: float = 60.0) -> int:
        """Its exit code, once it ended."""
        return self.proc.wait(timeout=timeout)


def job_on_two_taskmanagers(
    tmp_path: Path, job_file: Path, parallelism: int, *args: str
) -> contextlib.AbstractContextManager[RunningJob]:
    """``job_file`` running on two TaskManagers (see :func:`job_running_on_taskmanagers`)."""
    return job_running_on_taskmanagers(tmp_path, job_file, parallelism, 2, *args)


@contextlib.contextmanager
def job_running_on_taskmanagers(
    tmp_path: Path, job_file: Path, parallelism: int, taskmanagers: int, *args: str
) -> Iterator[RunningJob]:
    """``job_file`` running on ``taskmanagers`` TaskManagers, once every task of it runs; killed
    at the end if it still runs."""
    stderr = tmp_path / "stderr.txt"
    proc = start_cli(
        stderr,
        *("run", str(job_file), "--parallelism", str(parallelism)),
        *("--taskmanagers", str(taskmanagers), *args, "--rest-port", "0", "--no-progress"),
    )
    try:
        address = wait_for(lambda: printed_address(stderr), "the control endpoint", proc, stderr)
        status = wait_for(
            lambda: running_status(address, taskmanagers), "every task to run", proc, stderr
        )
        yield RunningJob(proc, stderr, address, status)
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- placement


def test_subtasks_spread_evenly_and_same_index_subtasks_share_a_taskmanager() -> None:
    def build(job: Any) -> None:
        numbers = job.from_source(GeneratorSource(lambda i: i, count=10)).set_parallelism(3)
        numbers.key_by(lambda x: x % 5).reduce(lambda a, b: a + b).set_parallelism(5).sink_to(
            CollectSink()
        ).set_parallelism(1)

    graph = build_graph(build, parallelism=4)
    placement = assign_subtasks(graph, 2)
    assert {len(p) for p in placement.values()} == {3, 5, 1}
    for vertex in graph.vertices:
        counts = collections.Counter(placement[vertex.id])
        assert max(counts.values()) - min(counts.values(), default=0) <= 1 or len(counts) == 1
        assert all(tm == index % 2 for index, tm in enumerate(placement[vertex.id]))
    assert slots_per_taskmanager(graph, 2) == 3
    assert slots_per_taskmanager(graph, 8) == 1


def test_a_deployment_crosses_the_wire_with_its_restored_state_intact() -> None:
    keyed = {"total": {"kind": "value", "keys": [("a", 1), "b"], "values": [{1, 2}, 3.5]}}
    restored = RestoredState((keyed, keyed), (), {"splits": [{"path": "x", "offset": 3}]})
    context = RestoreContext(checkpoint_id=7, newer_completed_checkpoints=(8, 9))
    message = DeployAttempt(
        3,
        (SubtaskDeployment("v1", 1, {"uid": RestoredStateData.of(restored)}, False),),
        (
            TaskManagerAddress("tm-1", "127.0.0.1", 4000),
            TaskManagerAddress("tm-2", "127.0.0.1", 4001),
        ),
        {"v1": (0, 1)},
        {"source": [{"path": "x", "offset": 0}]},
        RestoreContextData.of(context),
        arm_crash_points=True,
    )
    decoded = decode_message(encode_message(message))
    assert decoded == message
    assert decoded.subtasks[0].restored["uid"].to_restored() == restored
    assert decoded.restore_context.to_context() == context


# --------------------------------------------------------------------------- same output


def run_at_parallelism_4(job_file: Path, taskmanagers: int, *args: str) -> None:
    """Run ``job_file`` to its end at parallelism 4 on ``taskmanagers`` TaskManagers."""
    proc = run_cli(
        *("run", str(job_file), "--parallelism", "4", "--taskmanagers", str(taskmanagers)),
        *args,
        *QUIET,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_wordcount_at_parallelism_4_on_two_taskmanagers_counts_as_in_one_process(
    tmp_path: Path,
) -> None:
    counts = {}
    for taskmanagers in (1, 2):
        out = tmp_path / f"counts-{taskmanagers}.jsonl"
        run_at_parallelism_4(WORDCOUNT, taskmanagers, "--set", f"output={out}")
        counts[taskmanagers] = sorted(out.read_text().splitlines())
    assert counts[1], "the single-process run counted nothing"
    assert counts[2] == counts[1]


@pytest.mark.slow
def test_file_etl_at_parallelism_4_on_two_taskmanagers_commits_what_one_process_does(
    tmp_path: Path,
) -> None:
    outputs = {}
    for taskmanagers in (1, 2):
        out = tmp_path / f"out-{taskmanagers}"
        chk = tmp_path / f"chk-{taskmanagers}"
        run_at_parallelism_4(
            FILE_ETL,
            taskmanagers,
            *("--set", f"output={out}", "--checkpoint-interval", "100ms"),
            *("--checkpoint-dir", str(chk)),
        )
        assert_exact_output(out)
        outputs[taskmanagers] = sorted(orjson.dumps(r) for r in committed_records(out))
    assert outputs[2] == outputs[1]


# --------------------------------------------------------------------------- real processes

PIDS_JOB = """
import os

from connectors import GeneratorSource, JsonLinesFileSink
from runtime import Job, MapFunction


class WhereAmI(MapFunction):
    def open(self, ctx):
        self.subtask = ctx.subtask_index

    def map(self, value):
        return {"subtask": self.subtask, "pid": os.getpid()}


def build(job: Job) -> None:
    (
        job.from_source(GeneratorSource(lambda i: i, rate=500))
        .uid("numbers")
        .map(WhereAmI(), name="where am I")
        .uid("where")
        .sink_to(JsonLinesFileSink(job.params.require("output")), name="pids")
        .set_parallelism(1)
    )
"""


@pytest.mark.slow
def test_the_subtasks_run_in_two_taskmanager_processes_not_in_the_job_process(
    tmp_path: Path,
) -> None:
    job = write_job(tmp_path, "pids.py", PIDS_JOB)
    out = tmp_path / "pids.jsonl"
    with job_on_two_taskmanagers(tmp_path, job, 4, "--set", f"output={out}") as running:
        taskmanagers = running.status["taskmanagers"]
        pids = {tm["id"]: tm["pid"] for tm in taskmanagers}
        assert len(set(pids.values())) == 2
        assert running.proc.pid not in pids.values()
        assert all(tm["state"] == "ready" and tm["host"] == "127.0.0.1" for tm in taskmanagers)
        assert all(tm["slots"] == 2 for tm in taskmanagers)
        # Every task runs on one of them, as each TaskManager lists it; each has its share.
        listed = {name: tm["id"] for tm in taskmanagers for name in tm["subtasks"]}
        assert {t["name"]: t["taskmanager"] for t in running.status["tasks"]} == listed
        assert all(len(tm["subtasks"]) >= 2 for tm in taskmanagers)
        wait_for(
            lambda: operator_records_in(running.address, "where") >= 400,
            "records to flow",
            running.proc,
            running.stderr,
        )
        assert run_cli("cancel", "--address", running.address).returncode == 0
        assert running.wait() == 130, running.stderr.read_text()
        wait_until_gone(pids.values(), "the TaskManagers to exit with the job")
        status = running.status
    # The records say where the map ran: each subtask in the TaskManager /status named.
    seen: dict[int, set[int]] = collections.defaultdict(set)
    for line in out.read_bytes().splitlines():
        record = orjson.loads(line)
        seen[record["subtask"]].add(record["pid"])
    assert sorted(seen) == [0, 1, 2, 3]
    for subtask, where in seen.items():
        [task] = [t for t in status["tasks"] if t["name"].endswith(f"({subtask + 1}/4)")]
        assert where == {pids[task["taskmanager"]]}
    assert {pid for where in seen.values() for pid in where} == set(pids.values())


@pytest.mark.asyncio
async def test_status_in_one_process_names_no_taskmanager() -> None:
    def build(job: Any) -> None:
        job.from_source(GeneratorSource(lambda i: i, rate=100)).sink_to(CollectSink())

    master = JobMaster(build_graph(build, parallelism=2))
    job = asyncio.create_task(master.run())
    server = ControlServer(master, job.cancel, port=0)
    address = await server.start()
    try:
        await wait_until(
            lambda: bool(master.tasks) and all(t.state.value == "running" for t in master.tasks),
            "every task to run",
            job,
        )
        status = await asyncio.to_thread(get_json, address, "/status")
    finally:
        await server.stop()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
    assert status["taskmanagers"] == []
    assert [t["taskmanager"] for t in status["tasks"]] == [None, None]


# --------------------------------------------------------------------------- failure


@pytest.mark.slow
def test_a_taskmanager_killed_mid_run_is_replaced_and_the_output_is_exactly_once(
    tmp_path: Path,
) -> None:
    err = assert_a_killed_taskmanager_is_replaced_exactly_once(tmp_path)
    assert "killed by SIGKILL" in err


def assert_a_killed_taskmanager_is_replaced_exactly_once(tmp_path: Path, *args: str) -> str:
    """Run the file ETL at parallelism 4 on two TaskManagers (``args`` added), SIGKILL the one
    that reads the first split once two checkpoints completed, and check that a fresh one
    replaces it and the job ends with its output exactly once; the job's stderr."""
    out = tmp_path / "out"
    chk = tmp_path / "chk"
    with job_on_two_taskmanagers(
        tmp_path,
        FILE_ETL,
        4,
        *("--set", f"output={out}", "--set", "rate=500"),
        *("--checkpoint-interval", "100ms", "--checkpoint-dir", str(chk)),
        *("--restart-strategy", "fixed-delay:3:100ms", *args),
    ) as running:
        proc, stderr, address, status = (
            running.proc,
            running.stderr,
            running.address,
            running.status,
        )
        # One checkpoint is retained, so two completed show as checkpoint 2's folder.
        wait_for(lambda: max_completed(chk) >= 2, "two checkpoints", proc, stderr)
        [reading] = [
            t["taskmanager"]
            for t in status["tasks"]
            if t["name"].startswith("Source") and t["name"].endswith("(1/4)")
        ]
        victim = next(tm for tm in status["taskmanagers"] if tm["id"] == reading)
        os.kill(victim["pid"], signal.SIGKILL)
        recovered = wait_for(
            lambda: get_json(address, "/status")["attempt"] == 2 and running_status(address, 2),
            "the job to run again on two TaskManagers",
            proc,
            stderr,
        )
        assert running.wait() == 0, stderr.read_text()
    ids = {tm["id"] for tm in recovered["taskmanagers"]}
    assert reading not in ids and len(ids) == 2
    assert victim["pid"] not in {tm["pid"] for tm in recovered["taskmanagers"]}
    err = stderr.read_text()
    assert f"TaskManager {reading} (pid {victim['pid']}) lost" in err
    assert_exact_output(out)
    return err


@pytest.mark.slow
def test_a_taskmanager_lost_without_a_restart_fails_the_job_in_one_line(tmp_path: Path) -> None:
    job = write_job(tmp_path, "pids.py", PIDS_JOB)
    with job_on_two_taskmanagers(
        tmp_path,
        job,
        2,
        *("--set", f"output={tmp_path / 'pids.jsonl'}", "--restart-strategy", "none"),
    ) as running:
        status = running.status
        victim = status["taskmanagers"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        assert running.wait(timeout=30) == 1, running.stderr.read_text()
    stderr = running.stderr
    err = stderr.read_text()
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith(
        f"error: job failed: TaskManagerLostError: TaskManager {victim['id']} "
        f"(pid {victim['pid']}) lost: "
    ), line
    assert "killed by SIGKILL" in line
    wait_until_gone([tm["pid"] for tm in status["taskmanagers"]], "the TaskManagers to exit")


@pytest.mark.slow
def test_a_crash_point_that_ends_a_taskmanager_recovers_and_is_not_armed_in_its_replacement(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    proc = run_cli(
        *("run", str(FILE_ETL), "--parallelism", "4", "--taskmanagers", "2"),
        *("--set", f"output={out}", "--set", "rate=2000"),
        *("--set", "testing.crash-at=before-snapshot:6", "--set", "testing.crash-mode=exit"),
        *("--checkpoint-interval", "100ms", "--checkpoint-dir", str(tmp_path / "chk")),
        *("--restart-strategy", "fixed-delay:2:100ms", *QUIET),
    )
    assert proc.returncode == 0, proc.stderr
    crashes = proc.stderr.count("injected crash at before-snapshot")
    # Each TaskManager the job started with crashed once, at its own 6th snapshot; none of the
    # fresh ones did (two restarts allowed, and the job finished).
    assert 1 <= crashes <= 2, proc.stderr
    assert "lost" in proc.stderr
    assert_exact_output(out)


FAILING_JOB = """
from connectors import CollectionSource, CollectSink


def count_letters(word):
    if word == "zebra":
        raise LookupError(f"no letters known for {word!r}")
    return {"word": word, "letters": len(word)}


def build(job):
    words = ["apple", "pear", "zebra", "fig"] * 5
    (
        job.from_source(CollectionSource(words))
        .key_by(lambda word: word)
        .map(count_letters, name="count letters")
        .sink_to(CollectSink())
    )
"""


@pytest.mark.slow
def test_a_user_function_error_in_a_taskmanager_reads_as_in_one_process(tmp_path: Path) -> None:
    job = write_job(tmp_path, "letters.py", FAILING_JOB)
    proc = run_cli("run", str(job), "--parallelism", "2", "--taskmanagers", "2", *QUIET)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: job failed: ")
    assert "'count letters'" in line
    assert "'zebra'" in line
    assert "LookupError: no letters known for 'zebra'" in line
    # The user's own traceback, from the TaskManager: their file, function and line.
    assert "Traceback" in err
    assert "letters.py" in err
    assert "in count_letters" in err
    assert 'raise LookupError(f"no letters known' in err


@pytest.mark.slow
def test_a_refused_restore_in_a_taskmanager_exits_2_without_a_restart(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", str(FILE_ETL), "--parallelism", "2", "--set", f"output={out}", *QUIET]
    assert run_cli(*args).returncode == 0
    # Again into the same output, with checkpointing (so a restart strategy that would restart):
    # the two-phase sink refuses to write over committed output, in a TaskManager.
    proc = run_cli(
        *args, "--taskmanagers", "2", "--checkpoint-interval", "100ms", "--log-level", "INFO"
    )
    assert proc.returncode == 2, proc.stderr
    assert "--allow-existing-output" in proc.stderr.splitlines()[-1]
    assert proc.stderr.splitlines()[-1].startswith("error: ")
    assert "restarting" not in proc.stderr


UNENCODABLE_JOB = """
from connectors import GeneratorSource
from runtime import Job


class Point:
    def __init__(self, x):
        self.x = x


def build(job: Job) -> None:
    points = job.from_source(GeneratorSource(lambda i: i, count=50)).map(Point, name="make points")
    points.key_by(lambda p: p.x % 7).map(lambda p: p.x, name="coordinates").print()
"""


@pytest.mark.slow
def test_a_record_msgpack_cannot_encode_fails_the_job_naming_the_operator_and_type(
    tmp_path: Path,
) -> None:
    job = write_job(tmp_path, "points.py", UNENCODABLE_JOB)
    proc = run_cli("run", str(job), "--parallelism", "2", "--taskmanagers", "2", *QUIET)
    assert proc.returncode == 1, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error: job failed")]
    assert "make points" in line
    assert re.search(r"cannot send a record of type [\w.]*\bPoint to coordinates", line), line
    assert "another TaskManager process" in line


# --------------------------------------------------------------------------- new splits

DISCOVERING_JOB = """
import orjson
from pathlib import Path

from runtime import Job
from runtime.api.sources import Source, SourceReader


class SplitFiles(Source):
    \"\"\"One split per file of a directory (its records inline); new files become new splits.\"\"\"

    bounded = False
    discovery_interval_s = 0.05

    def __init__(self, directory):
        self.directory = Path(directory)

    def name(self):
        return "SplitFiles"

    def _splits(self, known=()):
        names = {s["split"] for s in known}
        return [
            {"split": p.name, "records": orjson.loads(p.read_bytes())}
            for p in sorted(self.directory.glob("*.json"))
            if p.name not in names
        ]

    def create_splits(self, parallelism):
        return self._splits()

    async def discover_new_splits(self, known):
        return self._splits(known)

    def create_reader(self, context):
        return Reader()


class Reader(SourceReader):
    def __init__(self):
        self.pending = []

    def add_splits(self, splits):
        self.pending.extend(splits)

    def poll(self, max_records):
        if not self.pending:
            return None
        return self.pending.pop(0)["records"]

    def snapshot_splits(self):
        return list(self.pending)


def build(job: Job) -> None:
    records = job.from_source(SplitFiles(job.params.require("input"))).uid("files")
    timed = records.assign_timestamps_and_watermarks(lambda r: r).uid("event-time")
    timed.key_by(lambda r: r % 2).map(lambda r: r, name="forward").uid("forward").print()
"""


@pytest.mark.slow
def test_splits_discovered_while_running_reach_readers_in_taskmanagers(tmp_path: Path) -> None:
    job = write_job(tmp_path, "discovering.py", DISCOVERING_JOB)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.json").write_bytes(orjson.dumps(list(range(5))))
    interval = ("--auto-watermark-interval", "50ms")
    with job_on_two_taskmanagers(
        tmp_path, job, 2, *interval, "--set", f"input={inputs}"
    ) as running:
        address, proc, stderr = running.address, running.proc, running.stderr
        wait_for(lambda: operator_records_in(address, "forward") == 5, "a.json", proc, stderr)
        # The source subtask without a split is idle, and says so across the processes: event
        # time in both subtasks of "forward" follows the other source subtask alone.
        wait_for(lambda: operator_watermark(address, "forward") == 3, "event time", proc, stderr)
        assert operator_watermark(address, "files", subtask=1) is None
        assert operator_idle(address, "files", subtask=1)
        # The second split goes to the other subtask: the reader in the other TaskManager.
        (inputs / "b.json").write_bytes(orjson.dumps(list(range(5, 12))))
        wait_for(lambda: operator_records_in(address, "forward") == 12, "b.json", proc, stderr)
        assert len({t["taskmanager"] for t in running.status["tasks"]}) == 2


PROCESS_DEPENDENT_JOB = """
import sys

from connectors import CollectionSource
from runtime import Job


def build(job: Job) -> None:
    numbers = job.from_source(CollectionSource(list(range(10))))
    if "taskmanager" in sys.argv:
        numbers = numbers.filter(lambda x: x % 2 == 0, name="only in TaskManagers")
    numbers.print()
"""


@pytest.mark.slow
def test_a_job_file_that_builds_another_graph_in_a_taskmanager_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    job = write_job(tmp_path, "depends.py", PROCESS_DEPENDENT_JOB)
    proc = run_cli("run", str(job), "--taskmanagers", "2", *QUIET)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "built another job graph" in line
    assert "only in TaskManagers" in line
