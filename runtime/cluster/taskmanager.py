"""A TaskManager: registers with its JobManager, builds the job graph itself, serves commands.

:func:`run_taskmanager` is the whole life of one TaskManager; ``python -m runtime taskmanager``
runs it in a process of its own, and a Ray actor can await it as it is.

The control connection is served by two threads of its own (:class:`ControlLink`), not by the
event loop: the loop runs the subtasks' user functions, and one that computes for a second must
not stop the heartbeats nor hide the end of the connection. A TaskManager never outlives its
JobManager: it ends when the connection ends, when its parent process (the JobManager that
started it) is gone, and, should a user function keep the loop from ending it, a watchdog thread
ends the process a few seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.protocol import CommandForTask
from actors.remote import DataPlane
from actors.wire import WireFormatError, decode_message, encode_message, frame, read_frame_blocking
from runtime.api.streams import JobDefinitionError
from runtime.cluster.jobspec import GraphFingerprint, JobSpec
from runtime.cluster.messages import (
    CheckpointDirectoryUnwritable,
    DeployAttempt,
    Heartbeat,
    JobGraphFailed,
    JobGraphReady,
    RegisterTaskManager,
    RegistrationRefused,
    ReleaseAttempt,
    ShutdownTaskManager,
    TaskManagerRegistered,
)
from runtime.cluster.tasks import TaskManagerTasks
from runtime.plan.graph import JobGraph
from runtime.plan.jobfile import JobFileError

log = logging.getLogger(__name__)

EXIT_SHUT_DOWN = 0
EXIT_FAILED = 1
"""It lost or could not reach its JobManager, or was refused by it."""

CONNECT_TIMEOUT_S = 10.0

DEFAULT_EXIT_GRACE_S = 5.0
"""Once the JobManager is lost, how long the event loop has to close the tasks before the
watchdog ends the process anyway (a user function that does not return)."""

PARENT_CHECK_INTERVAL_S = 0.5
"""How often the watchdog checks that the parent process still lives."""

KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 3
"""TCP keepalive of the control connection: a JobManager host that vanished without closing the
connection (power, network) is noticed within about 16 seconds. A process that dies, on any
host, closes its connections at once."""


@dataclass(frozen=True)
class TaskManagerExit:
    code: int
    """:data:`EXIT_SHUT_DOWN` or :data:`EXIT_FAILED`."""
    reason: str
    """Completes "TaskManager tm-1 ...": ``lost its JobManager at 127.0.0.1:4242: ...``."""


class JobManagerLostError(Exception):
    """The control connection ended, or the parent process is gone."""


@dataclass(frozen=True)
class _LinkEnded:
    reason: str


@dataclass(frozen=True)
class _StartHeartbeats:
    frame: bytes
    interval_s: float


class _Close:
    """Tells the writer thread to stop once everything sent before is written."""


class ControlLink:
    """This TaskManager's end of its control connection.

    A reader thread reads frames and hands the decoded messages to the event loop
    (:meth:`receive`); a writer thread writes what the loop :meth:`send` s, in order, and the
    heartbeats. Both run whatever the loop does. :meth:`end` and the reader's end of stream make
    every further :meth:`receive` raise :class:`JobManagerLostError` and call ``on_end`` (from the
    thread that noticed).
    """

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_end: Callable[[str], None],
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._on_end = on_end
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._outbox: queue.Queue[bytes | _StartHeartbeats | _Close] = queue.Queue()
        self._closing = threading.Event()
        self._end_lock = threading.Lock()
        self._ended = False
        self._reader = threading.Thread(target=self._read, name="control-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="control-writer", daemon=True)

    @property
    def local_host(self) -> str:
        host: str = self._sock.getsockname()[0]
        return host

    def start(self) -> None:
        self._reader.start()
        self._writer.start()

    def send(self, message: Any) -> None:
        """Queue a wire message for the JobManager (encoded here: a bad field raises here)."""
        self._outbox.put(frame(encode_message(message)))

    def start_heartbeats(self, heartbeat: Heartbeat, interval_s: float) -> None:
        self._outbox.put(_StartHeartbeats(frame(encode_message(heartbeat)), interval_s))

    async def receive(self) -> Any:
        """The next message from the JobManager; raises :class:`JobManagerLostError` once the
        link ended."""
        item = await self._inbox.get()
        if isinstance(item, _LinkEnded):
            self._inbox.put_nowait(item)
            raise JobManagerLostError(item.reason)
        return item

    def end(self, reason: str) -> None:
        """The JobManager is lost (any thread); the first reason is the one reported."""
        with self._end_lock:
            if self._ended:
                return
            self._ended = True
        self._post(_LinkEnded(reason))
        self._on_end(reason)

    def close(self, timeout_s: float = 1.0) -> None:
        """Write what was sent (for up to ``timeout_s``), then close the connection."""
        self._closing.set()
        self._outbox.put(_Close())
        self._writer.join(timeout_s)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _post(self, item: Any) -> None:
        # A closed loop (the TaskManager is ending) has nobody left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, item)

    def _read(self) -> None:
        reason = "the JobManager closed the control connection"
        try:
            with self._sock.makefile("rb") as stream:
                while (payload := read_frame_blocking(stream)) is not None:
                    self._post(decode_message(payload))
        except (OSError, WireFormatError) as exc:
            reason = f"the control connection broke ({exc})"
        if not self._closing.is_set():
            self.end(reason)

    def _write(self) -> None:
        heartbeat: bytes | None = None
        interval_s = 0.0
        next_beat = 0.0
        while True:
            timeout = None if heartbeat is None else max(0.0, next_beat - time.monotonic())
            try:
                item = self._outbox.get(timeout=timeout)
            except queue.Empty:
                assert heartbeat is not None
                item = heartbeat
                next_beat = time.monotonic() + interval_s
            if isinstance(item, _Close):
                return
            if isinstance(item, _StartHeartbeats):
                heartbeat, interval_s, next_beat = item.frame, item.interval_s, time.monotonic()
                continue
            try:
                self._sock.sendall(item)
            except OSError as exc:
                if not self._closing.is_set():
                    self.end(f"the control connection broke ({exc})")
                return


class _Watchdog:
    """A thread that notices a parent process that is gone, and ends this process when the
    event loop did not end it within ``exit_grace_s`` of losing the JobManager."""

    def __init__(self, tm_id: str, parent_pid: int | None, exit_grace_s: float | None) -> None:
        self._tm_id = tm_id
        self._parent_pid = parent_pid
        self._exit_grace_s = exit_grace_s
        self._on_parent_gone: Callable[[str], None] = lambda reason: None
        self._deadline: float | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self, on_parent_gone: Callable[[str], None]) -> None:
        self._on_parent_gone = on_parent_gone
        if self._parent_pid is not None or self._exit_grace_s is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def jobmanager_lost(self) -> None:
        if self._exit_grace_s is not None and self._deadline is None:
            self._deadline = time.monotonic() + self._exit_grace_s

    def _run(self) -> None:
        parent_reported = False
        while not self._stopped.wait(PARENT_CHECK_INTERVAL_S):
            if (
                self._parent_pid is not None
                and not parent_reported
                and os.getppid() != self._parent_pid
            ):
                parent_reported = True
                self._on_parent_gone(f"its parent process (pid {self._parent_pid}) is gone")
                self.jobmanager_lost()
            if self._deadline is not None and time.monotonic() >= self._deadline:
                line = (
                    f"error: TaskManager {self._tm_id} lost its JobManager and its event loop did "
                    f"not end within {self._exit_grace_s}s (a user function that does not "
                    "return?): exiting now\n"
                )
                # Its stderr may be a pipe to the JobManager that is gone.
                with contextlib.suppress(OSError, ValueError):
                    os.write(sys.stderr.fileno(), line.encode())
                os._exit(EXIT_FAILED)


class TaskManager:
    """The control side of one TaskManager: it registers, builds the job graph the JobManager
    names, and serves the JobManager's deployments and commands (:mod:`runtime.cluster.tasks`)
    until it is shut down or loses the JobManager; then the tasks still running are cancelled.

    Handlers run on the event loop, one message at a time, in the order the JobManager sent them.
    """

    def __init__(self, tm_id: str, slots: int, link: ControlLink, jobmanager_address: str) -> None:
        self.tm_id = tm_id
        self.jobmanager_address = jobmanager_address
        self.slots = slots
        self.link = link
        self.job: JobSpec | None = None
        self.graph: JobGraph | None = None
        self.plane = DataPlane(link.local_host)
        """Channels to the subtasks of the other TaskManagers, at the address the JobManager
        reaches this one from (loopback for local TaskManagers)."""
        self.tasks: TaskManagerTasks | None = None
        self._handlers: dict[type, Callable[[Any], Any]] = {
            TaskManagerRegistered: self._on_registered,
            RegistrationRefused: self._on_refused,
            ShutdownTaskManager: self._on_shutdown,
            DeployAttempt: self._on_deploy,
            CommandForTask: self._on_command,
            ReleaseAttempt: self._on_release,
        }

    async def run(self) -> TaskManagerExit:
        await self.plane.start()
        try:
            return await self._serve()
        finally:
            if self.tasks is not None:
                await self.tasks.close()
            else:
                await self.plane.close()

    async def _serve(self) -> TaskManagerExit:
        self.link.send(
            RegisterTaskManager(
                self.tm_id, os.getpid(), self.link.local_host, self.plane.port, self.slots
            )
        )
        while True:
            try:
                message = await self.link.receive()
            except JobManagerLostError as exc:
                return TaskManagerExit(
                    EXIT_FAILED, f"lost its JobManager at {self.jobmanager_address}: {exc}"
                )
            handler = self._handlers.get(type(message))
            if handler is None:
                return TaskManagerExit(
                    EXIT_FAILED,
                    f"got a {type(message).__name__} it cannot handle from the JobManager",
                )
            outcome = handler(message)
            if inspect.isawaitable(outcome):
                outcome = await outcome
            if outcome is not None:
                return outcome  # type: ignore[no-any-return]

    def _on_registered(self, message: TaskManagerRegistered) -> None:
        self.link.start_heartbeats(Heartbeat(self.tm_id), message.heartbeat_interval_s)
        self.job = message.job
        unwritable = probe_checkpoint_directory(message.job, self.tm_id, self.link.local_host)
        if unwritable is not None:
            self.link.send(unwritable)
            return
        # On the event loop, where the tasks will use the graph; heartbeats go on from their thread.
        try:
            self.graph = message.job.build_graph()
        except Exception as exc:
            reason = _one_line(exc, message.job.job_file)
            if isinstance(exc, JobFileError | JobDefinitionError):
                log.error("TaskManager %s: %s", self.tm_id, exc)
            else:
                log.exception(
                    "TaskManager %s: build(job) of %s raised", self.tm_id, self.job.job_file
                )
            self.link.send(JobGraphFailed(reason))
            return
        self.tasks = TaskManagerTasks(
            self.tm_id, self.graph, message.job.config.to_config(), self.plane, self.link.send
        )
        self.link.send(JobGraphReady(GraphFingerprint.of(self.graph)))

    def _deployed_tasks(self, message: Any) -> TaskManagerTasks:
        if self.tasks is None:
            msg = f"got a {type(message).__name__} before the job graph was built"
            raise RuntimeError(msg)
        return self.tasks

    async def _on_deploy(self, message: DeployAttempt) -> None:
        await self._deployed_tasks(message).deploy(message)

    def _on_command(self, message: CommandForTask) -> None:
        self._deployed_tasks(message).command(message)

    def _on_release(self, message: ReleaseAttempt) -> None:
        self._deployed_tasks(message).release(message)

    def _on_refused(self, message: RegistrationRefused) -> TaskManagerExit:
        return TaskManagerExit(
            EXIT_FAILED,
            f"was refused by the JobManager at {self.jobmanager_address}: {message.reason}",
        )

    def _on_shutdown(self, message: ShutdownTaskManager) -> TaskManagerExit:
        return TaskManagerExit(EXIT_SHUT_DOWN, f"shut down by the JobManager: {message.reason}")


def probe_checkpoint_directory(
    job: JobSpec, tm_id: str, host: str
) -> CheckpointDirectoryUnwritable | None:
    """Create and remove a file in the job's checkpoint directory; what went wrong, if anything.
    Never creates the directory (the JobManager did): on a node where the shared file system is
    not mounted, the directory is not there, and that must fail the start, not go unnoticed."""
    if job.checkpoint_dir is None:
        return None
    probe = os.path.join(job.checkpoint_dir, f".taskmanager-probe-{tm_id}-{os.getpid()}")
    try:
        with open(probe, "xb") as file:
            file.write(b"probe")
        os.remove(probe)
    except OSError as exc:
        log.error("TaskManager %s cannot write into %s: %s", tm_id, job.checkpoint_dir, exc)
        error = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
        return CheckpointDirectoryUnwritable(job.checkpoint_dir, host, error)
    return None


def _one_line(exc: Exception, job_file: str) -> str:
    """The first line of what went wrong (the whole of it went to this TaskManager's stderr)."""
    first = next(iter(str(exc).splitlines()), "")
    if isinstance(exc, JobFileError):
        return first
    if isinstance(exc, JobDefinitionError):
        return f"invalid job {job_file}: {first}"
    return f"build(job) in {job_file} raised {type(exc).__name__}: {first}"


async def run_taskmanager(
    jobmanager_host: str,
    jobmanager_port: int,
    tm_id: str,
    slots: int = 1,
    *,
    parent_pid: int | None = None,
    exit_grace_s: float | None = None,
) -> TaskManagerExit:
    """Be TaskManager ``tm_id`` of the JobManager at ``jobmanager_host:jobmanager_port`` until it
    shuts this one down (:data:`EXIT_SHUT_DOWN`) or is lost (:data:`EXIT_FAILED`).

    ``parent_pid``: the JobManager's pid when it is this process's parent; its end counts as the
    JobManager's loss. ``exit_grace_s``: once the JobManager is lost, end the whole process
    (``os._exit``) if this coroutine did not return within so many seconds; only for a process
    of its own, never inside a process that hosts more than this TaskManager.
    """
    address = f"{jobmanager_host}:{jobmanager_port}"
    try:
        sock = await asyncio.to_thread(_connect, jobmanager_host, jobmanager_port)
    except OSError as exc:
        return TaskManagerExit(EXIT_FAILED, f"cannot reach its JobManager at {address}: {exc}")
    watchdog = _Watchdog(tm_id, parent_pid, exit_grace_s)
    link = ControlLink(sock, asyncio.get_running_loop(), lambda reason: watchdog.jobmanager_lost())
    link.start()
    watchdog.start(on_parent_gone=link.end)
    outcome: TaskManagerExit | None = None
    try:
        outcome = await TaskManager(tm_id, slots, link, address).run()
    finally:
        if outcome is not None and outcome.code == EXIT_SHUT_DOWN:
            watchdog.stop()
        else:
            # Lost or failed: the watchdog stays armed until the process is gone.
            watchdog.jobmanager_lost()
        link.close()
    return outcome


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return sock
