"""Where TaskManagers run: the placement interface and its local-process implementation.

A placement only starts and stops TaskManagers. A started TaskManager connects back to the
JobManager by itself (``python -m runtime taskmanager --jobmanager HOST:PORT --id ID``, or
:func:`runtime.cluster.taskmanager.run_taskmanager` inside a Ray actor); registration, heartbeats,
the data plane and failure handling are never the placement's business. To add a backend (Ray,
Kubernetes), implement :class:`TaskManagerPlacement` and :class:`TaskManagerProcess`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

OUTPUT_LINES_KEPT = 20
"""Last lines of a TaskManager's stderr kept to explain why it did not come up."""

COPY_CHUNK_BYTES = 1 << 16
MAX_LINE_BYTES = 1 << 20

PIPE_DRAIN_TIMEOUT_S = 1.0
"""After a TaskManager ended, how long its last output may take to be copied."""


class TaskManagerProcess(ABC):
    """One started TaskManager as its placement sees it: a child process, a Ray actor."""

    tm_id: str
    pid: int
    """Its operating-system process id (on its host)."""
    host: str

    @abstractmethod
    def kill(self) -> None:
        """End it at once (SIGKILL for a process); harmless once it ended."""

    @abstractmethod
    async def wait(self) -> int | None:
        """Wait until it ended; its exit code (negative: killed by that signal), or None where
        the placement cannot tell."""

    def recent_output(self) -> list[str]:
        """Its last lines of diagnostic output, where the placement keeps them (else none)."""
        return []


class TaskManagerPlacement(ABC):
    """Starts and stops the TaskManagers of one job."""

    @abstractmethod
    async def start(
        self, tm_id: str, jobmanager_host: str, jobmanager_port: int
    ) -> TaskManagerProcess:
        """Start TaskManager ``tm_id``, which will connect to the JobManager at
        ``jobmanager_host:jobmanager_port``; returns once it was started, not once it registered."""

    @abstractmethod
    async def close(self) -> None:
        """Kill every TaskManager it started that still runs, wait until they ended, and release
        what the placement holds. Called once, when the job ends."""


def describe_exit(code: int | None) -> str:
    """``exited with code 3``, ``was killed by SIGKILL``; empty when the code is unknown."""
    if code is None:
        return ""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class LocalTaskManagerProcess(TaskManagerProcess):
    """A TaskManager child process of this one. Its stdout is copied to ours as it comes (the
    job's print() sinks write there), its stderr too, each line prefixed with ``[tm-id]``; the
    pipes are read all the time, so a chatty TaskManager never blocks on a full pipe."""

    def __init__(self, tm_id: str, process: asyncio.subprocess.Process) -> None:
        self.tm_id = tm_id
        self.pid = process.pid
        self.host = "127.0.0.1"
        self._process = process
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        assert process.stdout is not None and process.stderr is not None
        self._copiers = [
            asyncio.create_task(
                _copy_lines(process.stdout, self._copy_stdout_line), name=f"{tm_id}-stdout"
            ),
            asyncio.create_task(
                _copy_lines(process.stderr, self._copy_stderr_line), name=f"{tm_id}-stderr"
            ),
        ]

    def kill(self) -> None:
        if self._process.returncode is None:
            # Not Process.kill(): its Popen polls first and so may reap a child that just died,
            # behind the back of asyncio's child watcher, which then reports exit code 255. The
            # pid stays ours until reaped, and only the watcher reaps it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    async def wait(self) -> int:
        code = await self._process.wait()
        # The pipes end with the process: copy what is left, so recent_output() is complete
        # (bounded, should a process it started still hold them).
        await asyncio.wait(self._copiers, timeout=PIPE_DRAIN_TIMEOUT_S)
        return code

    def recent_output(self) -> list[str]:
        return list(self._stderr_tail)

    def _copy_stdout_line(self, line: bytes) -> None:
        _write(sys.stdout, line.decode(errors="replace") + "\n")

    def _copy_stderr_line(self, line: bytes) -> None:
        text = line.decode(errors="replace")
        self._stderr_tail.append(text)
        _write(sys.stderr, f"[{self.tm_id}] {text}\n")


async def _copy_lines(stream: asyncio.StreamReader, emit: Callable[[bytes], None]) -> None:
    """Hand each line of ``stream`` (without its newline) to ``emit`` until the stream ends.
    Whole lines, so that the output of several TaskManagers interleaves by line; a line longer
    than :data:`MAX_LINE_BYTES` is handed over in pieces rather than held."""
    pending = b""
    while chunk := await stream.read(COPY_CHUNK_BYTES):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            emit(line)
        if len(pending) > MAX_LINE_BYTES:
            emit(pending)
            pending = b""
    if pending:
        emit(pending)


def _write(target: TextIO, text: str) -> None:
    # Reading goes on when our own stream is gone (a closed pipe): the child must never block.
    with contextlib.suppress(OSError, ValueError):
        target.write(text)
        target.flush()


class LocalProcessPlacement(TaskManagerPlacement):
    """TaskManagers as child processes on this machine, with this interpreter and this checkout
    of the runtime.

    They run in a session of their own, so Ctrl-C in a terminal reaches the JobManager only, which
    stops them in order. They never outlive it: each exits when its control connection ends, and
    checks that its parent process still lives (:mod:`runtime.cluster.taskmanager`).
    """

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        self._processes: list[LocalTaskManagerProcess] = []

    async def start(
        self, tm_id: str, jobmanager_host: str, jobmanager_port: int
    ) -> LocalTaskManagerProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "runtime",
            "taskmanager",
            "--jobmanager",
            f"{jobmanager_host}:{jobmanager_port}",
            "--id",
            tm_id,
            "--slots",
            str(self.slots),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_same_runtime_environment(),
            start_new_session=True,
        )
        started = LocalTaskManagerProcess(tm_id, process)
        self._processes.append(started)
        log.info("started TaskManager %s (pid %d)", tm_id, started.pid)
        return started

    async def close(self) -> None:
        await end_all(self._processes)
        self._processes.clear()


async def end_all(processes: Sequence[TaskManagerProcess]) -> None:
    """Kill each of ``processes`` that still runs, then wait until every one ended."""
    for process in processes:
        process.kill()
    for process in processes:
        await process.wait()


def _same_runtime_environment() -> dict[str, str]:
    """This process's environment, with :func:`runtime_import_path`."""
    return {**os.environ, "PYTHONPATH": runtime_import_path()}


def runtime_import_path() -> str:
    """A ``PYTHONPATH`` with this checkout of the runtime first: a TaskManager must run the
    JobManager's code (its messages and its graph building), whatever the directory or the
    installed copy."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


PLACEMENTS = ("local", "ray")
"""The kinds of :func:`make_placement`."""


def make_placement(kind: str, slots: int) -> TaskManagerPlacement:
    """The placement ``kind`` names, for TaskManagers of ``slots`` slots each: ``local`` starts
    them as child processes of this one, ``ray`` as Ray actors (:mod:`runtime.cluster.ray`).
    Raises ``ValueError`` for a kind that is unknown, or whose optional extra is not installed."""
    if kind == "local":
        return LocalProcessPlacement(slots)
    if kind == "ray":
        from runtime.cluster.ray import ray_placement  # Ray is an optional extra: only here

        return ray_placement(slots)
    msg = f"unknown TaskManager placement {kind!r}; known: {', '.join(PLACEMENTS)}"
    raise ValueError(msg)
