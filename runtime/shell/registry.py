"""The job registry: which jobs run on this machine, for ``python -m runtime list`` and for
``savepoint``/``stop``/``cancel JOB`` (a job name or pid instead of ``--address``).

Every ``python -m runtime run`` writes one JSON file, ``job-<pid>.json``, into the per-user
runtime directory (:func:`runtime_dir`) when its control endpoint is up, and removes it when it
ends, however it ends (finished, failed, cancelled, stopped, SIGTERM, Ctrl-C). A process that
cannot remove its entry (SIGKILL, a forced exit, a power loss) leaves a stale one behind, which
the next :func:`running_jobs` prunes: an entry counts only while its pid runs and is the process
that wrote it (on Linux its start time in ``/proc`` must match, so a reused pid does not count).

The entry holds the job's control token, the only copy outside the job's memory: the directory
is created owner-only (0700) and each file is written owner-only (0600) and atomically (a
temporary file renamed into place), so another user of the machine can neither read a token nor
see a half-written entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RUNTIME_DIR_ENV = "PYFLOW_RUNTIME_DIR"
ENTRY_PREFIX = "job-"
ENTRY_SUFFIX = ".json"


class RegistryError(RuntimeError):
    """The runtime directory cannot be used (not ours, not a directory, unwritable)."""


class JobLookupError(LookupError):
    """No running job, or more than one, answers to the name or pid given on the command line."""


def runtime_dir() -> Path:
    """The per-user directory of registry entries: ``$PYFLOW_RUNTIME_DIR``, else
    ``$XDG_RUNTIME_DIR/pyflow`` (a per-user tmpfs on systemd machines, emptied at logout), else
    ``~/.cache/pyflow/jobs``."""
    configured = os.environ.get(RUNTIME_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "pyflow"
    return Path.home() / ".cache" / "pyflow" / "jobs"


def ensure_runtime_dir() -> Path:
    """:func:`runtime_dir`, created owner-only if missing and made owner-only if it is ours but
    open to others; raises :class:`RegistryError` if it belongs to another user or is no
    directory."""
    directory = runtime_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:
        msg = f"cannot create the job registry {directory}: {exc}; set ${RUNTIME_DIR_ENV}"
        raise RegistryError(msg) from None
    if not stat.S_ISDIR(info.st_mode):
        msg = f"the job registry {directory} is not a directory; set ${RUNTIME_DIR_ENV}"
        raise RegistryError(msg)
    if info.st_uid != os.getuid():
        msg = (
            f"the job registry {directory} belongs to another user (uid {info.st_uid}); "
            f"set ${RUNTIME_DIR_ENV} to a directory of yours"
        )
        raise RegistryError(msg)
    if stat.S_IMODE(info.st_mode) & 0o077:
        directory.chmod(0o700)
    return directory


@dataclass(frozen=True)
class JobEntry:
    """One running job, as its registry file holds it."""

    name: str
    pid: int
    address: str | None
    """The control endpoint's HOST:PORT; None when the job runs without one (``--rest-port -1``)."""
    token: str
    """The bearer token the control endpoint asks for (see :mod:`runtime.shell.security`)."""
    state: str
    """The job's state when it registered (``running``); ``list`` asks its control endpoint for
    the current one."""
    started_at: float
    """Seconds since the epoch."""
    checkpoint_dir: str | None
    savepoint_dir: str | None
    """Where savepoints go when ``savepoint``/``stop`` are given no ``--dir`` (absolute)."""
    process_start: str | None
    """The process's start time as ``/proc/<pid>/stat`` says (None off Linux): tells the job's
    process from a later one that got the same pid."""

    def uptime_s(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.started_at)

    def public_json(self) -> dict[str, Any]:
        """The entry without its token, for ``list --json``."""
        data = asdict(self)
        del data["token"]
        del data["process_start"]
        data["uptime_s"] = round(self.uptime_s(), 3)
        return data


def new_entry(
    name: str,
    address: str | None,
    token: str,
    checkpoint_dir: str | None,
    savepoint_dir: str | None,
    state: str = "running",
) -> JobEntry:
    """The entry of this process's job, started now."""
    pid = os.getpid()
    return JobEntry(
        name=name,
        pid=pid,
        address=address,
        token=token,
        state=state,
        started_at=time.time(),
        checkpoint_dir=checkpoint_dir,
        savepoint_dir=savepoint_dir,
        process_start=_process_start(pid),
    )


def register(entry: JobEntry) -> Path:
    """Write ``entry`` owner-only and atomically; returns its file."""
    directory = ensure_runtime_dir()
    target = directory / f"{ENTRY_PREFIX}{entry.pid}{ENTRY_SUFFIX}"
    fd, temporary = tempfile.mkstemp(prefix=".job-", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates the file 0600: the token is never readable by others, not even briefly.
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(entry), handle)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return target


def unregister(pid: int) -> None:
    """Remove the entry of the job process ``pid`` (nothing if it is gone already)."""
    with contextlib.suppress(FileNotFoundError):
        (runtime_dir() / f"{ENTRY_PREFIX}{pid}{ENTRY_SUFFIX}").unlink()


def running_jobs() -> list[JobEntry]:
    """The jobs running on this machine for this user, oldest first; entries of processes that
    ended are removed on the way (and unreadable files skipped)."""
    directory = runtime_dir()
    if not directory.is_dir():
        return []
    jobs = []
    for path in directory.glob(f"{ENTRY_PREFIX}*{ENTRY_SUFFIX}"):
        entry = _read_entry(path)
        if entry is None:
            continue
        if _alive(entry):
            jobs.append(entry)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return sorted(jobs, key=lambda job: (job.started_at, job.pid))


def find_by_address(address: str) -> JobEntry | None:
    """The running job whose control endpoint is ``address`` (``localhost:P`` and
    ``127.0.0.1:P`` name the same endpoint)."""
    wanted = _canonical_address(address)
    for job in running_jobs():
        if job.address is not None and _canonical_address(job.address) == wanted:
            return job
    return None


def resolve_job(name_or_pid: str) -> JobEntry:
    """The running job with this pid or, failing that, this name; raises
    :class:`JobLookupError` saying what runs when none or several match."""
    jobs = running_jobs()
    if name_or_pid.isdigit():
        by_pid = [job for job in jobs if job.pid == int(name_or_pid)]
        if by_pid:
            return by_pid[0]
    by_name = [job for job in jobs if job.name == name_or_pid]
    if len(by_name) == 1:
        return by_name[0]
    if by_name:
        pids = ", ".join(str(job.pid) for job in by_name)
        msg = f"{len(by_name)} running jobs are named {name_or_pid!r} (pids {pids}); give the pid"
        raise JobLookupError(msg)
    running = ", ".join(f"{job.name} (pid {job.pid})" for job in jobs) or "none"
    msg = (
        f"no running job named {name_or_pid!r} or with that pid on this machine "
        f"(running: {running}; python -m runtime list shows them)"
    )
    raise JobLookupError(msg)


def _read_entry(path: Path) -> JobEntry | None:
    try:
        if path.stat().st_uid != os.getuid():
            return None  # only this user's own entries are trusted
        data = json.loads(path.read_text(encoding="utf-8"))
        return JobEntry(**data)
    except (OSError, ValueError, TypeError):
        return None


def _process_start(pid: int) -> str | None:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the fields after the command name, which may hold spaces and ')'.
    return stat_line.rsplit(")", 1)[1].split()[19]


def _alive(entry: JobEntry) -> bool:
    if not _HAS_PROC:
        return _signalable(entry.pid)
    try:
        stat_line = Path(f"/proc/{entry.pid}/stat").read_text()
    except OSError:
        return False
    fields = stat_line.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return False  # ended, not reaped yet
    return entry.process_start is None or fields[19] == entry.process_start


def _signalable(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HAS_PROC = Path("/proc/self/stat").exists()
_LOOPBACK_NAMES = {"localhost", "127.0.0.1"}


def _canonical_address(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host.lower() in _LOOPBACK_NAMES else address
