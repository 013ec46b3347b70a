"""TaskManagers as Ray actors (``--cluster ray``): Ray places and supervises them, nothing more.

Each TaskManager is one Ray actor in a Ray worker process of its own, asking Ray for
``cpus_per_taskmanager`` CPUs (default 1: a TaskManager runs its subtasks on one event loop, so
it keeps one core busy whatever its slots). The actor runs
:func:`~runtime.cluster.taskmanager.run_taskmanager`, which connects back to the JobManager over
the runtime's own control connection; records move between TaskManagers over the runtime's own
data plane (:mod:`actors.remote`), never through Ray. Failure handling stays the job master's: a
killed actor's process ends its control connection, which the
:class:`~runtime.cluster.jobmanager.TaskManagerPool` sees as a lost TaskManager. Ray never
restarts an actor (``max_restarts=0``); the job master starts fresh TaskManagers itself. The
actors are owned by the JobManager's Ray driver, so Ray ends them when the JobManager ends (and
each TaskManager ends by itself when its control connection ends).

Inside the actor the TaskManager runs as in a process of its own: on an event loop of its own
(uvloop) in a thread of its own, which the actor's ``run`` method starts and joins. Not an async
actor: that event loop is Ray's, serves Ray's calls to the actor and is no uvloop, and a user
function that computes for a while would hold it. Not the worker's main thread either: an event
loop there takes over its signal handling (the wakeup fd), which is Ray's. The TaskManager's
heartbeats come from threads of their own as everywhere, so a busy event loop stops neither them
nor Ray's own work in the worker.

Which Ray: the cluster at ``RAY_ADDRESS`` when it is set, else a local instance that the
placement starts, bound to loopback only (:data:`SINGLE_MACHINE_SWITCH`), and stops again at
:meth:`RayPlacement.close`. A process already connected to Ray (a test, a notebook) keeps its
connection. Ray is an optional extra (``pip install -e '.[ray]'``): nothing imports this module
but ``--cluster ray``, and it imports Ray only when a placement connects.

Every node Ray may place a TaskManager on needs this runtime (the same version, importable), the
job file at the same path, and the checkpoint directory (a shared file system; each TaskManager
checks that it can write there when it starts); and the JobManager must listen on an address the
nodes reach (``run --jobmanager-host``; loopback by default, right for a local instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import logging
import os
import socket
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from runtime.cluster.placement import (
    TaskManagerPlacement,
    TaskManagerProcess,
    end_all,
    runtime_import_path,
)
from runtime.process import run_on_new_loop

log = logging.getLogger(__name__)

DEFAULT_CPUS_PER_TASKMANAGER = 1.0

PLACEMENT_TIMEOUT_S = 60.0
"""From asking Ray for a TaskManager's actor to the actor running: Ray must find a node with the
CPUs free and start a worker process there."""

ACTOR_END_TIMEOUT_S = 10.0
"""How long Ray may take to report the end of an actor that was killed."""

RAY_CONNECT_TIMEOUT_S = 5.0
"""How long the Ray cluster named by ``RAY_ADDRESS`` may take to accept a TCP connection; Ray
itself would retry for minutes."""

LOOPBACK = "127.0.0.1"

SINGLE_MACHINE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's documented switch between one machine and a cluster of several (off by default on macOS
and Windows), read when Ray is imported. Set to 0 (unless set already) for a local instance or a
cluster at a loopback address: the node address is then 127.0.0.1 and every server of Ray, the
driver's included, listens there only. On, Linux's default, Ray replaces a loopback node address
by the machine's outward one, and its servers listen on every interface."""

DRIVER_ENVIRONMENT = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray folds identical lines printed by several workers into one: every line a print() sink
    # writes in a TaskManager must reach the JobManager's output.
    "RAY_DEDUP_LOGS": "0",
}
"""Set (unless set already) before Ray is imported, whatever the cluster."""


class RayPlacementError(OSError):
    """Ray cannot be reached, or did not start a TaskManager's actor (one line, says what to do).
    An ``OSError``, as a process that cannot be started."""


def ray_address() -> str | None:
    """The Ray cluster to use, from ``RAY_ADDRESS``; None: start a local instance."""
    return os.environ.get("RAY_ADDRESS") or None


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray, unless it is connected already: to the cluster at ``address``
    (``HOST:PORT`` of its head, or ``auto``), else to a new local instance on loopback only,
    with ``num_cpus`` CPUs for its actors (default: the machine's cores). Returns whether this
    call connected, and so whether its caller is to :func:`disconnect_ray` at the end. Blocks
    (seconds, for a local instance).

    Ray's local processes end with the thread that started them: call it from a thread that lives
    until :func:`disconnect_ray`. Raises :class:`RayPlacementError` when the cluster cannot be
    reached, or when Ray would not keep to loopback for a local instance or a cluster at a
    loopback address.
    """
    imported = sys.modules.get("ray")
    if imported is not None and imported.is_initialized():
        return False
    for name, value in DRIVER_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if not sys.stdout.isatty():
        # Ray colours the prefix of the lines it forwards from the actors: not into a file.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if address is None or _is_loopback(address):
        _keep_ray_on_loopback(ray_imported=imported is not None)
    import ray

    if address is not None:
        _check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError) as exc:
            msg = f"cannot connect to the Ray cluster at RAY_ADDRESS={address}: {_first_line(exc)}"
            raise RayPlacementError(msg) from exc
        log.info("connected to the Ray cluster at %s", address)
        return True
    ray.init(
        address="local",
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        num_cpus=num_cpus,
        logging_level=logging.ERROR,
    )
    node_address = _node_address()
    if node_address != LOOPBACK:
        ray.shutdown()
        msg = f"the local Ray instance took the node address {node_address}, not {LOOPBACK}"
        raise RayPlacementError(msg)
    log.info("started a local Ray instance on %s", LOOPBACK)
    return True


def _keep_ray_on_loopback(ray_imported: bool) -> None:
    """Make Ray keep to loopback (:data:`SINGLE_MACHINE_SWITCH`), or say why it cannot."""
    was_set = SINGLE_MACHINE_SWITCH in os.environ
    value = os.environ.setdefault(SINGLE_MACHINE_SWITCH, "0")
    if value != "0":
        msg = (
            f"{SINGLE_MACHINE_SWITCH}={value} in the environment would make Ray listen beyond "
            "loopback: unset it, or run against a Ray cluster (RAY_ADDRESS)"
        )
        raise RayPlacementError(msg)
    if ray_imported and not was_set:
        msg = (
            f"Ray was imported before {SINGLE_MACHINE_SWITCH}=0 was set, so it would listen "
            f"beyond loopback: export {SINGLE_MACHINE_SWITCH}=0 before starting, or run against "
            "a Ray cluster (RAY_ADDRESS)"
        )
        raise RayPlacementError(msg)


def disconnect_ray() -> None:
    """Disconnect from Ray; a local instance that :func:`connect_ray` started stops."""
    import ray

    ray.shutdown()


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0] if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        msg = (
            f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {exc}; is its head running "
            "(ray start --head), and is RAY_ADDRESS its HOST:PORT?"
        )
        raise RayPlacementError(msg) from exc


def _node_address() -> str:
    """The address of the Ray node this process runs on."""
    import ray

    address: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    return address


def _cluster_cpus() -> tuple[float, float]:
    """The CPUs of the Ray cluster: free, and in all."""
    import ray

    free: float = ray.available_resources().get("CPU", 0.0)  # type: ignore[no-untyped-call]
    total: float = ray.cluster_resources().get("CPU", 0.0)  # type: ignore[no-untyped-call]
    return free, total


def _first_line(exc: BaseException) -> str:
    return next(iter(str(exc).strip().splitlines()), type(exc).__name__)


class TaskManagerActor:
    """The Ray actor that hosts one TaskManager (see the module docstring). The placement calls
    :meth:`identity`, then :meth:`run` and :meth:`until_ended`, which run side by side (two
    method calls at a time: ``max_concurrency=2``)."""

    def __init__(self, tm_id: str) -> None:
        self.tm_id = tm_id

    def __repr__(self) -> str:
        # Ray prefixes each line the actor prints with this: "(TaskManager tm-1 pid=...)".
        return f"TaskManager {self.tm_id}"

    def identity(self) -> tuple[int, str]:
        """Its process id and the address of its node."""
        return os.getpid(), _node_address()

    def run(self, jobmanager_host: str, jobmanager_port: int, slots: int) -> tuple[int, str]:
        """Be the TaskManager until it ends; its exit code and reason
        (:class:`~runtime.cluster.taskmanager.TaskManagerExit`)."""
        from runtime.cluster.taskmanager import DEFAULT_EXIT_GRACE_S, run_taskmanager

        outcome: list[tuple[int, str]] = []
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                ended = run_on_new_loop(
                    run_taskmanager(
                        jobmanager_host,
                        jobmanager_port,
                        self.tm_id,
                        slots,
                        # The worker process hosts this TaskManager only: should a user function
                        # keep its loop from ending once the JobManager is lost, the process ends.
                        exit_grace_s=DEFAULT_EXIT_GRACE_S,
                    )
                )
                outcome.append((ended.code, ended.reason))
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=serve, name=f"taskmanager-{self.tm_id}")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return outcome[0]

    def until_ended(self) -> None:
        """Returns never: the call fails once Ray has the actor for dead, which is how the
        placement learns that it ended."""
        threading.Event().wait()


class RayTaskManagerProcess(TaskManagerProcess):
    """A TaskManager's Ray actor, as its placement sees it. ``pid`` and ``host``: the actor's
    worker process and the address of its node, as the actor reported them."""

    def __init__(
        self, tm_id: str, pid: int, host: str, actor: Any, running: Any, lifetime: Any
    ) -> None:
        self.tm_id = tm_id
        self.pid = pid
        self.host = host
        self.actor = actor
        self._running = running
        """The ObjectRef of the actor's ``run`` call: its outcome, or the actor's death."""
        self._lifetime = lifetime
        """The ObjectRef of its ``until_ended`` call, which fails once Ray has it for dead."""
        self._ended: asyncio.Task[int | None] | None = None
        self._output: list[str] = []

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)

    async def wait(self) -> int | None:
        """The TaskManager's exit code once the actor ended; None when the actor was killed or
        its process died (Ray does not tell how)."""
        if self._ended is None:
            self._ended = asyncio.ensure_future(self._wait_ended())
        return await asyncio.shield(self._ended)

    def recent_output(self) -> list[str]:
        """Why its TaskManager ended, when it ended by itself with a failure."""
        return list(self._output)

    async def _wait_ended(self) -> int | None:
        from ray.exceptions import RayActorError, RayError

        code: int | None
        try:
            code, reason = await self._running
        except RayActorError as exc:
            log.info("the actor of TaskManager %s ended: %s", self.tm_id, _first_line(exc))
            code = None
        except RayError as exc:
            # run() raised: a bug, not a TaskManager that ended in an orderly way.
            self._output.append(f"its actor failed: {_first_line(exc)}")
            code = 1
        else:
            if code != 0:
                self._output.append(f"TaskManager {self.tm_id} {reason}")
        # The TaskManager ended; its actor goes too, so that its CPUs return to Ray. Killed, not
        # left to exit by itself: Ray keeps the name of an actor that did so registered.
        self.kill()
        try:
            await asyncio.wait_for(self._lifetime, ACTOR_END_TIMEOUT_S)
        except RayError:
            pass  # how the call ends once Ray has the actor for dead
        except TimeoutError:
            log.warning(
                "Ray did not report the end of the actor of TaskManager %s within %ss",
                self.tm_id,
                ACTOR_END_TIMEOUT_S,
            )
        return code


def ray_placement(slots: int) -> RayPlacement:
    """``--cluster ray``: TaskManagers of ``slots`` slots as Ray actors of one CPU each, on the
    cluster at ``RAY_ADDRESS`` or a local instance. Raises ``ValueError`` when Ray is not
    installed."""
    if importlib.util.find_spec("ray") is None:
        msg = (
            "--cluster ray needs Ray, an optional extra of this runtime: "
            "pip install -e '.[ray]' (or pip install 'ray>=2.60')"
        )
        raise ValueError(msg)
    return RayPlacement(slots)


class RayPlacement(TaskManagerPlacement):
    """TaskManagers as Ray actors, each with ``slots`` slots, asking for ``cpus_per_taskmanager``
    CPUs. Connects to Ray at the first :meth:`start` (``address``, default ``RAY_ADDRESS``, or a
    local instance on loopback) and, if it connected, disconnects at :meth:`close`.

    The actors are named by their TaskManager id in :attr:`namespace`, one of the placement's
    own, so that ``ray list actors`` tells them apart and two jobs on one cluster never clash.
    """

    def __init__(
        self,
        slots: int = 1,
        cpus_per_taskmanager: float = DEFAULT_CPUS_PER_TASKMANAGER,
        *,
        address: str | None = None,
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    ) -> None:
        if cpus_per_taskmanager <= 0:
            msg = f"a TaskManager's actor must ask for some CPU, not {cpus_per_taskmanager}"
            raise ValueError(msg)
        self.slots = slots
        self.cpus_per_taskmanager = cpus_per_taskmanager
        self.address = address if address is not None else ray_address()
        self.placement_timeout_s = placement_timeout_s
        self.namespace = f"pyflow-{uuid.uuid4().hex[:12]}"
        self._processes: list[RayTaskManagerProcess] = []
        # Ray's local processes end with the thread that started them: this one lives until close.
        self._ray_thread: ThreadPoolExecutor | None = None
        self._connected = False
        self._disconnect_at_close = False
        self._actor_class: Any = None

    async def start(
        self, tm_id: str, jobmanager_host: str, jobmanager_port: int
    ) -> RayTaskManagerProcess:
        await self._connect()
        import ray
        from ray.exceptions import RayError

        if self._actor_class is None:
            self._actor_class = ray.remote(TaskManagerActor)
        actor = self._actor_class.options(
            name=tm_id,
            namespace=self.namespace,
            num_cpus=self.cpus_per_taskmanager,
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=2,
            runtime_env={"env_vars": {"PYTHONPATH": runtime_import_path()}},
        ).remote(tm_id)
        try:
            pid, host = await asyncio.wait_for(actor.identity.remote(), self.placement_timeout_s)
        except TimeoutError as exc:
            ray.kill(actor, no_restart=True)
            raise RayPlacementError(self._not_placed(tm_id)) from exc
        except RayError as exc:
            ray.kill(actor, no_restart=True)
            msg = f"Ray could not start the actor of TaskManager {tm_id}: {_first_line(exc)}"
            raise RayPlacementError(msg) from exc
        running = actor.run.remote(jobmanager_host, jobmanager_port, self.slots)
        process = RayTaskManagerProcess(
            tm_id, pid, host, actor, running, actor.until_ended.remote()
        )
        self._processes.append(process)
        log.info("started TaskManager %s as a Ray actor (pid %d on %s)", tm_id, pid, host)
        return process

    async def close(self) -> None:
        await end_all(self._processes)
        self._processes.clear()
        if self._ray_thread is not None:
            if self._disconnect_at_close:
                await asyncio.get_running_loop().run_in_executor(self._ray_thread, disconnect_ray)
            self._ray_thread.shutdown()
            self._ray_thread = None

    async def _connect(self) -> None:
        if self._connected:
            return
        self._ray_thread = ThreadPoolExecutor(1, thread_name_prefix="ray-connection")
        self._disconnect_at_close = await asyncio.get_running_loop().run_in_executor(
            self._ray_thread, connect_ray, self.address
        )
        self._connected = True

    def _not_placed(self, tm_id: str) -> str:
        resources = ""
        with contextlib.suppress(Exception):  # only to say more: the failure is the timeout
            free, total = _cluster_cpus()
            resources = f"; the cluster has {free:g} of {total:g} CPUs free"
        return (
            f"Ray did not start the actor of TaskManager {tm_id} within "
            f"{self.placement_timeout_s:g}s: it asks for {self.cpus_per_taskmanager:g} CPU"
            f"{resources}; run fewer TaskManagers (--taskmanagers), or add nodes to the cluster"
        )
