"""``python -m runtime run JOB.py --watch``: save the job file and the running job resumes, with its
state, in the new version.

The watcher (``watchfiles``, debounced: an editor's several writes or rename are one change) looks
at the job file and the modules it imported from the job's own folder (not installed packages, not
the runtime's). On a change it

1. imports the new version (fresh module objects: the folder's modules leave ``sys.modules``, and
   their cached bytecode is dropped, since an edit within the same second can keep its size and
   mtime) and builds its graph;
2. checks, with the same :class:`~runtime.plan.restore.RestoreReport` as ``--restore`` and
   ``checkpoints --against``, that the state restores into the new graph: against the latest
   completed checkpoint, else the snapshot the job restored, else a savepoint taken for the check
   (the job goes on running);
3. only then stops the job with a savepoint (no drain) into the savepoint directory, checks that
   savepoint again (state may have appeared since step 2) and resumes the new version from it,
   printing one line: what changed, the savepoint, the time from the save to every task running.

A refused version (it does not import, ``build()`` raises, its graph is invalid, the state does
not restore into it) leaves the old job running; the reason names the user's file and line, and
the next save tries again. Should only the check of step 3 refuse, the old version resumes from
that savepoint. Dropping an operator's state needs ``--allow-non-restored-state``, as on a restore.
A job failing over (a bug the edit fixes) has no savepoint to give: it is cancelled and the new
version resumes from the snapshot its next attempt would have restored.

Without ``--savepoint-dir`` or ``--checkpoint-dir``, reload savepoints go into a temporary folder
of this run, removed when it ends (SIGTERM then cancels, as it does without ``--watch``). A job that
finishes by itself (a bounded input) or fails waits for the next change: a finished job's version
then runs from the beginning (its final checkpoint would restore every operator as finished, so
nothing would run; two-phase sinks then need ``--allow-existing-output`` to write over the first
run's output, as on any fresh start), a failed one resumes from its latest completed checkpoint or
savepoint. SIGTERM and Ctrl-C end the run as without ``--watch``; SIGTERM while waiting exits 0
after a finished job, 1 after a failed one. ``--watch`` runs the job in this process: it refuses
``--taskmanagers`` and ``--cluster ray``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import watchfiles

from actors.infrastructure import InfrastructureError
from actors.protocol import TaskReport, TaskState, TaskStateChanged
from runtime.api.streams import JobDefinitionError
from runtime.config import ExecutionConfig
from runtime.master.coordinator import CheckpointFailedError
from runtime.master.jobmaster import JobFailedError, JobMaster, JobResult
from runtime.plan.graph import JobGraph
from runtime.plan.restore import RestoreMismatchError, RestoreReport
from runtime.shell import cli
from runtime.shell.progress import ProgressReporter
from runtime.shell.runner import (
    BuildFunction,
    JobFileError,
    build_graph,
    load_job_file,
    run_coroutine,
)
from runtime.shell.shutdown import EXIT_TERMINATED, GracefulShutdown
from state.refusal import restore_refusal
from state.storage import CheckpointKind, CheckpointStorage, CompletedCheckpoint

DEBOUNCE_STEP_MS = 50
"""How long the file system must stay quiet before a change is taken: an editor's save (a write
in several parts, a temporary file renamed over the old one) is one change."""

_RUNNING_STATES = (TaskState.RUNNING, TaskState.FINISHING, TaskState.FINISHED)


class WatchedJobMaster(JobMaster):
    """A job master that tells when every task of an attempt runs (restored): the end of the
    time a reload line reports."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.all_running = asyncio.Event()

    def report(self, message: TaskReport) -> None:
        super().report(message)
        if (
            type(message) is TaskStateChanged
            and self.handles
            and all(handle.state in _RUNNING_STATES for handle in self.handles)
        ):
            self.all_running.set()


def _package_roots() -> tuple[Path, ...]:
    """Folders whose modules are never the job's: the interpreter's and installed packages, and
    the runtime's own packages (a job file may sit in the folder that holds them)."""
    paths = sysconfig.get_paths()
    roots = {Path(paths[name]).resolve() for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    for package in ("runtime", "actors", "state", "connectors"):
        module = sys.modules.get(package)
        if module is not None and module.__file__:
            roots.add(Path(module.__file__).resolve().parent)
    return tuple(roots)


def _is_under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


class JobFolder:
    """The job file and the modules it imports from its folder: what the watcher watches, and
    what leaves ``sys.modules`` before the next import."""

    def __init__(self, job_file: Path) -> None:
        self.job_file = job_file.resolve()
        self.folder = self.job_file.parent
        self._excluded = _package_roots()
        self.files: set[Path] = {self.job_file}

    def _own_modules(self) -> dict[str, Path]:
        found = {}
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if not file:
                continue
            path = Path(file).resolve()
            if path.is_relative_to(self.folder) and not _is_under(path, self._excluded):
                found[name] = path
        return found

    def note_imports(self) -> None:
        """Watch every module of the folder that the job imported (kept across versions)."""
        self.files.update(self._own_modules().values())

    def forget_modules(self, changed: set[Path]) -> None:
        """Drop the folder's modules from ``sys.modules``, and the cached bytecode of the
        changed files, so that the next import executes the files as they are now."""
        for name in self._own_modules():
            del sys.modules[name]
        for path in changed:
            with contextlib.suppress(OSError, ValueError, NotImplementedError):
                os.unlink(importlib.util.cache_from_source(str(path)))
        importlib.invalidate_caches()

    def watches(self, change: watchfiles.Change, path: str) -> bool:
        return Path(path) in self.files

    def names(self, paths: set[Path]) -> str:
        """The files as the reload lines name them: relative to the job's folder."""
        return ", ".join(
            sorted(
                str(p.relative_to(self.folder)) if p.is_relative_to(self.folder) else str(p)
                for p in paths
            )
        )


@dataclass
class JobVersion:
    build: BuildFunction
    graph: JobGraph


class RefusedVersion(Exception):
    """A new version of the job that is not run; the message says why, with the user's line."""


def _user_line(exc: BaseException, folder: Path) -> str:
    """`` (at FILE:LINE)`` of the innermost frame of ``exc`` in the job's folder, if any."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename]
    mine = [f for f in frames if Path(f.filename).resolve().is_relative_to(folder)]
    return f" (at {mine[-1].filename}:{mine[-1].lineno})" if mine else ""


class WatchSession:
    """One ``run --watch``: runs versions of the job one after the other on one event loop."""

    def __init__(
        self,
        args: Any,
        first: JobVersion,
        restored: CompletedCheckpoint | None,
        config: ExecutionConfig,
    ) -> None:
        self.args = args
        self.jobs = JobFolder(Path(args.file))
        self.jobs.note_imports()
        self.version = first
        self.restore_point = restored
        self.config = config
        self._temporary_dir: str | None = None
        self.savepoint_dir = cli._savepoint_dir(args) or self._make_temporary_dir()
        self.master: JobMaster | None = None
        self._reloaded: tuple[str, float, float | None] | None = None
        """The reload line, when its change was seen and when its savepoint completed, until the
        next version runs."""
        self._changes: asyncio.Queue[set[Path]] = asyncio.Queue()
        self._ended = asyncio.Event()

    def _make_temporary_dir(self) -> str:
        self._temporary_dir = tempfile.mkdtemp(prefix="pyflow-watch-")
        sys.stderr.write(
            f"watch: no --savepoint-dir or --checkpoint-dir: reload savepoints go into "
            f"{self._temporary_dir}, removed at the end of this run\n"
        )
        return self._temporary_dir

    def close(self) -> None:
        if self._temporary_dir is not None:
            shutil.rmtree(self._temporary_dir, ignore_errors=True)

    # ---------------------------------------------------------------- versions

    def _load(self, changed: set[Path]) -> JobVersion:
        """Import and build the job as it is on disk now; raises :class:`RefusedVersion`."""
        file = self.args.file
        self.jobs.forget_modules(changed)
        try:
            build = load_job_file(file)
            graph = build_graph(
                build,
                dict(self.args.params),
                self.args.parallelism,
                self.args.max_parallelism,
                name=cli._job_name(file),
            )
        except JobFileError as exc:
            raise RefusedVersion(str(exc)) from None
        except JobDefinitionError as exc:
            where = _user_line(exc, self.jobs.folder)
            raise RefusedVersion(f"invalid job {file}: {exc}{where}") from None
        except Exception as exc:
            detail = "".join(traceback.format_exception(exc, limit=-3))
            where = _user_line(exc, self.jobs.folder)
            msg = f"build(job) in {file} raised {type(exc).__name__}: {exc}{where}\n{detail}"
            raise RefusedVersion(msg.rstrip()) from None
        finally:
            self.jobs.note_imports()
        return JobVersion(build, graph)

    def _check_restore(self, version: JobVersion, checkpoint: CompletedCheckpoint) -> None:
        """The restore check of ``--restore``; raises :class:`RefusedVersion` with the report."""
        report = RestoreReport(version.graph, checkpoint)
        try:
            report.check(self.args.allow_non_restored_state)
        except RestoreMismatchError as exc:
            described = "\n".join(
                f"    {line}" for line in report.describe(version.graph).split("\n")
            )
            msg = (
                f"the state of {checkpoint.kind.value} {checkpoint.checkpoint_id} does not "
                f"restore into the new version: {exc}\n{described}"
            )
            raise RefusedVersion(msg) from None

    async def _layout(self, master: JobMaster) -> CompletedCheckpoint:
        """What the state looks like now, to check a new version against before the job stops:
        the latest completed checkpoint, else the one the job restored, else a savepoint taken
        now (the job goes on)."""
        latest = master.coordinator.latest_completed or master.restore_point
        if latest is not None:
            return latest
        return await master.coordinator.request_trigger(
            CheckpointKind.SAVEPOINT, self.savepoint_dir
        )

    # ---------------------------------------------------------------- the loop

    async def run(self) -> int:
        watcher = asyncio.create_task(self._watch_files(), name="watch-files")
        try:
            while True:
                code = await self._run_version()
                if code is not None:
                    return code
        finally:
            self._ended.set()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_files(self) -> None:
        async for changes in watchfiles.awatch(
            self.jobs.folder,
            watch_filter=self.jobs.watches,
            step=DEBOUNCE_STEP_MS,
            stop_event=self._ended,
        ):
            # Paths under the resolved folder: the watched set holds them as they come.
            self._changes.put_nowait({Path(path) for _, path in changes})

    async def _next_change(self) -> set[Path]:
        """The next change, with every change queued meanwhile: one reload for them all."""
        changed = await self._changes.get()
        while not self._changes.empty():
            changed |= self._changes.get_nowait()
        return changed

    async def _run_version(self) -> int | None:
        """Run the current version until it ends: the exit code, or None to run the next."""
        master = self._new_master()
        shutdown = GracefulShutdown(
            master,
            self.args.checkpoint_dir,
            self.args.checkpoint_interval,
            self.args.shutdown_timeout,
            savepoint_dir=cli._savepoint_dir(self.args),
        )
        self.master = master
        reporter = None if self.args.no_progress else ProgressReporter(master)
        job = asyncio.create_task(cli._supervise(master, reporter, self.args, shutdown))
        announcing = None
        if self._reloaded is not None:
            announcing = asyncio.create_task(self._announce_running(master, *self._reloaded))
            self._reloaded = None
        try:
            while True:
                accepted = await self._next_accepted_change(master, job)
                if accepted is None:
                    return await self._ended_by_itself(await job, shutdown, reporter)
                changed, version, seen_at = accepted
                stopped = await self._stop_for_reload(master, job)
                if stopped is None:
                    continue
                restore_point, outcome, saved = stopped
                saved_at = time.monotonic() if saved else None
                if shutdown.requested:  # SIGTERM while the reload stopped the job
                    return await self._ended_by_itself(outcome, shutdown, reporter)
                self._resume_from(restore_point, changed, version, (seen_at, saved_at))
                return None
        except JobFailedError as exc:
            return await self._failed(exc, shutdown)
        finally:
            if announcing is not None:
                announcing.cancel()
            shutdown.finish()

    def _new_master(self) -> WatchedJobMaster:
        graph = self.version.graph
        self.config.checkpoint.on_failure_alert = cli._alert_hook(self.version.build, self.args)
        storage = CheckpointStorage(self.args.checkpoint_dir, graph.name)
        return WatchedJobMaster(graph, self.config, storage=storage, restored=self.restore_point)

    async def _next_accepted_change(
        self, master: JobMaster, job: asyncio.Task[Any]
    ) -> tuple[set[Path], JobVersion, float] | None:
        """Wait for a change whose version passes every check that can run before the job
        stops (then the changed files, the version and when the change was seen), or for the
        job's end (None)."""
        while True:
            change = asyncio.ensure_future(self._next_change())
            done, _ = await asyncio.wait({job, change}, return_when=asyncio.FIRST_COMPLETED)
            if change not in done:
                change.cancel()
                return None
            changed = change.result()
            seen_at = time.monotonic()
            try:
                version = self._load(changed)
                self._check_restore(version, await self._layout(master))
            except RefusedVersion as exc:
                self._refused(changed, str(exc), "the old version goes on running")
                continue
            except CheckpointFailedError as exc:
                reason = f"no savepoint to check the new version against ({exc})"
                self._refused(changed, reason, "the old version goes on running")
                continue
            return changed, version, seen_at

    def _refused(self, changed: set[Path], reason: str, meanwhile: str) -> None:
        cli._error(
            f"watch: {self.jobs.names(changed)} changed, but the new version is not run "
            f"({meanwhile}; the next save tries again): {reason}"
        )

    async def _stop_for_reload(
        self, master: JobMaster, job: asyncio.Task[Any]
    ) -> tuple[CompletedCheckpoint, JobResult | None, bool] | None:
        """Stop the job for a reload: the snapshot to resume from, the job's outcome and whether
        it stopped with a savepoint; None (said) when the job could not be stopped and goes on.

        A running job stops with a savepoint. A job failing over (waiting to restart, or failing
        while the savepoint was taken: a bug the edit may fix) has no savepoint to give; it is
        cancelled, and the next version resumes from the latest completed checkpoint, the one
        its next attempt would have restored (two-phase sinks commit nothing past it)."""
        attempt = master.attempt
        if master.status != "restarting":
            try:
                savepoint = await master.stop_with_savepoint(self.savepoint_dir, drain=False)
            except CheckpointFailedError as exc:
                if master.attempt == attempt and master.status == "running":
                    cli._error(f"watch: the stop with savepoint for the reload failed: {exc}")
                    return None
            else:
                outcome = await job
                if self.args.checkpoint_dir and savepoint.path:
                    cli._record_stop_savepoint(self.args.checkpoint_dir, savepoint.path)
                return savepoint, outcome, True
        latest = master.coordinator.latest_completed or master.restore_point
        if latest is None:
            cli._error(
                "watch: the job is failing over and has no completed checkpoint to resume the "
                "new version from; it goes on (--checkpoint-interval makes checkpoints)"
            )
            return None
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        sys.stderr.write(
            f"watch: the job was failing over (attempt {master.attempt}): cancelled it, to resume "
            f"from {latest.kind.value} {latest.checkpoint_id}\n"
        )
        return latest, None, False

    def _resume_from(
        self,
        restore_point: CompletedCheckpoint,
        changed: set[Path],
        version: JobVersion,
        times: tuple[float, float | None],
    ) -> None:
        """After the job stopped: which version runs next (the new one, unless the state does
        not restore into it), from ``restore_point``."""
        self.restore_point = restore_point
        where = f"{restore_point.kind.value} {restore_point.checkpoint_id} ({restore_point.path})"
        try:
            self._check_restore(version, restore_point)
        except RefusedVersion as exc:
            self._refused(changed, str(exc), f"the old version resumes from {where}")
            self._reloaded = (f"watch: the old version resumed from {where}", *times)
            return
        self.version = version
        self._reloaded = (f"watch: reloaded {self.jobs.names(changed)}: {where}", *times)

    async def _announce_running(
        self, master: WatchedJobMaster, line: str, seen_at: float, saved_at: float | None
    ) -> None:
        """The reload line, once every task of ``master`` runs (restored)."""
        await master.all_running.wait()
        now = time.monotonic()
        since_change = f"{now - seen_at:.3f}s after the change was seen"
        if saved_at is None:  # resumed from a checkpoint: no save
            sys.stderr.write(f"{line}; running again {since_change}\n")
        else:
            sys.stderr.write(
                f"{line}; running again {now - saved_at:.3f}s after the save ({since_change})\n"
            )
        sys.stderr.flush()

    # ---------------------------------------------------------------- ends

    async def _ended_by_itself(
        self, outcome: JobResult | None, shutdown: GracefulShutdown, reporter: Any
    ) -> int | None:
        """The job ended without a reload: the exit code of ``run`` (stopped, cancelled), or
        None once a new version is there to run after a finished job."""
        if outcome is None:
            if shutdown.requested:
                cli._error(shutdown.final_line())
                return EXIT_TERMINATED
            cli._error("cancelled through the control endpoint: every task was closed")
            assert self.master is not None
            cli._cleanup_on_cancel(self.master, self.args)
            return cli.EXIT_INTERRUPTED
        if reporter is not None:
            reporter.summary(outcome)
        if outcome.stopped_with_savepoint:
            path = outcome.stopped_with_savepoint
            sys.stderr.write(f"stopped with savepoint {path}; resume with --restore {path}\n")
            if self.args.checkpoint_dir:
                cli._record_stop_savepoint(self.args.checkpoint_dir, path)
            return cli.EXIT_OK
        sys.stderr.write(
            f"watch: the job finished; waiting for a change to {self.args.file} to run the "
            "new version from the beginning (Ctrl-C ends)\n"
        )
        sys.stderr.flush()
        self.restore_point = None
        return None if await self._wait_for_version() else cli.EXIT_OK

    async def _failed(self, exc: JobFailedError, shutdown: GracefulShutdown) -> int | None:
        refusal = restore_refusal(exc.cause)
        if shutdown.requested:
            if not shutdown.explains(exc):
                cli._report_failure(exc)
            cli._error(shutdown.final_line())
            return EXIT_TERMINATED
        if refusal is not None:
            cli._error(str(refusal))
        else:
            cli._report_failure(exc)
        assert self.master is not None
        self.restore_point = self.master.coordinator.latest_completed or self.restore_point
        start = (
            f"{self.restore_point.kind.value} {self.restore_point.checkpoint_id}"
            if self.restore_point is not None
            else "the beginning"
        )
        sys.stderr.write(
            f"watch: waiting for a change to {self.args.file} to run the new version from "
            f"{start} (Ctrl-C ends)\n"
        )
        sys.stderr.flush()
        return None if await self._wait_for_version() else cli.EXIT_FAILED

    async def _wait_for_version(self) -> bool:
        """While no job runs: wait for a version that loads (and restores from the restore
        point, if any); False when SIGTERM came first."""
        loop = asyncio.get_running_loop()
        terminated = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, terminated.set)
        try:
            while True:
                change = asyncio.ensure_future(self._next_change())
                signalled = asyncio.ensure_future(terminated.wait())
                await asyncio.wait({change, signalled}, return_when=asyncio.FIRST_COMPLETED)
                if terminated.is_set():
                    change.cancel()
                    sys.stderr.write("watch: SIGTERM while no job runs: exiting\n")
                    return False
                signalled.cancel()
                changed = change.result()
                try:
                    version = self._load(changed)
                    if self.restore_point is not None:
                        self._check_restore(version, self.restore_point)
                except RefusedVersion as exc:
                    self._refused(changed, str(exc), "no job runs")
                    continue
                self.version = version
                sys.stderr.write(f"watch: {self.jobs.names(changed)} changed: running it\n")
                return True
        finally:
            loop.remove_signal_handler(signal.SIGTERM)


def run_watching(
    args: Any, build: BuildFunction, graph: JobGraph, restored: Any, config: ExecutionConfig
) -> int:
    """``run --watch`` (after ``run`` checked the options, built the first graph and found its
    restore point): the exit code of the run."""
    if args.taskmanagers > 1 or args.cluster != "local":
        cli._error("--watch runs the job in this process: without --taskmanagers or --cluster ray")
        return cli.EXIT_USAGE
    session = WatchSession(args, JobVersion(build, graph), restored, config)
    sys.stderr.write(
        f"watch: watching {session.jobs.names(session.jobs.files)} in {session.jobs.folder}; "
        "a change stops the job with a savepoint and resumes the new version from it\n"
    )
    try:
        return int(run_coroutine(session.run()))
    except KeyboardInterrupt:
        cli._error("cancelled (Ctrl-C): every task was closed")
        if session.master is not None:
            cli._cleanup_on_cancel(session.master, args)
        return cli.EXIT_INTERRUPTED
    except InfrastructureError as exc:
        cli._error(str(exc))
        return cli.EXIT_FAILED
    finally:
        session.close()
