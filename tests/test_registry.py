"""The job registry and ``python -m runtime list``: every ``run`` enters itself with owner-only
permissions and leaves however it ends; ``savepoint``, ``stop`` and ``cancel`` find a job by name
or pid, with its token and its savepoint directory, so they need neither ``--address`` nor
``--dir``; entries of killed processes are pruned."""

from __future__ import annotations

import re
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import (
    ROOT,
    RUN_TIMEOUT_S,
    read_address,
    registered_job,
    registry_entry,
    run_cli,
    run_cli_in,
    set_args,
    start_cli,
    stop_process,
    wait_for,
)

from runtime.shell import registry
from state.storage import CheckpointKind, load_checkpoint

EXAMPLE = ROOT / "examples" / "file_etl.py"


class Job:
    """``file_etl.py`` throttled (it runs for many seconds unless told to end), with its control
    endpoint on a free port and a checkpoint dir; listed once :meth:`listed` returned."""

    def __init__(self, base: Path, *extra: str) -> None:
        self.chk, self.out, self.stderr = base / "chk", base / "out", base / "job.stderr"
        base.mkdir(parents=True, exist_ok=True)
        self.proc = start_cli(
            self.stderr,
            "run",
            str(EXAMPLE),
            *set_args(output=self.out, rate=100),
            *("--checkpoint-dir", str(self.chk), "--no-progress", "--rest-port", "0"),
            *extra,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def listed(self) -> dict[str, object]:
        """The job's ``list --json`` row, once it is listed."""
        return wait_for(
            lambda: registered_job(self.pid), "the job in the registry", self.proc, self.stderr
        )

    def wait(self) -> int:
        return self.proc.wait(timeout=RUN_TIMEOUT_S)


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    started: list[Job] = []
    yield started
    for job in started:
        stop_process(job.proc)


def test_list_shows_a_running_job_and_stop_by_name_needs_no_address_or_dir(
    tmp_path: Path, jobs: list[Job]
) -> None:
    job = Job(tmp_path)
    jobs.append(job)
    row = job.listed()
    address = wait_for(lambda: read_address(job.chk), "the rest-address", job.proc, job.stderr)
    assert row["name"] == "file_etl"
    assert row["address"] == address
    assert row["state"] == "running"
    assert row["checkpoint_dir"] == str(job.chk)
    assert row["savepoint_dir"] == str(job.chk / "savepoints")
    assert 0 <= float(str(row["uptime_s"])) < RUN_TIMEOUT_S
    assert "token" not in row

    # Owner-only: the directory 0700, the entry (which holds the token) 0600.
    assert stat.S_IMODE(registry.runtime_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE(registry_entry(job.pid).stat().st_mode) == 0o600

    table = run_cli("list")
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["NAME", "PID", "ADDRESS", "STATE", "UPTIME", "CHECKPOINT", "DIR"]
    [line] = [line for line in lines if str(job.pid) in line.split()]
    assert line.split()[:4] == ["file_etl", str(job.pid), address, "running"]
    assert line.split()[-1] == str(job.chk)

    savepoint = run_cli("savepoint", "file_etl")
    assert savepoint.returncode == 0, savepoint.stderr
    assert f"written to {job.chk / 'savepoints'}/savepoint-" in savepoint.stdout
    stop = run_cli("stop", "file_etl")
    assert stop.returncode == 0, stop.stderr
    assert job.wait() == 0, job.stderr.read_text()
    folder = Path(stop.stdout.rsplit(" at ", 1)[1].strip())
    assert folder.parent == job.chk / "savepoints"
    assert load_checkpoint(folder).kind is CheckpointKind.SAVEPOINT
    # The job removed its own entry (no list pruned it).
    assert not registry_entry(job.pid).exists()
    assert registered_job(job.pid) is None


def test_jobs_of_one_name_are_told_apart_by_pid(tmp_path: Path, jobs: list[Job]) -> None:
    first, second = Job(tmp_path / "a"), Job(tmp_path / "b")
    jobs += [first, second]
    first.listed()
    second.listed()

    ambiguous = run_cli("savepoint", "file_etl")
    assert ambiguous.returncode == 2
    assert "2 running jobs are named 'file_etl'" in ambiguous.stderr
    # Both pids, oldest job first: the two started together, so either may be the older.
    listed = re.search(r"\(pids (\d+), (\d+)\)", ambiguous.stderr)
    assert listed, ambiguous.stderr
    assert {int(listed.group(1)), int(listed.group(2))} == {first.pid, second.pid}

    # A relative --dir is relative to where the command runs (here: inside the savepoint dir).
    (second.chk / "savepoints").mkdir(parents=True)
    taken = run_cli_in(second.chk / "savepoints", "savepoint", str(second.pid), "--dir", "mine")
    assert taken.returncode == 0, taken.stderr
    assert f"written to {second.chk / 'savepoints' / 'mine'}/savepoint-" in taken.stdout

    unknown = run_cli("cancel", "no-such-job")
    assert unknown.returncode == 2
    assert "no running job named 'no-such-job'" in unknown.stderr
    assert f"file_etl (pid {first.pid})" in unknown.stderr

    cancel = run_cli("cancel", str(first.pid))
    assert cancel.returncode == 0, cancel.stderr
    assert first.wait() == 130, first.stderr.read_text()
    assert not registry_entry(first.pid).exists()
    assert registered_job(first.pid) is None
    assert registered_job(second.pid) is not None


@pytest.mark.parametrize("how", ["sigterm", "failure"])
def test_a_job_leaves_the_registry_however_it_ends(
    tmp_path: Path, jobs: list[Job], how: str
) -> None:
    # The 20th checkpoint (2s in) fails the job.
    crash = [
        *set_args(**{"testing.crash-at": "before-snapshot:20", "testing.crash-mode": "raise"}),
        *("--checkpoint-interval", "100ms", "--restart-strategy", "none"),
    ]
    savepoints = tmp_path / "sp"
    job = Job(tmp_path, *(crash if how == "failure" else ("--savepoint-dir", str(savepoints))))
    jobs.append(job)
    wait_for(registry_entry(job.pid).exists, "the registry entry", job.proc, job.stderr)
    if how == "sigterm":
        job.proc.send_signal(signal.SIGTERM)
        assert job.wait() == 0, job.stderr.read_text()
        # Into the --savepoint-dir given at start.
        assert f"stopped with savepoint {savepoints}/savepoint-" in job.stderr.read_text()
    else:
        assert job.wait() == 1, job.stderr.read_text()
        assert "injected crash at before-snapshot" in job.stderr.read_text()
    assert not registry_entry(job.pid).exists()


def test_the_entry_of_a_killed_job_is_pruned(tmp_path: Path, jobs: list[Job]) -> None:
    job = Job(tmp_path)
    jobs.append(job)
    job.listed()
    job.proc.send_signal(signal.SIGKILL)
    job.wait()
    assert registry_entry(job.pid).exists()  # nobody removed it
    assert registered_job(job.pid) is None
    assert not registry_entry(job.pid).exists()  # list pruned it

    by_pid = run_cli("stop", str(job.pid))
    assert by_pid.returncode == 2
    assert "no running job" in by_pid.stderr


def test_a_reused_pid_does_not_keep_a_stale_entry(tmp_path: Path) -> None:
    """A process that got the pid of a job killed long ago is not that job."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        entry = registry.new_entry("gone", "127.0.0.1:1", "t", None, None)
        stale = registry.JobEntry(**{**entry.__dict__, "pid": other.pid, "process_start": "1"})
        registry.register(stale)
        assert [job.pid for job in registry.running_jobs() if job.pid == other.pid] == []
        assert not registry_entry(other.pid).exists()
    finally:
        other.kill()
        other.wait()


def test_an_open_runtime_dir_is_made_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "runtime"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    monkeypatch.setenv(registry.RUNTIME_DIR_ENV, str(directory))
    registry.register(registry.new_entry("job", None, "secret", None, None))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    [entry] = directory.iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert not list(directory.glob(".*"))  # no temporary file left behind
