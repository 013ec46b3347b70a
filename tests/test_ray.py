"""TaskManagers as Ray actors (``--cluster ray``), on a local Ray instance bound to loopback.

The module starts one local Ray instance for all its tests (through the runtime's own
:func:`~runtime.cluster.ray.connect_ray`, as ``--cluster ray`` without ``RAY_ADDRESS`` does) and
stops it at the end. Every TaskManager is a real Ray actor in a Ray worker process, connected to
a real :class:`TaskManagerPool` of the test's event loop, or to a ``python -m runtime run`` child
process that reaches the same Ray instance through ``RAY_ADDRESS``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from cli_helpers import (
    LOST_AT_ONCE,
    ROOT,
    listening_sockets,
    process_alive,
    process_tree,
    run_cli,
    stop_process,
    wait_for,
    wait_until_gone,
)
from test_cluster import job_spec, write_job
from test_taskmanagers import (
    PIDS_JOB,
    QUIET,
    WORDCOUNT,
    assert_a_killed_taskmanager_is_replaced_exactly_once,
    job_on_two_taskmanagers,
    job_running_on_taskmanagers,
    run_at_parallelism_4,
)
from test_taskmanagers import write_job as write_job_file

from runtime.cluster.jobmanager import (
    TaskManagerLostError,
    TaskManagerPool,
    TaskManagerStartError,
    TaskManagerState,
)
from runtime.cluster.jobspec import GraphFingerprint
from runtime.cluster.ray import RayPlacement, connect_ray, disconnect_ray

if importlib.util.find_spec("ray") is None:
    pytest.skip(
        "Ray is not installed (the optional extra: pip install -e '.[ray]')",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow

RAY_CPUS = 4
"""Logical CPUs of the test's Ray instance: room for two TaskManagers and their replacements."""


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray instance on loopback for the module; its address (``RAY_ADDRESS`` form).
    The environment Ray was started with (see :func:`connect_ray`) is restored at the end."""
    environment = dict(os.environ)
    os.environ.pop("RAY_ADDRESS", None)
    try:
        assert connect_ray(num_cpus=RAY_CPUS), "this process was connected to Ray already"
        import ray

        yield ray.get_runtime_context().gcs_address
    finally:
        disconnect_ray()
        os.environ.clear()
        os.environ.update(environment)


@pytest.fixture
def on_the_test_cluster(ray_address: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``python -m runtime`` children run against the module's Ray instance (``RAY_ADDRESS``)."""
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    return ray_address


def ray_pool(tmp_path: Path, placement: RayPlacement) -> TaskManagerPool:
    spec = job_spec(write_job(tmp_path))
    return TaskManagerPool(placement, spec, GraphFingerprint.of(spec.build_graph()))


def actor_exists(placement: RayPlacement, tm_id: str) -> bool:
    import ray

    try:
        ray.get_actor(tm_id, namespace=placement.namespace)
    except ValueError:
        return False
    return True


@pytest.mark.asyncio
async def test_every_socket_of_ray_and_of_the_taskmanagers_listens_on_loopback_only(
    ray_address: str, tmp_path: Path
) -> None:
    import ray

    host, port = ray_address.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    async with ray_pool(tmp_path, RayPlacement()) as pool:
        actors = {h.pid for h in await pool.start(2)}
        # Ray's head (GCS, raylet, agents), this driver, the actors' worker processes, the pool.
        sockets = listening_sockets(process_tree(os.getpid()))
    assert ("127.0.0.1", int(port)) in {(address, port) for address, port, _ in sockets}
    assert actors <= {pid for _, _, pid in sockets}
    assert {address for address, _, _ in sockets} == {"127.0.0.1"}, sockets


@pytest.mark.asyncio
async def test_taskmanager_actors_register_with_distinct_pids_and_end_with_the_pool(
    ray_address: str, tmp_path: Path
) -> None:
    placement = RayPlacement(slots=2)
    pool = ray_pool(tmp_path, placement)
    handles = await pool.start(2)
    try:
        pids = [h.pid for h in handles]
        assert None not in pids and len(set(pids)) == 2 and os.getpid() not in pids
        assert [h.process.pid for h in handles] == pids  # what the actor reported
        assert all(process_alive(pid) for pid in pids)
        assert {(s["host"], s["slots"], s["state"]) for s in pool.status()} == {
            ("127.0.0.1", 2, "ready")
        }
        assert all(actor_exists(placement, h.tm_id) for h in handles)
    finally:
        await pool.shutdown()
    assert [h.exit_code for h in handles] == [0, 0]
    assert not any(actor_exists(placement, h.tm_id) for h in handles)
    wait_until_gone(pids, "the actors' worker processes to exit")
    assert pool.losses == []


@pytest.mark.asyncio
async def test_a_killed_actor_is_a_lost_taskmanager_and_a_fresh_actor_replaces_it(
    ray_address: str, tmp_path: Path
) -> None:
    import ray

    placement = RayPlacement()
    async with ray_pool(tmp_path, placement) as pool:
        victim, survivor = await pool.start(2)
        watch = asyncio.create_task(pool.watch())
        await asyncio.sleep(0)
        assert not watch.done()
        ray.kill(ray.get_actor(victim.tm_id, namespace=placement.namespace))
        with pytest.raises(TaskManagerLostError) as lost:
            await watch
        assert lost.value.loss.cause in LOST_AT_ONCE
        assert lost.value.loss.tm_id == victim.tm_id
        assert f"TaskManager tm-1 (pid {victim.pid}) lost" in str(lost.value)
        assert survivor.state is TaskManagerState.READY
        (fresh,) = await pool.replace_lost()
        assert fresh.tm_id == "tm-3" and fresh.state is TaskManagerState.READY
        assert fresh.pid not in (victim.pid, survivor.pid) and process_alive(fresh.pid)
        assert not actor_exists(placement, victim.tm_id)
        assert [h.tm_id for h in pool.taskmanagers] == ["tm-2", "tm-3"]
    assert not any(actor_exists(placement, tm) for tm in ("tm-1", "tm-2", "tm-3"))


@pytest.mark.asyncio
async def test_an_actor_that_cannot_reach_its_jobmanager_says_so(ray_address: str) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    placement = RayPlacement()
    try:
        taskmanager = await placement.start("tm-1", "127.0.0.1", port)
        assert await taskmanager.wait() == 1
        assert taskmanager.recent_output() == [
            f"TaskManager tm-1 cannot reach its JobManager at 127.0.0.1:{port}: "
            "[Errno 111] Connection refused"
        ]
        assert not actor_exists(placement, "tm-1")
    finally:
        await placement.close()


@pytest.mark.asyncio
async def test_an_actor_ray_cannot_place_fails_the_start_in_one_line(
    ray_address: str, tmp_path: Path
) -> None:
    placement = RayPlacement(cpus_per_taskmanager=RAY_CPUS * 16, placement_timeout_s=1.0)
    pool = ray_pool(tmp_path, placement)
    try:
        with pytest.raises(TaskManagerStartError) as failed:
            await pool.start(1)
    finally:
        await pool.shutdown()
    # The CPUs of the actors of earlier tests may take a moment to show as free again.
    assert re.fullmatch(
        "cannot start TaskManager tm-1: Ray did not start the actor of TaskManager tm-1 within "
        f"1s: it asks for {RAY_CPUS * 16} CPU; the cluster has [0-9.]+ of {RAY_CPUS} CPUs free; "
        r"run fewer TaskManagers \(--taskmanagers\), or add nodes to the cluster",
        str(failed.value),
    )
    assert not actor_exists(placement, "tm-1")


@pytest.mark.asyncio
async def test_an_actor_checks_that_it_can_write_into_the_checkpoint_directory(
    ray_address: str, tmp_path: Path
) -> None:
    unreachable = tmp_path / "not-mounted" / "chk"
    spec = job_spec(write_job(tmp_path), checkpoint_dir=unreachable)
    pool = TaskManagerPool(RayPlacement(), spec, GraphFingerprint.of(spec.build_graph()))
    try:
        with pytest.raises(TaskManagerStartError) as failed:
            await pool.start(1)
    finally:
        await pool.shutdown()
    assert str(failed.value).startswith("TaskManager tm-1 (pid ")
    assert (
        f"on host 127.0.0.1 cannot write into the checkpoint directory {unreachable}: "
        "[Errno 2] No such file or directory;" in str(failed.value)
    )


# --------------------------------------------------------------------------- python -m runtime run

ON_RAY = ("--cluster", "ray")


def test_wordcount_on_two_ray_taskmanagers_counts_as_in_one_process(
    on_the_test_cluster: str, tmp_path: Path
) -> None:
    counts = {}
    for taskmanagers, placement in ((1, ()), (2, ON_RAY)):
        out = tmp_path / f"counts-{taskmanagers}.jsonl"
        run_at_parallelism_4(WORDCOUNT, taskmanagers, *placement, "--set", f"output={out}")
        counts[taskmanagers] = sorted(out.read_text().splitlines())
    assert counts[1], "the single-process run counted nothing"
    assert counts[2] == counts[1]


def test_cluster_ray_runs_every_subtask_in_one_taskmanager_actor_with_one_taskmanager(
    on_the_test_cluster: str, tmp_path: Path
) -> None:
    job = write_job_file(tmp_path, "pids.py", PIDS_JOB)
    out = tmp_path / "pids.jsonl"
    with job_running_on_taskmanagers(
        tmp_path, job, 2, 1, *ON_RAY, "--set", f"output={out}"
    ) as running:
        [taskmanager] = running.status["taskmanagers"]
        assert taskmanager["host"] == "127.0.0.1" and taskmanager["pid"] != running.proc.pid
        assert {t["taskmanager"] for t in running.status["tasks"]} == {taskmanager["id"]}
        wait_for(out.exists, "records", running.proc, running.stderr)
        assert run_cli("cancel", "--address", running.address).returncode == 0
        assert running.wait(timeout=30) == 130, running.stderr.read_text()
    wait_until_gone([taskmanager["pid"]], "the TaskManager actor to end with the job")
    pids = {orjson.loads(line)["pid"] for line in out.read_bytes().splitlines()}
    assert pids == {taskmanager["pid"]}


def test_a_killed_taskmanager_actor_is_replaced_and_the_output_is_exactly_once(
    on_the_test_cluster: str, tmp_path: Path
) -> None:
    # The TaskManager's actor process is SIGKILLed, as a node that fails would end it.
    assert_a_killed_taskmanager_is_replaced_exactly_once(tmp_path, *ON_RAY)


def test_no_taskmanager_actor_outlives_a_sigkilled_jobmanager(
    on_the_test_cluster: str, tmp_path: Path
) -> None:
    job = write_job_file(tmp_path, "pids.py", PIDS_JOB)
    out = tmp_path / "out.jsonl"
    with job_on_two_taskmanagers(tmp_path, job, 2, *ON_RAY, "--set", f"output={out}") as running:
        stop_process(running.proc)
    assert running.proc.returncode == -signal.SIGKILL
    pids = [tm["pid"] for tm in running.status["taskmanagers"]]
    wait_until_gone(pids, "the TaskManager actors to end", timeout=5.0)


def test_the_single_machine_path_imports_nothing_from_ray(tmp_path: Path) -> None:
    out = tmp_path / "counts.jsonl"
    result = run_main_in_a_child(
        *("run", str(WORDCOUNT), "--taskmanagers", "2", "--set", f"output={out}", *QUIET),
        before="import runtime, runtime.cluster.placement, runtime.cluster.deployment",
        after="assert 'ray' not in sys.modules, 'Ray was imported'",
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text()


def run_main_in_a_child(
    *args: str, before: str = "", after: str = ""
) -> subprocess.CompletedProcess[str]:
    """``runtime.shell.cli.main(args)`` in a fresh interpreter, between ``before`` and ``after``;
    it exits with what ``main`` returned."""
    script = "\n".join(
        [
            "import sys",
            before,
            "from runtime.shell.cli import main",
            f"code = main({list(args)!r})",
            after,
            "sys.exit(code)",
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cluster_ray_without_ray_installed_is_a_usage_error() -> None:
    # As if Ray were not installed: an import of it finds nothing.
    result = run_main_in_a_child(
        *("run", str(WORDCOUNT), "--cluster", "ray"), before="sys.modules['ray'] = None"
    )
    assert result.returncode == 2
    assert result.stderr.endswith(
        "error: --cluster ray needs Ray, an optional extra of this runtime: "
        "pip install -e '.[ray]' (or pip install 'ray>=2.60')\n"
    )


def test_an_unreachable_ray_cluster_fails_the_start_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    result = run_cli("run", str(WORDCOUNT), "--cluster", "ray", *QUIET)
    assert result.returncode == 1
    assert result.stderr.endswith(
        f"error: cannot start TaskManager tm-1: cannot reach the Ray cluster at "
        f"RAY_ADDRESS=127.0.0.1:{port}: [Errno 111] Connection refused; is its head running "
        "(ray start --head), and is RAY_ADDRESS its HOST:PORT?\n"
    )


def test_a_jobmanager_host_without_taskmanagers_is_a_usage_error() -> None:
    result = run_cli("run", str(WORDCOUNT), "--jobmanager-host", "localhost")
    assert result.returncode == 2
    assert result.stderr.endswith(
        "error: --jobmanager-host needs TaskManagers (--taskmanagers N, or --cluster ray)\n"
    )
