"""The shared toolkit of the CLI tests: run ``python -m runtime`` in a child process, wait on what
it writes (checkpoints, its control-endpoint address), and read its control endpoint.

Child processes run from the repository root, so they import this checkout's packages. Waiting
polls a condition with a deadline and fails at once, with the child's stderr, when the child ends
first; no test sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from runtime.cluster.messages import LossCause
from runtime.shell.registry import runtime_dir
from runtime.shell.rest import control_token
from state.keygroups import DEFAULT_MAX_PARALLELISM
from state.storage import (
    CheckpointKind,
    CheckpointStorage,
    CompletedCheckpoint,
    OperatorCheckpoint,
    SnapshotMap,
    load_checkpoint,
    read_metadata,
)

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 90.0
WAIT_S = 30.0

T = TypeVar("T")


def runtime_command(*args: str) -> list[str]:
    """``python -m runtime ARGS`` with this interpreter."""
    return [sys.executable, "-m", "runtime", *args]


def run_cli(*args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``python -m runtime ARGS`` to its end; text output captured."""
    return run_command(runtime_command(*args), timeout=timeout)


def run_command(
    command: list[str], timeout: float = RUN_TIMEOUT_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to its end from the checkout's root (``env``: its whole environment, this
    one's by default); text output captured."""
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_python(
    script: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c SCRIPT`` in a fresh interpreter (see :func:`run_command`); fails the test
    with its stderr unless it exits 0."""
    proc = run_command([sys.executable, "-c", script], timeout, env)
    assert proc.returncode == 0, proc.stderr
    return proc


def run_cli_in(
    cwd: Path, *args: str, timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m runtime ARGS`` to its end in the working directory ``cwd`` (this
    checkout's packages still first on its path), for relative paths on its command line."""
    return run_command_in(cwd, runtime_command(*args), timeout=timeout)


def run_command_in(
    cwd: Path, command: list[str], timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to its end in the working directory ``cwd``, with this checkout's packages
    first on the Python path."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def without_permission_override(command: list[str]) -> list[str]:
    """``command`` run so that file permissions apply to it: as root (CI containers), without the
    capabilities that let root read and write anything (``setpriv`` from util-linux)."""
    if os.geteuid() != 0:
        return command
    dropped = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", f"--bounding-set={dropped}", *command]


def error_lines(stderr: str) -> list[str]:
    """The ``error: ...`` lines the CLI wrote."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def the_one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI's one ``error:`` line (without the prefix), asserting that there is exactly one
    and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    return errors[0].removeprefix("error: ")


def start_cli(stderr_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start ``python -m runtime ARGS`` in the background, its stderr going to ``stderr_path``."""
    return start_command(runtime_command(*args), stderr_path)


def start_command(command: list[str], stderr_path: Path) -> subprocess.Popen[bytes]:
    with open(stderr_path, "wb") as stderr:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)


def wait_for(
    condition: Callable[[], T],
    what: str,
    proc: subprocess.Popen[bytes],
    stderr: Path,
    timeout: float = WAIT_S,
) -> T:
    """Poll ``condition`` until it returns something truthy; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            msg = f"the job exited ({proc.returncode}) before {what}: {stderr.read_text()}"
            raise AssertionError(msg)
        if time.monotonic() > deadline:
            msg = f"timed out waiting for {what}: {stderr.read_text()}"
            raise AssertionError(msg)
        time.sleep(0.01)


def kill_when(
    condition: Callable[[], T],
    what: str,
    proc: subprocess.Popen[bytes],
    stderr: Path,
    timeout: float = WAIT_S,
) -> T:
    """SIGKILL ``proc`` at a moment when ``condition`` holds, and reap it.

    ``condition`` is evaluated while the process is stopped (SIGSTOP), so what it saw in the
    files is exactly what the killed process leaves behind; if it does not hold yet, the process
    continues (SIGCONT) and is checked again a little later.
    """

    def holds_while_stopped() -> T:
        proc.send_signal(signal.SIGSTOP)
        try:
            value = condition()
        except BaseException:
            proc.send_signal(signal.SIGCONT)
            raise
        if not value:
            proc.send_signal(signal.SIGCONT)
        return value

    try:
        value = wait_for(holds_while_stopped, what, proc, stderr, timeout)
        if proc.poll() is not None:
            msg = f"the job exited ({proc.returncode}) before {what}: {stderr.read_text()}"
            raise AssertionError(msg)
        return value
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def completed_checkpoint_ids(chk: Path) -> list[int]:
    """Ids of the chk-N folders that have their _metadata (completed checkpoints)."""
    if not chk.is_dir():
        return []
    ids = []
    for child in chk.iterdir():
        match = re.fullmatch(r"chk-(\d+)", child.name)
        if match and (child / "_metadata").exists():
            ids.append(int(match.group(1)))
    return sorted(ids)


def make_incomplete_checkpoint(chk: Path, checkpoint_id: int) -> Path:
    """A ``chk-N`` folder as a checkpoint killed mid-write leaves it: a state file cut short and
    the metadata's temp file, but no ``_metadata``."""
    folder = chk / f"chk-{checkpoint_id}"
    folder.mkdir(parents=True)
    (folder / "running-totals-0.state").write_bytes(b"\x81\xa5keyed\x82")
    (folder / "._metadata.tmp").write_bytes(b'{"format": 1, "checkpoint_id": ')
    return folder


def max_completed(chk: Path) -> int:
    return max(completed_checkpoint_ids(chk), default=0)


def read_address(chk: Path) -> str | None:
    """The control endpoint's HOST:PORT that a running job wrote into its checkpoint dir."""
    path = chk / "rest-address"
    if not path.exists():
        return None
    text = path.read_text().strip()
    return text if re.fullmatch(r"[\w.-]+:\d+", text) else None


def get_json(address: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
        assert response.headers.get_content_type() == "application/json"
        return json.loads(response.read())


def control_request(
    address: str,
    method: str,
    path: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """A raw request to a job's control endpoint, exactly with ``headers`` (nothing added): the
    HTTP status and the decoded JSON answer, refusals included."""
    request = urllib.request.Request(
        f"http://{address}{path}", data=data, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def post_json(
    address: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
) -> tuple[int, Any]:
    """POST ``body`` as JSON to a job's control endpoint as the CLI does, with the job's token
    (``token``, else the one in the job registry, as :func:`runtime.shell.rest.call` finds it);
    the HTTP status and the decoded answer."""
    token = token or control_token(address)
    assert token, f"no job at {address} in the job registry {runtime_dir()}"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    return control_request(address, "POST", path, json.dumps(body or {}).encode(), headers)


def registry_entry(pid: int) -> Path:
    """The registry file of the job process ``pid`` (which exists while the job runs)."""
    return runtime_dir() / f"job-{pid}.json"


def registered_jobs() -> list[dict[str, Any]]:
    """``python -m runtime list --json``: the running jobs of the test session's registry."""
    listed = run_cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    jobs: list[dict[str, Any]] = json.loads(listed.stdout)
    return jobs


def registered_job(pid: int) -> dict[str, Any] | None:
    """The ``list --json`` row of the job process ``pid``, None while it is not listed."""
    return next((job for job in registered_jobs() if job["pid"] == pid), None)


def get_metrics(address: str) -> dict[str, Any]:
    """``GET /metrics`` of a job, parsed with prometheus-client's own parser: family name (as
    the parser names it: a counter without ``_total``) → its family."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.headers.get_content_type() == "text/plain"
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def metric_samples(families: dict[str, Any], sample: str, **labels: str) -> list[Any]:
    """The samples named ``sample`` (e.g. ``pyflow_records_in_total``) whose labels include
    ``labels``, from :func:`get_metrics`."""
    return [
        s
        for family in families.values()
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def printed_address(stderr: Path) -> str | None:
    """The control endpoint's HOST:PORT from the ``control endpoint: http://…`` start-up line
    (for jobs without a --checkpoint-dir to write the rest-address file into)."""
    if not stderr.exists():
        return None
    match = re.search(r"control endpoint: http://([\w.-]+:\d+)", stderr.read_text())
    return match.group(1) if match else None


def operator_records_in(address: str, uid: str) -> int:
    """Records the operator ``uid`` received so far, over all its subtasks (from ``/status``)."""
    status = get_json(address, "/status")
    return sum(op["records_in"] for op in status["operators"] if op["uid"] == uid)


def _operator_status(address: str, uid: str, subtask: int | None) -> dict[str, Any]:
    status = get_json(address, "/status")
    [operator] = [op for op in status["operators"] if op["uid"] == uid]
    if subtask is None:
        return dict(operator)
    [entry] = [s for s in operator["subtasks"] if s["subtask"] == subtask]
    return dict(entry)


def operator_watermark(address: str, uid: str, subtask: int | None = None) -> int | None:
    """The current output watermark of operator ``uid`` (of one subtask, if given) from
    ``/status``; None before the first."""
    watermark: int | None = _operator_status(address, uid, subtask)["watermark"]
    return watermark


def operator_idle(address: str, uid: str, subtask: int | None = None) -> bool:
    """Whether operator ``uid`` (one subtask of it, if given) is idle, from ``/status``."""
    return bool(_operator_status(address, uid, subtask)["idle"])


def operator_records_out(address: str, uid: str) -> int:
    """Records the operator ``uid`` emitted so far, over all its subtasks (from ``/status``)."""
    status = get_json(address, "/status")
    return sum(op["records_out"] for op in status["operators"] if op["uid"] == uid)


def job_on_taskmanagers(
    proc: subprocess.Popen[bytes], stderr: Path, count: int, pids: list[int] | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """The control endpoint of the job ``proc`` (from its start-up line) and the ``taskmanagers``
    entries of its ``/status`` (id, pid, host, slots, state, subtasks), once ``count``
    TaskManagers run subtasks. Checks that they are ``count`` processes other than the job's and
    that every task runs on one of them, as their subtask lists say; adds their pids to ``pids``
    (for a clean-up with :func:`kill_leftover_taskmanagers`)."""
    address = wait_for(lambda: printed_address(stderr), "the control endpoint", proc, stderr)

    def all_deployed() -> list[dict[str, Any]] | None:
        taskmanagers: list[dict[str, Any]] = get_json(address, "/status")["taskmanagers"]
        ready = len(taskmanagers) == count and all(tm["subtasks"] for tm in taskmanagers)
        return taskmanagers if ready else None

    taskmanagers = wait_for(all_deployed, f"{count} TaskManagers running subtasks", proc, stderr)
    found = [tm["pid"] for tm in taskmanagers]
    if pids is not None:
        pids.extend(found)
    assert len(set(found)) == count, taskmanagers
    assert proc.pid not in found, taskmanagers
    by_id = {tm["id"]: tm for tm in taskmanagers}
    assert len(by_id) == count, taskmanagers
    for name, tm_id in task_placement(address).items():
        assert tm_id in by_id, (name, tm_id, taskmanagers)
        assert name in by_id[tm_id]["subtasks"], (name, taskmanagers)
    return address, taskmanagers


def status_tasks(address: str) -> list[dict[str, Any]]:
    """The ``tasks`` of ``/status``: name, state and the id of the TaskManager each runs on
    (``taskmanager``; None in the job process)."""
    tasks: list[dict[str, Any]] = get_json(address, "/status")["tasks"]
    return tasks


def task_placement(address: str) -> dict[str, str | None]:
    """Per task name, the id of the TaskManager it runs on (None: in the job process)."""
    return {task["name"]: task["taskmanager"] for task in status_tasks(address)}


def file_etl_args(
    out: Path, chk: Path, *extra: str, rate: int = 0, restore: str = "latest", rest: bool = False
) -> list[str]:
    """``run examples/file_etl.py`` arguments (for :func:`run_cli`): output into ``out``,
    ``rate`` records per second per source subtask (0: unlimited), checkpoints every 100ms in
    ``chk``, ``--restore restore``, no progress; the control endpoint on a free port (its address
    in ``chk/rest-address``) only if ``rest``; ``extra`` (parallelism, ...) last."""
    return [
        "run",
        str(ROOT / "examples" / "file_etl.py"),
        *set_args(output=out, rate=rate),
        *checkpointed_run_args(chk, restore, rest),
        *extra,
    ]


def checkpointed_run_args(chk: Path, restore: str = "latest", rest: bool = False) -> list[str]:
    """The ``run`` options of a test job that checkpoints: every 100ms into ``chk``, ``--restore
    restore``, no progress, the control endpoint on a free port only if ``rest``."""
    return [
        "--checkpoint-dir",
        str(chk),
        "--checkpoint-interval",
        "100ms",
        "--restore",
        restore,
        "--no-progress",
        "--rest-port",
        "0" if rest else "-1",
    ]


def set_args(**params: object) -> list[str]:
    """``--set KEY=VALUE`` arguments for each job parameter."""
    return [arg for key, value in params.items() for arg in ("--set", f"{key}={value}")]


def take_savepoint(address: str, savepoint_dir: Path) -> tuple[int, Path]:
    """``python -m runtime savepoint`` of the job at ``address`` (it goes on running); the
    savepoint's id and folder."""
    taken = run_cli("savepoint", "--address", address, "--dir", str(savepoint_dir))
    assert taken.returncode == 0, taken.stderr
    match = re.search(r"savepoint (?P<id>\d+) written to (?P<path>.+)", taken.stdout)
    assert match, taken.stdout
    return int(match.group("id")), Path(match.group("path").strip())


def stop_with_savepoint(address: str, savepoint_dir: Path) -> Path:
    """``python -m runtime stop`` the job at ``address``; the savepoint folder it wrote."""
    stop = run_cli("stop", "--address", address, "--dir", str(savepoint_dir))
    assert stop.returncode == 0, stop.stderr
    match = re.search(r"stopped with savepoint \d+ at (?P<path>.+)", stop.stdout)
    assert match, stop.stdout
    return Path(match.group("path").strip())


def damage_checkpoint(folder: Path) -> None:
    """Corrupt one state file of a checkpoint or savepoint folder (its checksum no longer fits)."""
    state_files = sorted(folder.glob("*.state"))
    assert state_files, f"{folder} has no state file to damage"
    data = bytearray(state_files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    state_files[0].write_bytes(bytes(data))


def damage_latest_checkpoint(chk: Path) -> int:
    """Corrupt the newest completed checkpoint in ``chk``; returns its id."""
    latest = max_completed(chk)
    assert latest, f"no completed checkpoint in {chk}"
    damage_checkpoint(chk / f"chk-{latest}")
    return latest


def pending_entries(snapshot: Any) -> list[dict[str, Any]]:
    """The two-phase file sink's pending-file entries anywhere in an operator snapshot."""
    found: list[dict[str, Any]] = []
    if isinstance(snapshot, dict):
        if {"checkpoint", "pending", "final"} <= set(snapshot):
            found.append(snapshot)
        else:
            for value in snapshot.values():
                found.extend(pending_entries(value))
    elif isinstance(snapshot, list | tuple):
        for value in snapshot:
            found.extend(pending_entries(value))
    return found


def checkpoint_sink_entries(folder: Path, uid: str) -> list[dict[str, Any]]:
    """The pending-file entries of the two-phase file sink ``uid`` in a checkpoint folder."""
    operator = load_checkpoint(folder).operators[uid]
    return [
        entry
        for subtask in sorted(operator.subtask_states)
        for entry in pending_entries(operator.subtask_states[subtask])
    ]


def checkpoint_list_state(folder: Path, uid: str, name: str) -> list[Any]:
    """The items of the operator list state ``name`` of operator ``uid`` in a checkpoint folder,
    over its subtasks in order."""
    return list_state_in(load_checkpoint(folder), uid, name)


def list_state_in(checkpoint: Any, uid: str, name: str) -> list[Any]:
    """:func:`checkpoint_list_state` of a loaded (or in-memory) completed checkpoint."""
    operator = checkpoint.operators[uid]
    return [
        item
        for subtask in sorted(operator.subtask_states)
        for item in (operator.subtask_states[subtask].get("operator") or {})
        .get(name, {})
        .get("items", [])
    ]


def committed_output_checkpoints(out: Path) -> set[int]:
    """The checkpoints whose two-phase file sink output is committed in ``out`` (by file name)."""
    found = set()
    for path in out.glob("part-*.jsonl") if out.is_dir() else []:
        match = re.search(r"-chk(\d+)\.jsonl$", path.name)
        if match:
            found.add(int(match.group(1)))
    return found


def write_savepoint(
    base: Path, checkpoint_id: int, operators: dict[str, tuple[str, dict[int, Any]]]
) -> Path:
    """Write a savepoint folder under ``base`` through the checkpoint storage, as a job would:
    ``operators`` maps uid to (name, {subtask: snapshot}); parallelism is the subtask count, max
    parallelism the default. Returns the folder (valid sizes and checksums)."""
    entries = {}
    for uid, (name, subtasks) in operators.items():
        states = SnapshotMap()
        for subtask, snapshot in subtasks.items():
            states[subtask] = snapshot
        entries[uid] = OperatorCheckpoint(uid, name, len(subtasks), DEFAULT_MAX_PARALLELISM, states)
    checkpoint = CompletedCheckpoint(
        checkpoint_id, CheckpointKind.SAVEPOINT, int(time.time() * 1000), entries
    )
    asyncio.run(CheckpointStorage(None).write(checkpoint, str(base)))
    assert checkpoint.path is not None
    assert read_metadata(checkpoint.path)["checkpoint_id"] == checkpoint_id
    return Path(checkpoint.path)


def stderr_contains(stderr: Path, text: str) -> bool:
    return stderr.exists() and text in stderr.read_text()


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` in ``/proc`` (``R``, ``S``, ``Z`` for a zombie: ended,
    not reaped yet...), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


LOST_AT_ONCE = frozenset(LossCause) - {LossCause.HEARTBEAT_TIMEOUT}
"""How a TaskManager that died is lost: its connection's or process's end is seen at once; only a
live but silent one waits for the heartbeat timeout."""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs; a zombie does not."""
    return process_state(pid) not in (None, "Z")


def wait_until_gone(pids: Iterable[int], what: str, timeout: float = WAIT_S) -> None:
    """Poll until none of ``pids`` runs (see :func:`process_alive`); fail after ``timeout``."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if process_alive(pid)]
        if not alive:
            return
        if time.monotonic() > deadline:
            msg = f"timed out waiting for {what}: pids {alive} still run"
            raise AssertionError(msg)
        time.sleep(0.01)


def kill_leftover_taskmanagers(pids: Iterable[int]) -> None:
    """SIGKILL each of ``pids`` that still runs as a TaskManager (``python -m runtime
    taskmanager``): the clean-up of a test whose TaskManagers should have ended by themselves.
    A pid whose command line is no TaskManager's (the pid was reused) is left alone."""
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if process_alive(pid) and b"taskmanager" in command:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (its children, theirs...), as ``/proc`` shows them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, []))
    return tree


def listening_sockets(pids: Iterable[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of each TCP socket that one of ``pids`` listens on, IPv4 and IPv6
    (an IPv4-mapped address as its IPv4 form), from ``/proc``."""
    owners: dict[str, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):  # none once it ended
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[target[len("socket:[") : -1]] = pid
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in owners:  # 0A: LISTEN
                continue
            address_hex, port_hex = local.split(":")
            raw = bytes.fromhex(address_hex)
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(words)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            found.append((str(address), int(port_hex, 16), owners[inode]))
    return found


# --------------------------------------------------------------------------- in a terminal


@dataclass
class TerminalRun:
    """A child run on a pseudo-terminal: its exit code and every byte it wrote there."""

    returncode: int
    output: bytes
    columns: int
    rows: int

    def text_lines(self) -> list[str]:
        """The lines as written, escape sequences removed (each as the last carriage return
        left it): what a terminal wide enough never to wrap would show per line."""
        text = _ESCAPE_SEQUENCE.sub("", self.output.decode(errors="replace"))
        return [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]

    def screen_lines(self) -> list[str]:
        """What the terminal shows at the end, with everything scrolled off above it: the
        output read by a terminal emulator (``pyte``) of the run's size, trailing blanks cut."""
        import pyte  # the dev extra's; only the terminal tests need it

        screen = pyte.HistoryScreen(self.columns, self.rows, history=100_000, ratio=0.5)
        pyte.ByteStream(screen).feed(self.output)
        scrolled = [
            "".join(line[x].data for x in range(self.columns)).rstrip()
            for line in screen.history.top
        ]
        lines = scrolled + [line.rstrip() for line in screen.display]
        while lines and not lines[-1]:
            lines.pop()
        return lines


_ESCAPE_SEQUENCE = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


def run_in_terminal(
    *args: str,
    columns: int = 80,
    rows: int = 24,
    timeout: float = RUN_TIMEOUT_S,
    stdout_path: Path | None = None,
) -> TerminalRun:
    """Run ``python -m runtime ARGS`` with stdin, stdout and stderr on one pseudo-terminal of
    ``columns`` x ``rows`` (also in ``COLUMNS``/``LINES``), to its end; stdout into the file
    ``stdout_path`` instead, if given (``> file`` in a shell)."""
    master_fd, child_fd = os.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(COLUMNS=str(columns), LINES=str(rows), TERM="xterm-256color")
    stdout = open(stdout_path, "wb") if stdout_path is not None else None
    try:
        proc = subprocess.Popen(
            runtime_command(*args),
            cwd=ROOT,
            stdin=child_fd,
            stdout=child_fd if stdout is None else stdout,
            stderr=child_fd,
            env=env,
            start_new_session=True,
        )
    finally:
        os.close(child_fd)
        if stdout is not None:
            stdout.close()
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stop_process(proc)
                msg = f"timed out after {timeout}s in a terminal: {output.decode(errors='replace')}"
                raise AssertionError(msg)
            ready, _, _ = select.select([master_fd], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(master_fd, 65536)
            except OSError:  # EIO: every process holding the terminal closed it
                break
            if not chunk:
                break
            output += chunk
        returncode = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        os.close(master_fd)
        stop_process(proc)
    return TerminalRun(returncode, bytes(output), columns, rows)


def replace_in_file(path: Path, old: str, new: str) -> None:
    """Edit ``path`` as an editor saves it: ``old`` (which must occur exactly once) becomes
    ``new``, written to a temporary file renamed over the old one."""
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path}"
    temporary = path.with_name(f".{path.name}.swp")
    temporary.write_text(text.replace(old, new))
    os.replace(temporary, path)


def stderr_line(stderr: Path, pattern: str, after: int = 0) -> re.Match[str] | None:
    """The first match of the regular expression ``pattern`` in a line of ``stderr`` past its
    first ``after`` characters (None while there is none)."""
    if not stderr.exists():
        return None
    return re.search(pattern, stderr.read_text()[after:], re.MULTILINE)
