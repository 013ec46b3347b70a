"""TaskManager processes: registration, heartbeats, loss, replacement, shutdown, and no orphans.

Every TaskManager here is a real ``python -m runtime taskmanager`` child process; the JobManager
side is the :class:`TaskManagerPool` of the test's event loop, or a small JobManager script of its
own in the tests that kill it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_helpers import (
    LOST_AT_ONCE,
    ROOT,
    process_alive,
    run_cli,
    runtime_command,
    start_command,
    stop_process,
    wait_for,
    wait_until_gone,
)

from actors.barriers import CheckpointingMode
from actors.operator import NewerOutputPolicy
from actors.wire import decode_message, encode_message
from runtime.cluster.jobmanager import (
    HeartbeatConfig,
    TaskManagerLostError,
    TaskManagerPool,
    TaskManagerStartError,
    TaskManagerState,
)
from runtime.cluster.jobspec import JOB_MANAGER_ONLY_FIELDS, GraphFingerprint, JobSpec
from runtime.cluster.messages import LossCause, TaskManagerRegistered
from runtime.cluster.placement import LocalProcessPlacement
from runtime.cluster.taskmanager import DEFAULT_EXIT_GRACE_S
from runtime.config import CheckpointConfig, ExecutionConfig
from runtime.master.restart import FixedDelayRestart

JOB = """
import sys
import time

from connectors import CollectionSource
from runtime import Job

IN_TASKMANAGER = "taskmanager" in sys.argv
BUSY_IN_TASKMANAGER_S = {busy_s}
if IN_TASKMANAGER and {exit_in_taskmanager}:
    sys.stderr.write("cannot run here: no GPU on this host\\n")
    sys.stderr.flush()
    import os
    os._exit(3)
if IN_TASKMANAGER and {chatty_in_taskmanager}:
    # More than any pipe holds, before registering: it only gets on if its output is read.
    for i in range(20_000):
        print(f"record {{i}}: " + "x" * 100)
    sys.stderr.write("a long log line " + "y" * 300_000 + "\\n")


def build(job: Job) -> None:
    if IN_TASKMANAGER:
        # Pure Python computing, as a user function would: the event loop does nothing else.
        deadline = time.monotonic() + BUSY_IN_TASKMANAGER_S
        while time.monotonic() < deadline:
            pass
    numbers = job.from_source(CollectionSource(list(range(10))))
    numbers = numbers.map(lambda x: x + 1, name="increment")
    if IN_TASKMANAGER and {other_graph_in_taskmanager}:
        numbers = numbers.filter(lambda x: x % 2 == 0, name="only in TaskManagers")
    numbers.key_by(lambda x: x % 3).reduce(lambda a, b: a + b, name="sum").print()
"""


def write_job(
    tmp_path: Path,
    busy_s: float = 0.0,
    exit_in_taskmanager: bool = False,
    other_graph_in_taskmanager: bool = False,
    chatty_in_taskmanager: bool = False,
) -> Path:
    path = tmp_path / "job.py"
    path.write_text(
        JOB.format(
            busy_s=busy_s,
            exit_in_taskmanager=exit_in_taskmanager,
            other_graph_in_taskmanager=other_graph_in_taskmanager,
            chatty_in_taskmanager=chatty_in_taskmanager,
        )
    )
    return path


def job_spec(job_file: Path, parallelism: int = 2, checkpoint_dir: Path | None = None) -> JobSpec:
    return JobSpec.create(
        job_file,
        {"run": "test"},
        parallelism,
        128,
        "job",
        ExecutionConfig(),
        checkpoint_dir=checkpoint_dir,
    )


def pool_for(
    job_file: Path,
    slots: int = 1,
    heartbeat: HeartbeatConfig | None = None,
    checkpoint_dir: Path | None = None,
) -> TaskManagerPool:
    spec = job_spec(job_file, checkpoint_dir=checkpoint_dir)
    return TaskManagerPool(
        LocalProcessPlacement(slots),
        spec,
        GraphFingerprint.of(spec.build_graph()),
        heartbeat=heartbeat,
    )


# ---------------------------------------------------------------- the job spec and its graph


def test_the_job_spec_carries_every_shippable_execution_config_field() -> None:
    config = ExecutionConfig(
        checkpoint=CheckpointConfig(
            interval_s=0.1,
            mode=CheckpointingMode.AT_LEAST_ONCE,
            timeout_s=7.0,
            min_pause_s=0.5,
            max_concurrent=2,
            tolerable_failures=3,
            retained=4,
            retain_on_cancel=False,
        ),
        restart_strategy=FixedDelayRestart(3, 1.0),
        buffer_size=17,
        buffer_timeout_s=0.02,
        exclusive_credits=5,
        floating_buffers=9,
        allow_non_restored_state=True,
        on_newer_committed_output=NewerOutputPolicy.KEEP,
        allow_existing_output=True,
        auto_watermark_interval_s=0.05,
    )
    spec = JobSpec.create("job.py", {"a": "1"}, 3, 64, "name", config, checkpoint_dir="chk")
    assert Path(spec.job_file).is_absolute()
    assert spec.checkpoint_dir == str(Path("chk").resolve())
    shipped = decode_message(encode_message(TaskManagerRegistered(spec, 1.0))).job
    assert shipped == spec
    received = shipped.config.to_config()
    assert received.checkpoint == config.checkpoint
    for field in dataclasses.fields(ExecutionConfig):
        if field.name in JOB_MANAGER_ONLY_FIELDS or field.name == "checkpoint":
            continue
        assert getattr(received, field.name) == getattr(config, field.name), field.name
    names = {f.name for f in dataclasses.fields(ExecutionConfig)}
    assert JOB_MANAGER_ONLY_FIELDS <= names


def test_a_graph_difference_names_the_vertex_and_both_values(tmp_path: Path) -> None:
    here = job_spec(write_job(tmp_path)).build_graph()
    there = dataclasses.replace(job_spec(write_job(tmp_path)), parallelism=3).build_graph()
    ours, theirs = GraphFingerprint.of(here), GraphFingerprint.of(there)
    assert ours.difference(GraphFingerprint.of(here), "TaskManager tm-1") is None
    difference = ours.difference(theirs, "TaskManager tm-1")
    assert difference is not None
    assert "vertex 'sum -> Sink: Print': parallelism 2 here, 3 in TaskManager tm-1" in difference


# ---------------------------------------------------------------- registration and shutdown


@pytest.mark.asyncio
async def test_taskmanagers_register_with_distinct_pids_and_exit_on_shutdown(
    tmp_path: Path,
) -> None:
    pool = pool_for(write_job(tmp_path), slots=2)
    handles = await pool.start(3)
    try:
        assert [h.tm_id for h in handles] == ["tm-1", "tm-2", "tm-3"]
        pids = [h.pid for h in handles]
        assert len(set(pids)) == 3 and os.getpid() not in pids
        assert [h.process.pid for h in handles] == pids
        assert all(process_alive(pid) for pid in pids)
        status = pool.status()
        assert [s["state"] for s in status] == ["ready"] * 3
        assert {(s["host"], s["slots"]) for s in status} == {("127.0.0.1", 2)}
        assert pool.address[0] == "127.0.0.1"
    finally:
        await pool.shutdown()
    assert [h.exit_code for h in handles] == [0, 0, 0]
    assert not any(process_alive(pid) for pid in pids)
    assert pool.losses == []


@pytest.mark.asyncio
async def test_a_chatty_taskmanager_never_blocks_and_its_output_is_not_lost(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    async with pool_for(write_job(tmp_path, chatty_in_taskmanager=True)) as pool:
        await pool.start(1)
    out, err = capfd.readouterr()
    records = [line for line in out.splitlines() if line.startswith("record ")]
    assert len(records) == 20_000
    assert records[-1] == "record 19999: " + "x" * 100
    assert "[tm-1] a long log line " + "y" * 300_000 + "\n" in err


@pytest.mark.asyncio
async def test_a_sigkilled_taskmanager_is_lost_by_its_connection_end_not_by_heartbeats(
    tmp_path: Path,
) -> None:
    # Detected at once: the end of its connection or process, never the heartbeat timeout.
    async with pool_for(write_job(tmp_path)) as pool:
        victim, survivor = await pool.start(2)
        watch = asyncio.create_task(pool.watch())
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(TaskManagerLostError) as lost:
            await watch
        assert lost.value.loss.cause in LOST_AT_ONCE
        assert lost.value.loss.tm_id == victim.tm_id
        assert f"TaskManager tm-1 (pid {victim.pid}) lost" in str(lost.value)
        assert "killed by SIGKILL" in str(lost.value)
        assert victim.state is TaskManagerState.LOST
        assert survivor.state is TaskManagerState.READY
        assert [s["state"] for s in pool.status()] == ["lost", "ready"]


@pytest.mark.asyncio
async def test_a_lost_taskmanager_is_replaced_by_a_fresh_process(tmp_path: Path) -> None:
    async with pool_for(write_job(tmp_path)) as pool:
        (lost,) = await pool.start(1)
        os.kill(lost.pid, signal.SIGKILL)
        with pytest.raises(TaskManagerLostError):
            await pool.watch()
        (fresh,) = await pool.replace_lost()
        assert fresh.tm_id == "tm-2"
        assert fresh.state is TaskManagerState.READY
        assert fresh.pid != lost.pid and process_alive(fresh.pid)
        assert not process_alive(lost.pid)
        assert pool.taskmanagers == [fresh] and pool.lost == []
        assert [loss.tm_id for loss in pool.losses] == ["tm-1"]
        # The new one is watched like the first: its loss is reported too.
        watch = asyncio.create_task(pool.watch())
        await asyncio.sleep(0)
        assert not watch.done()
        os.kill(fresh.pid, signal.SIGKILL)
        with pytest.raises(TaskManagerLostError, match="tm-2"):
            await watch


@pytest.mark.asyncio
async def test_a_frozen_taskmanager_is_lost_after_the_heartbeat_timeout(tmp_path: Path) -> None:
    heartbeat = HeartbeatConfig(interval_s=0.2, timeout_s=1.0)
    async with pool_for(write_job(tmp_path), heartbeat=heartbeat) as pool:
        (frozen,) = await pool.start(1)
        stopped_at = time.monotonic()
        os.kill(frozen.pid, signal.SIGSTOP)
        with pytest.raises(TaskManagerLostError) as lost:
            await pool.watch()
        assert time.monotonic() - stopped_at >= heartbeat.timeout_s
        assert lost.value.loss.cause == LossCause.HEARTBEAT_TIMEOUT
        assert "no heartbeat for 1s" in str(lost.value)
        # It is killed, so it cannot wake up and carry on.
        assert "killed by the JobManager" in str(lost.value)
        assert frozen.exit_code == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_taskmanager_busy_in_a_user_function_keeps_heartbeating(tmp_path: Path) -> None:
    # build(job) computes for 3s in the TaskManager, on its event loop: 3x the heartbeat timeout.
    heartbeat = HeartbeatConfig(interval_s=0.2, timeout_s=1.0)
    async with pool_for(write_job(tmp_path, busy_s=3.0), heartbeat=heartbeat) as pool:
        started = time.monotonic()
        (busy,) = await pool.start(1)
        assert time.monotonic() - started >= 3.0
        assert busy.state is TaskManagerState.READY
        assert pool.losses == []


def exited_unreaped(pid: int) -> bool | None:
    """Whether our child ``pid`` has ended but is not reaped yet (None: it was reaped)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return None


@pytest.mark.asyncio
async def test_killing_a_taskmanager_that_just_died_keeps_its_exit_code() -> None:
    # A JobManager that accepts but never answers keeps the TaskManager waiting.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        placement = LocalProcessPlacement()
        caught_unreaped = 0
        try:
            for _ in range(20):
                taskmanager = await placement.start("tm-1", *listener.getsockname())
                connection, _ = await asyncio.to_thread(listener.accept)
                os.kill(taskmanager.pid, signal.SIGKILL)
                # Keep the event loop (which learns of the exit from asyncio's child watcher)
                # from running until the process has ended: the pool kills a lost TaskManager
                # at such moments, when its connection's end came first.
                while (unreaped := exited_unreaped(taskmanager.pid)) is False:
                    pass
                caught_unreaped += bool(unreaped)
                taskmanager.kill()
                assert await taskmanager.wait() == -signal.SIGKILL
                connection.close()
                if caught_unreaped >= 3:
                    break
        finally:
            await placement.close()
    assert caught_unreaped >= 1


# ---------------------------------------------------------------- TaskManagers that cannot start


async def start_failure(pool: TaskManagerPool, count: int) -> str:
    """The one-line error of starting ``count`` TaskManagers, which must fail; none is left."""
    try:
        with pytest.raises(TaskManagerStartError) as failed:
            await pool.start(count)
    finally:
        await pool.shutdown()
    assert pool.taskmanagers == []
    message = str(failed.value)
    assert "\n" not in message
    return message


@pytest.mark.asyncio
async def test_a_job_file_that_builds_another_graph_in_a_taskmanager_is_refused(
    tmp_path: Path,
) -> None:
    pool = pool_for(write_job(tmp_path, other_graph_in_taskmanager=True))
    message = await start_failure(pool, 2)
    assert "built another job graph from" in message and str(tmp_path / "job.py") in message
    assert "vertex 'Source: Collection -> increment': operator uids" in message
    assert "'only-in-taskmanagers')" in message
    assert "must not depend on the process, the host or the environment" in message


@pytest.mark.asyncio
async def test_a_taskmanager_that_cannot_load_the_job_file_is_one_clear_line(
    tmp_path: Path,
) -> None:
    good = pool_for(write_job(tmp_path))
    missing = tmp_path / "moved" / "job.py"
    pool = TaskManagerPool(
        good.placement, dataclasses.replace(good.job, job_file=str(missing)), good.expected
    )
    message = await start_failure(pool, 1)
    assert message.startswith("TaskManager tm-1 (pid ")
    assert f"could not build the job graph: job file {str(missing)!r} not found" in message


@pytest.mark.asyncio
async def test_taskmanagers_check_that_they_can_write_into_the_checkpoint_directory(
    tmp_path: Path,
) -> None:
    checkpoints = tmp_path / "chk"
    checkpoints.mkdir()
    async with pool_for(write_job(tmp_path), checkpoint_dir=checkpoints) as pool:
        assert len(await pool.start(2)) == 2
    assert list(checkpoints.iterdir()) == []  # their probe files are gone
    # A directory that is not there for them, as on a node without the shared file system.
    unreachable = tmp_path / "not-mounted" / "chk"
    message = await start_failure(pool_for(write_job(tmp_path), checkpoint_dir=unreachable), 2)
    assert re.match(
        rf"TaskManager tm-[12] \(pid \d+\) on host 127\.0\.0\.1 cannot write into the "
        rf"checkpoint directory {re.escape(str(unreachable))}: \[Errno 2\] No such file or "
        "directory;",
        message,
    )
    assert "every TaskManager must reach the checkpoint directory" in message
    assert not unreachable.parent.exists()  # a TaskManager never creates it


@pytest.mark.asyncio
async def test_a_taskmanager_that_dies_while_starting_reports_its_exit_code_and_output(
    tmp_path: Path,
) -> None:
    message = await start_failure(pool_for(write_job(tmp_path, exit_in_taskmanager=True)), 2)
    assert "did not come up" in message
    assert "exited with code 3" in message
    assert "its last output: cannot run here: no GPU on this host" in message


@pytest.mark.asyncio
async def test_a_taskmanager_the_pool_did_not_start_is_refused(tmp_path: Path) -> None:
    async with pool_for(write_job(tmp_path)) as pool:
        await pool.start(1)
        host, port = pool.address
        stranger = await asyncio.create_subprocess_exec(
            *runtime_command("taskmanager", "--jobmanager", f"{host}:{port}", "--id", "tm-1"),
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await stranger.communicate()
        assert stranger.returncode == 1
        assert stderr.decode() == (
            f"error: TaskManager tm-1 was refused by the JobManager at {host}:{port}: "
            "TaskManager 'tm-1' registered before (now ready)\n"
        )
        assert [h.state for h in pool.taskmanagers] == [TaskManagerState.READY]


def test_the_taskmanager_command_says_in_one_line_that_it_cannot_reach_its_jobmanager() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = run_cli("taskmanager", "--jobmanager", f"127.0.0.1:{port}", "--id", "tm-7")
    assert result.returncode == 1
    assert result.stderr == (
        f"error: TaskManager tm-7 cannot reach its JobManager at 127.0.0.1:{port}: "
        "[Errno 111] Connection refused\n"
    )
    usage = run_cli("taskmanager", "--jobmanager", "nowhere", "--id", "tm-7")
    assert usage.returncode == 2
    assert "expected HOST:PORT" in usage.stderr


# ---------------------------------------------------------------- no orphans

JOBMANAGER = """
import asyncio, json, sys
from pathlib import Path

from runtime.cluster.jobmanager import TaskManagerPool
from runtime.cluster.jobspec import GraphFingerprint, JobSpec
from runtime.cluster.placement import LocalProcessPlacement
from runtime.config import ExecutionConfig

job_file, pids_file, state = sys.argv[1:]


async def main() -> None:
    spec = JobSpec.create(job_file, {}, 2, 128, "job", ExecutionConfig())
    pool = TaskManagerPool(LocalProcessPlacement(), spec, GraphFingerprint.of(spec.build_graph()))
    starting = asyncio.create_task(pool.start(2))
    while [h.state.value for h in pool.taskmanagers] != [state, state]:
        await asyncio.sleep(0.01)
    Path(pids_file).write_text(json.dumps([h.pid for h in pool.taskmanagers]))
    await starting
    await asyncio.Event().wait()


asyncio.run(main())
"""


def start_jobmanager(tmp_path: Path, job_file: Path, state: str) -> tuple[list[int], int]:
    """Start a JobManager script with two TaskManagers, SIGKILL it once both are in ``state``;
    their pids, and the pid of the killed JobManager."""
    pids_file = tmp_path / "pids.json"
    stderr = tmp_path / "jobmanager.stderr"
    jobmanager = start_command(
        [sys.executable, "-c", JOBMANAGER, str(job_file), str(pids_file), state], stderr
    )
    try:
        pids: list[int] = wait_for(
            lambda: pids_file.exists() and json.loads(pids_file.read_text() or "null"),
            "two TaskManagers",
            jobmanager,
            stderr,
        )
        assert all(process_alive(pid) for pid in pids)
    finally:
        stop_process(jobmanager)
    assert jobmanager.returncode == -signal.SIGKILL
    return pids, jobmanager.pid


@pytest.mark.slow
def test_no_taskmanager_outlives_a_sigkilled_jobmanager(tmp_path: Path) -> None:
    pids, _ = start_jobmanager(tmp_path, write_job(tmp_path), "ready")
    wait_until_gone(pids, "the TaskManagers to exit", timeout=3.0)


@pytest.mark.slow
def test_a_taskmanager_stuck_in_a_user_function_still_exits_when_its_jobmanager_dies(
    tmp_path: Path,
) -> None:
    # build(job) computes for a minute in the TaskManagers: their event loop never gets to run.
    pids, _ = start_jobmanager(tmp_path, write_job(tmp_path, busy_s=60.0), "registered")
    wait_until_gone(pids, "the TaskManagers to exit", timeout=DEFAULT_EXIT_GRACE_S + 3.0)


PARENT = """
import subprocess, sys

child = subprocess.Popen(
    [sys.executable, "-m", "runtime", "taskmanager", "--jobmanager", sys.argv[1], "--id", "tm-1"]
)
print(child.pid, flush=True)
child.wait()
"""


def test_a_taskmanager_whose_parent_died_exits_although_its_connection_stays_open(
    tmp_path: Path,
) -> None:
    # A JobManager that never answers, and whose connection stays open: only the parent's end
    # tells the TaskManager to go.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = "{}:{}".format(*listener.getsockname())
        parent = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(PARENT), address],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        with parent:
            try:
                assert parent.stdout is not None
                taskmanager = int(parent.stdout.readline())
                connection, _ = listener.accept()
            finally:
                stop_process(parent)
        with connection:
            assert process_alive(taskmanager)
            wait_until_gone([taskmanager], "the orphaned TaskManager to exit", timeout=10.0)
            connection.settimeout(10.0)
            while connection.recv(4096):
                pass  # its registration, then the end of the connection
