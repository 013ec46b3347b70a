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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import listening_sockets, process_alive, process_tree, wait_until_gone
from test_cluster import job_spec, write_job

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
    """A local Ray instance on loopback for the module; its address (``RAY_ADDRESS`` form)."""
    outer = os.environ.pop("RAY_ADDRESS", None)
    try:
        assert connect_ray(num_cpus=RAY_CPUS), "this process was connected to Ray already"
        import ray

        yield ray.get_runtime_context().gcs_address
    finally:
        disconnect_ray()
        if outer is not None:
            os.environ["RAY_ADDRESS"] = outer


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
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim.tm_id, namespace=placement.namespace))
        with pytest.raises(TaskManagerLostError) as lost:
            await watch
        assert time.monotonic() - killed_at < 5.0
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
    import socket

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
    assert str(failed.value) == (
        "cannot start TaskManager tm-1: Ray did not start the actor of TaskManager tm-1 within "
        f"1s: it asks for {RAY_CPUS * 16} CPU; the cluster has {RAY_CPUS} of {RAY_CPUS} CPUs "
        "free; run fewer TaskManagers (--taskmanagers), ask for fewer CPUs each (--ray-cpus) or "
        "add nodes to the cluster"
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
