"""The JobManager's side of the TaskManagers: start them, accept their control connections, watch
their heartbeats, notice their loss, replace them, shut them down.

:class:`TaskManagerPool` is what the job master uses. It listens on loopback for the control
connections, starts TaskManagers through a :class:`~runtime.cluster.placement.TaskManagerPlacement`
and waits until each registered and built the same job graph (:meth:`TaskManagerPool.start`).
A TaskManager is lost when its control connection ends (at once: a process that dies closes its
sockets), when its process exits, or when no frame came from it for the heartbeat timeout;
:meth:`TaskManagerPool.watch` raises :class:`TaskManagerLostError` at the first loss, so a job
master that runs it next to an attempt's tasks fails the attempt. A lost TaskManager is killed at
once: one that only froze must not wake up later and write output for an attempt that was
given up. :meth:`TaskManagerPool.replace_lost` starts fresh ones in their place.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn

from actors.wire import WireFormatError, decode_message, encode_message, frame, read_frame
from runtime.cluster.jobspec import GraphFingerprint, JobSpec
from runtime.cluster.messages import (
    CheckpointDirectoryUnwritable,
    Heartbeat,
    JobGraphFailed,
    JobGraphReady,
    LossCause,
    RegisterTaskManager,
    RegistrationRefused,
    ShutdownTaskManager,
    TaskManagerLost,
    TaskManagerRegistered,
)
from runtime.cluster.placement import TaskManagerPlacement, TaskManagerProcess, describe_exit

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0
"""A TaskManager that sent nothing for this long is lost. Crashes do not wait for it (the
connection's end is seen at once); it only catches a process that is alive but frozen (stopped,
swapping) or unreachable. Heartbeats come from a thread of their own, so a user function that
keeps a TaskManager's event loop busy does not stop them; ten intervals leave room for a machine
whose cores are all busy and for C code that holds the GIL for seconds."""

DEFAULT_REGISTRATION_TIMEOUT_S = 60.0
"""From starting a TaskManager to its job graph being ready: an interpreter start, the runtime's
imports, the job file's imports and ``build(job)``, on a machine busy starting several at once."""

DEFAULT_STOP_TIMEOUT_S = 5.0
"""How long TaskManagers may take to exit after the shutdown message before they are killed."""

LOSS_EXIT_WAIT_S = 0.5
"""How long a loss report waits for the lost process's exit code (it was killed at once)."""

OUTPUT_LINES_REPORTED = 5

_ALIVE_WHEN_LOST = frozenset({LossCause.HEARTBEAT_TIMEOUT, LossCause.PROTOCOL_ERROR})
"""Causes of a loss that leave the process running until the pool kills it."""


@dataclass(frozen=True)
class HeartbeatConfig:
    interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 0 < 2 * self.interval_s <= self.timeout_s:
            msg = (
                f"heartbeat timeout {self.timeout_s}s must be at least twice the interval "
                f"{self.interval_s}s"
            )
            raise ValueError(msg)


class TaskManagerState(Enum):
    STARTING = "starting"
    """Its process was started; it has not registered yet."""
    REGISTERED = "registered"
    """Connected and registered; building the job graph."""
    READY = "ready"
    """It built the same job graph: it can run subtasks."""
    LOST = "lost"
    STOPPED = "stopped"
    """Shut down by the pool."""


class TaskManagerStartError(RuntimeError):
    """A TaskManager did not come up, or built another job graph (one line, says what to do)."""


class TaskManagerLostError(RuntimeError):
    """A TaskManager of the pool was lost; ``loss`` says which and why."""

    def __init__(self, loss: TaskManagerLost) -> None:
        super().__init__(loss.describe())
        self.loss = loss


class _NotReady(Exception):
    """Why a TaskManager did not become ready; ``process_trouble``: its exit code and last output
    explain it (not so for a job graph it could not build or built differently)."""

    def __init__(self, reason: str, process_trouble: bool) -> None:
        super().__init__(reason)
        self.process_trouble = process_trouble


class TaskManagerHandle:
    """The pool's view of one TaskManager. Its fields are the pool's to change."""

    def __init__(self, tm_id: str) -> None:
        self.tm_id = tm_id
        self.process: TaskManagerProcess | None = None
        """Set once the placement started it (it may register before that call returns)."""
        self.state = TaskManagerState.STARTING
        self.registration: RegisterTaskManager | None = None
        self.loss: TaskManagerLost | None = None
        self.exit_code: int | None = None
        self.exited = asyncio.Event()
        self.killed_by_pool = False
        self.frames_received = 0
        self._writer: asyncio.StreamWriter | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        if self.registration is not None:
            return self.registration.pid
        return self.process.pid if self.process is not None else None

    @property
    def host(self) -> str | None:
        if self.registration is not None:
            return self.registration.host
        return self.process.host if self.process is not None else None

    @property
    def label(self) -> str:
        """``TaskManager tm-1 (pid 4242)``, for messages."""
        pid = f" (pid {self.pid})" if self.pid is not None else ""
        return f"TaskManager {self.tm_id}{pid}"

    @property
    def data_port(self) -> int | None:
        return self.registration.data_port if self.registration else None

    @property
    def slots(self) -> int:
        return self.registration.slots if self.registration else 0

    @property
    def connected(self) -> bool:
        return self._writer is not None and self.state in (
            TaskManagerState.REGISTERED,
            TaskManagerState.READY,
        )

    def send(self, message: Any) -> bool:
        """Send a wire message to this TaskManager; False (and nothing sent) when it is not
        connected: its loss is reported once, by :meth:`TaskManagerPool.watch`."""
        if not self.connected:
            return False
        assert self._writer is not None
        self._writer.write(frame(encode_message(message)))
        return True

    def describe(self) -> dict[str, Any]:
        """For ``GET /status``."""
        return {
            "id": self.tm_id,
            "pid": self.pid,
            "host": self.host,
            "data_port": self.data_port,
            "slots": self.slots,
            "state": self.state.value,
            "lost": self.loss.detail if self.loss else None,
        }


class TaskManagerPool:
    """The TaskManagers of one job: started through ``placement``, each registers over its
    control connection, gets ``job`` and must build a graph with the fingerprint ``expected``.

    ``on_message(handle, message)`` gets every message that is not the pool's own (task state,
    checkpoint acknowledgements...), on the event loop, in the order each TaskManager sent them;
    ``on_lost(handle)`` is called when a ready TaskManager is declared lost (for whoever waits on
    its tasks: they will not report any more).
    Use it as ``async with pool:`` or call :meth:`shutdown` at the end.
    """

    def __init__(
        self,
        placement: TaskManagerPlacement,
        job: JobSpec,
        expected: GraphFingerprint,
        *,
        heartbeat: HeartbeatConfig | None = None,
        registration_timeout_s: float = DEFAULT_REGISTRATION_TIMEOUT_S,
        on_message: Callable[[TaskManagerHandle, Any], None] | None = None,
        on_lost: Callable[[TaskManagerHandle], None] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.placement = placement
        self.job = job
        self.expected = expected
        self.heartbeat = heartbeat or HeartbeatConfig()
        self.registration_timeout_s = registration_timeout_s
        self.on_message = on_message
        self.on_lost = on_lost
        self.host = host
        self.losses: list[TaskManagerLost] = []
        """Every loss so far, oldest first (replaced TaskManagers leave the pool, not this)."""
        self._handles: dict[str, TaskManagerHandle] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._lost = asyncio.Event()

    # ---------------------------------------------------------------- queries

    @property
    def address(self) -> tuple[str, int]:
        """Where TaskManagers connect to (once :meth:`start` ran)."""
        return self.host, self._port

    @property
    def taskmanagers(self) -> list[TaskManagerHandle]:
        """The pool's TaskManagers, in the order they were started; lost ones stay until
        :meth:`replace_lost`."""
        return list(self._handles.values())

    @property
    def lost(self) -> list[TaskManagerHandle]:
        return [h for h in self._handles.values() if h.state is TaskManagerState.LOST]

    def status(self) -> list[dict[str, Any]]:
        return [h.describe() for h in self._handles.values()]

    # ---------------------------------------------------------------- life cycle

    async def start(self, count: int) -> list[TaskManagerHandle]:
        """Start ``count`` TaskManagers and return once all are ready. Raises
        :class:`TaskManagerStartError` (after killing the ones it started) when one does not come
        up within the registration timeout or builds another job graph."""
        if self._server is None:
            self._server = await asyncio.start_server(self._serve_connection, self.host, 0)
            self._port = self._server.sockets[0].getsockname()[1]
        return await self._launch(count)

    async def replace_lost(self) -> list[TaskManagerHandle]:
        """Take the lost TaskManagers out of the pool and start as many fresh ones (with new ids);
        returns the new ones once they are ready, or raises as :meth:`start`."""
        lost = self.lost
        for handle in lost:
            await self._retire(handle)
        return await self._launch(len(lost)) if lost else []

    async def watch(self) -> NoReturn:
        """Never returns: raises :class:`TaskManagerLostError` at the first loss of a TaskManager
        (at once when one is lost already)."""
        while True:
            await self._lost.wait()
            lost = self.lost
            if lost:
                break
            self._lost.clear()
        handle = lost[0]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(handle.exited.wait(), LOSS_EXIT_WAIT_S)
        assert handle.loss is not None
        raise TaskManagerLostError(self._with_exit(handle, handle.loss))

    def fence(self, handle: TaskManagerHandle) -> None:
        """Kill a TaskManager that does not do as told (its tasks did not end when cancelled), so
        that it cannot go on with work that was given up; it is then lost (:meth:`watch`), and
        :meth:`replace_lost` replaces it."""
        self._kill(handle, fence=True)

    async def shutdown(
        self, reason: str = "the job ended", timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    ) -> None:
        """Ask every TaskManager to exit, kill those that did not within ``timeout_s``, and close
        the server and the placement."""
        handles = list(self._handles.values())
        for handle in handles:
            if handle.state in (TaskManagerState.LOST, TaskManagerState.STOPPED):
                continue
            if not handle.send(ShutdownTaskManager(reason)):
                self._kill(handle)  # not connected yet: nobody to ask
            handle.state = TaskManagerState.STOPPED
        exits = [asyncio.ensure_future(h.exited.wait()) for h in handles if h.process is not None]
        if exits:
            _, late = await asyncio.wait(exits, timeout=timeout_s)
            for future in late:
                future.cancel()
        for handle in handles:
            await self._retire(handle)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.placement.close()

    async def __aenter__(self) -> TaskManagerPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # ---------------------------------------------------------------- starting

    async def _launch(self, count: int) -> list[TaskManagerHandle]:
        handles: list[TaskManagerHandle] = []
        try:
            for _ in range(count):
                handle = TaskManagerHandle(f"tm-{next(self._ids)}")
                self._handles[handle.tm_id] = handle
                handles.append(handle)
                try:
                    handle.process = await self.placement.start(handle.tm_id, self.host, self._port)
                except OSError as exc:
                    msg = f"cannot start TaskManager {handle.tm_id}: {exc}"
                    raise TaskManagerStartError(msg) from exc
                handle._tasks.append(
                    asyncio.create_task(self._watch_exit(handle), name=f"{handle.tm_id}-exit")
                )
            await self._wait_ready(handles)
        except BaseException:
            for handle in handles:
                self._kill(handle)
                await self._retire(handle)
            raise
        log.info(
            "TaskManagers ready: %s",
            ", ".join(f"{h.tm_id} (pid {h.pid}, {h.slots} slots)" for h in handles),
        )
        return handles

    async def _wait_ready(self, handles: list[TaskManagerHandle]) -> None:
        pending = {h._ready: h for h in handles}
        first_failure: tuple[TaskManagerHandle, _NotReady] | None = None
        try:
            async with asyncio.timeout(self.registration_timeout_s):
                while pending and first_failure is None:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for future in done:
                        handle = pending.pop(future)
                        failure = future.exception()  # retrieved for every one that failed
                        if isinstance(failure, _NotReady) and first_failure is None:
                            first_failure = handle, failure
        except TimeoutError:
            handle = next(iter(pending.values()))
            waiting_for = (
                "it did not register"
                if handle.state is TaskManagerState.STARTING
                else "it did not build the job graph"
            )
            self._kill(handle, fence=True)
            first_failure = (
                handle,
                _NotReady(f"{waiting_for} within {self.registration_timeout_s:g}s", True),
            )
        finally:
            for future in pending:
                future.cancel()
        if first_failure is not None:
            handle, failure = first_failure
            raise TaskManagerStartError(await self._start_failure(handle, failure))

    async def _start_failure(self, handle: TaskManagerHandle, failure: _NotReady) -> str:
        if not failure.process_trouble:
            return f"{handle.label} {failure}"
        line = f"{handle.label} did not come up: {failure}"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(handle.exited.wait(), LOSS_EXIT_WAIT_S)
        exit_said = handle.loss is not None and handle.loss.cause == LossCause.PROCESS_EXITED
        if handle.exit_code is not None and not handle.killed_by_pool and not exit_said:
            line += f"; its process {describe_exit(handle.exit_code)}"
        recent = handle.process.recent_output() if handle.process is not None else []
        output = [text.strip() for text in recent if text.strip()]
        if output:
            line += "; its last output: " + " | ".join(output[-OUTPUT_LINES_REPORTED:])
        return line

    # ---------------------------------------------------------------- the control connection

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            registration = await self._read_registration(reader)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, WireFormatError) as exc:
            log.warning("a control connection ended before it registered: %s", exc)
            writer.close()
            return
        handle = self._handles.get(registration.tm_id)
        if handle is None or handle.state is not TaskManagerState.STARTING:
            reason = (
                f"no TaskManager {registration.tm_id!r} is expected"
                if handle is None
                else f"TaskManager {registration.tm_id!r} registered before (now {handle.state.value})"
            )
            log.warning(
                "refused the registration of TaskManager %s: %s", registration.tm_id, reason
            )
            writer.write(frame(encode_message(RegistrationRefused(reason))))
            writer.close()
            return
        handle.registration = registration
        handle._writer = writer
        handle.state = TaskManagerState.REGISTERED
        handle.send(TaskManagerRegistered(self.job, self.heartbeat.interval_s))
        current = asyncio.current_task()
        assert current is not None
        handle._tasks.append(current)
        handle._tasks.append(
            asyncio.create_task(self._watch_heartbeats(handle), name=f"{handle.tm_id}-heartbeats")
        )
        try:
            await self._read_messages(handle, reader)
        finally:
            handle._writer = None
            writer.close()

    async def _read_registration(self, reader: asyncio.StreamReader) -> RegisterTaskManager:
        async with asyncio.timeout(self.registration_timeout_s):
            payload = await read_frame(reader)
        if payload is None:
            msg = "the connection closed"
            raise WireFormatError(msg)
        message = decode_message(payload)
        if not isinstance(message, RegisterTaskManager):
            msg = f"expected a registration, got {type(message).__name__}"
            raise WireFormatError(msg)
        return message

    async def _read_messages(self, handle: TaskManagerHandle, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                payload = await read_frame(reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                self._declare_lost(
                    handle, LossCause.CONNECTION_BROKEN, f"its control connection broke ({exc})"
                )
                return
            except WireFormatError as exc:
                self._declare_lost(handle, LossCause.PROTOCOL_ERROR, f"it sent {exc}")
                return
            if payload is None:
                self._declare_lost(
                    handle, LossCause.CONNECTION_CLOSED, "its control connection closed"
                )
                return
            handle.frames_received += 1
            try:
                message = decode_message(payload)
            except WireFormatError as exc:
                self._declare_lost(handle, LossCause.PROTOCOL_ERROR, f"it sent {exc}")
                return
            self._on_message(handle, message)

    def _on_message(self, handle: TaskManagerHandle, message: Any) -> None:
        if isinstance(message, Heartbeat):
            return
        if isinstance(message, JobGraphReady):
            self._on_graph_ready(handle, message.fingerprint)
        elif isinstance(message, JobGraphFailed):
            self._not_ready(
                handle,
                _NotReady(f"could not build the job graph: {message.reason}", False),
            )
        elif isinstance(message, CheckpointDirectoryUnwritable):
            self._not_ready(handle, _NotReady(message.describe(), False))
        elif self.on_message is not None:
            self.on_message(handle, message)
        else:
            self._declare_lost(
                handle, LossCause.PROTOCOL_ERROR, f"it sent an unexpected {type(message).__name__}"
            )

    def _on_graph_ready(self, handle: TaskManagerHandle, fingerprint: GraphFingerprint) -> None:
        difference = self.expected.difference(fingerprint, f"TaskManager {handle.tm_id}")
        if difference is not None:
            self._not_ready(
                handle,
                _NotReady(
                    f"built another job graph from {self.job.job_file} than the JobManager: "
                    f"{difference}; build(job) must build the same graph in every process, so "
                    "it must not depend on the process, the host or the environment (pass "
                    "settings as job parameters: --set KEY=VALUE)",
                    False,
                ),
            )
            return
        if handle.state is TaskManagerState.REGISTERED:
            handle.state = TaskManagerState.READY
            if not handle._ready.done():
                handle._ready.set_result(None)

    def _not_ready(self, handle: TaskManagerHandle, failure: _NotReady) -> None:
        if not handle._ready.done():
            handle._ready.set_exception(failure)

    # ---------------------------------------------------------------- loss

    async def _watch_heartbeats(self, handle: TaskManagerHandle) -> None:
        """Counts its own ticks without a frame rather than measuring time, so that a JobManager
        loop that stalled for a while (frames queued, not read yet) costs one tick, not a loss."""
        interval_s, timeout_s = self.heartbeat.interval_s, self.heartbeat.timeout_s
        silent_ticks_allowed = math.ceil(timeout_s / interval_s)
        seen, silent = handle.frames_received, 0
        while handle.connected:
            await asyncio.sleep(interval_s)
            if handle.frames_received != seen:
                seen, silent = handle.frames_received, 0
                continue
            silent += 1
            if silent >= silent_ticks_allowed:
                self._declare_lost(
                    handle, LossCause.HEARTBEAT_TIMEOUT, f"no heartbeat for {timeout_s:g}s"
                )
                return

    async def _watch_exit(self, handle: TaskManagerHandle) -> None:
        assert handle.process is not None
        handle.exit_code = await handle.process.wait()
        handle.exited.set()
        self._declare_lost(handle, LossCause.PROCESS_EXITED, f"its process {self._exit_of(handle)}")

    def _declare_lost(self, handle: TaskManagerHandle, cause: LossCause, detail: str) -> None:
        """Mark it lost and kill it. The loss of a ready one is what :meth:`watch` reports; one
        that was still starting fails :meth:`start` instead."""
        if handle.state in (TaskManagerState.LOST, TaskManagerState.STOPPED):
            return
        was_ready = handle.state is TaskManagerState.READY
        handle.state = TaskManagerState.LOST
        handle.loss = TaskManagerLost(handle.tm_id, handle.pid, cause.value, detail)
        if handle._writer is not None:
            handle._writer.close()
        # Fencing: a frozen TaskManager must not wake up and go on with a given-up attempt. One
        # whose connection ended most likely died by itself: its exit code says how.
        self._kill(handle, fence=cause in _ALIVE_WHEN_LOST)
        self._not_ready(handle, _NotReady(detail, True))
        if was_ready:
            log.warning("%s", handle.loss.describe())
            self.losses.append(handle.loss)
            self._lost.set()
            if self.on_lost is not None:
                self.on_lost(handle)

    def _kill(self, handle: TaskManagerHandle, fence: bool = False) -> None:
        """Kill its process if it may still run; ``fence``: it was alive, the pool ends it (so
        its exit code is the pool's doing, not an explanation)."""
        if handle.process is not None and not handle.exited.is_set():
            handle.killed_by_pool = handle.killed_by_pool or fence
            handle.process.kill()

    def _exit_of(self, handle: TaskManagerHandle) -> str:
        if handle.killed_by_pool:
            return "was killed by the JobManager"
        return describe_exit(handle.exit_code) or "ended"

    def _with_exit(self, handle: TaskManagerHandle, loss: TaskManagerLost) -> TaskManagerLost:
        """The loss, with how the process ended when that is known now and not said yet."""
        if not handle.exited.is_set() or loss.cause == LossCause.PROCESS_EXITED:
            return loss
        return TaskManagerLost(
            loss.tm_id, loss.pid, loss.cause, f"{loss.detail}; its process {self._exit_of(handle)}"
        )

    async def _retire(self, handle: TaskManagerHandle) -> None:
        """Take it out of the pool: kill it if it still runs, reap it, end its tasks."""
        self._kill(handle)
        if handle.process is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handle.exited.wait(), DEFAULT_STOP_TIMEOUT_S)
        current = asyncio.current_task()
        for task in handle._tasks:
            if task is not current:
                task.cancel()
        for task in handle._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._handles.pop(handle.tm_id, None)
        if handle.state is not TaskManagerState.LOST:
            handle.state = TaskManagerState.STOPPED
        if not self.lost:
            self._lost.clear()
