"""What ``python -m runtime run`` does on SIGTERM (``docker stop``, Kubernetes, systemd).

1. With a savepoint directory (``--savepoint-dir``, else ``<checkpoint-dir>/savepoints``), the job
   stops with a savepoint into it
   (no drain, as ``python -m runtime stop`` without ``--drain``; the same
   :meth:`~runtime.master.jobmaster.JobMaster.stop_with_savepoint` as the control endpoint's ``/stop``)
   and the process exits 0, printing where the savepoint is.
2. Otherwise, or when that savepoint fails, the job is cancelled gracefully: ``close()`` runs
   everywhere (sinks flush what they were given), ``finish()`` nowhere; exit 143. A job with a
   checkpoint interval but no directory has nowhere durable to write a savepoint to, so it is
   cancelled too, and the line says so. Once SIGTERM arrived, a failed attempt is not restarted.
3. A second SIGTERM, or the grace period (``--shutdown-timeout``) running out, forces the exit:
   the job is cancelled if it was not yet, what closes within ``FORCED_CLOSE_S`` closes, and the
   process exits 143 even if a ``close()`` still hangs.

The grace period is kept by a watchdog thread, so it holds even when user code blocks the event
loop (which then also keeps a second SIGTERM from being seen: the loop serves signal handlers).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from actors.task import StopWithSavepointFailed
from runtime.api.durations import format_duration
from runtime.master.coordinator import CheckpointFailedError
from runtime.shell import registry

EXIT_TERMINATED = 128 + signal.SIGTERM
FORCED_CLOSE_S = 1.0
"""After the exit is forced, how long closing may still take before the process exits anyway."""


class GracefulShutdown:
    """The SIGTERM handler of one job run; :meth:`install` on the job's loop, :meth:`finish` last."""

    def __init__(
        self,
        master: Any,
        checkpoint_dir: str | None,
        checkpoint_interval_s: float | None,
        timeout_s: float,
        savepoint_dir: str | None = None,
    ) -> None:
        self.master = master
        self.checkpoint_dir = checkpoint_dir
        self.savepoint_dir = savepoint_dir or (
            str(Path(checkpoint_dir) / "savepoints") if checkpoint_dir else None
        )
        self.checkpoint_interval_s = checkpoint_interval_s
        self.timeout_s = timeout_s
        self.requested = False
        self.fallback_reason: str | None = None
        """Why the stop with savepoint gave way to a cancel."""
        self.forced: str | None = None
        """Why the exit was forced."""
        self._job: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._finished = False
        self._state = threading.Condition()
        self._stopping: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- wiring

    def install(self, job: asyncio.Task[Any]) -> None:
        """Handle SIGTERM on the running loop for ``job`` (the task running the job master)."""
        self._job = job
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        """Back to the default SIGTERM action (called on the loop, when the job has ended)."""
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGTERM)

    def finish(self) -> None:
        """The run is over (the loop is closed): the watchdog has nothing left to force."""
        with self._state:
            self._finished = True
            self._state.notify_all()

    # ---------------------------------------------------------------- outcome

    def final_line(self) -> str:
        """The last line of a run that SIGTERM ended without a savepoint."""
        if self.forced:
            return f"terminated (SIGTERM); the exit was forced ({self.forced})"
        return "terminated (SIGTERM): the job was cancelled and every task was closed"

    def explains(self, failure: BaseException) -> bool:
        """True if ``failure`` (the job's) is the failed stop with savepoint already reported."""
        seen: BaseException | None = failure
        while seen is not None:
            if isinstance(seen, StopWithSavepointFailed):
                return True
            seen = seen.__cause__ or getattr(seen, "cause", None)
        return self.fallback_reason is not None

    # ---------------------------------------------------------------- signals

    def _on_sigterm(self) -> None:
        self._signals += 1
        if self._signals == 1:
            self._begin()
        else:
            self._request_force("a second SIGTERM")

    def _begin(self) -> None:
        self.requested = True
        self.master.restarts_allowed = False
        threading.Thread(target=self._watch, name="sigterm-watchdog", daemon=True).start()
        limit = (
            f"a second SIGTERM or the shutdown timeout of {format_duration(self.timeout_s)} "
            "forces the exit"
        )
        if self.savepoint_dir:
            _say(f"stopping with a savepoint into {self.savepoint_dir} (no drain); {limit}")
            assert self._loop is not None
            self._stopping = self._loop.create_task(self._stop_with_savepoint())
            return
        if self.checkpoint_interval_s is not None:
            _say(
                "no --checkpoint-dir to write a savepoint into (checkpoints are in memory only): "
                f"cancelling the job; close() runs everywhere, finish() nowhere; {limit}"
            )
        else:
            _say(f"cancelling the job; close() runs everywhere, finish() nowhere; {limit}")
        self._cancel_job()

    async def _stop_with_savepoint(self) -> None:
        try:
            await self.master.stop_with_savepoint(self.savepoint_dir, drain=False)
        except CheckpointFailedError as exc:
            self.fallback_reason = str(exc)
            kept = f", and the checkpoints in {self.checkpoint_dir} are kept"
            _say(
                f"the stop with savepoint failed ({exc}); cancelling the job instead: close() "
                f"runs everywhere{kept if self.checkpoint_dir else ''}"
            )
            self._cancel_job()

    def _cancel_job(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def _request_force(self, reason: str) -> None:
        """Force the exit; safe from the watchdog thread."""
        with self._state:
            if self.forced or self._finished:
                return
            self.forced = reason
            self._state.notify_all()
        _say(
            f"{reason}: forcing the exit; what closes within {format_duration(FORCED_CLOSE_S)} "
            "still closes"
        )
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._cancel_job)
        except RuntimeError:
            pass  # the loop has closed: the job has ended already

    def _watch(self) -> None:
        with self._state:
            self._state.wait_for(lambda: self._finished or self.forced, self.timeout_s)
            if self._finished:
                return
        self._request_force(f"the shutdown timeout of {format_duration(self.timeout_s)} ran out")
        with self._state:
            if self._state.wait_for(lambda: self._finished, FORCED_CLOSE_S):
                return
        sys.stderr.write(
            f"error: {self.final_line()}; a close() had not ended "
            f"{format_duration(FORCED_CLOSE_S)} later: exiting now\n"
        )
        sys.stderr.flush()
        registry.unregister(os.getpid())  # no finally block runs past os._exit
        os._exit(EXIT_TERMINATED)


def _say(line: str) -> None:
    sys.stderr.write(f"SIGTERM: {line}\n")
    sys.stderr.flush()
