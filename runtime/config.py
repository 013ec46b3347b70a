"""The job's configuration in one typed home: every default the job master, the checkpoint
coordinator and ``python -m runtime run`` use is defined here, or named here from the one data-plane
constant that defines it (``actors`` and ``state`` sit below ``runtime`` and cannot import it).

The CLI takes its option defaults, and the defaults its ``--help`` shows, from these dataclasses and
constants, so a default changes in one place. Durations are seconds (``*_s``); the CLI parses them
from text like ``500ms``, ``5s``, ``1min`` (:func:`runtime.api.durations.parse_duration`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.barriers import CheckpointingMode
from actors.network import DEFAULT_EXCLUSIVE_CREDITS, DEFAULT_FLOATING_BUFFERS
from actors.operator import NewerOutputPolicy
from actors.task import DEFAULT_BUFFER_TIMEOUT_S
from actors.timers import Clock, SystemClock
from actors.writer import DEFAULT_BUFFER_SIZE
from runtime.master.alerts import AlertHook, CheckpointFailureThreshold
from runtime.master.restart import NoRestart, RestartStrategy
from state.keygroups import DEFAULT_MAX_PARALLELISM as DEFAULT_MAX_PARALLELISM

DEFAULT_PARALLELISM = 1
"""Subtasks of each operator that sets no parallelism of its own."""

DEFAULT_MALLOC_TRIM_THRESHOLD_BYTES = 32 << 20
"""Freed heap that glibc keeps for reuse before handing it back to the kernel, in every process of
the runtime (``runtime/process.py`` says why; ``$PYFLOW_MALLOC_TRIM_THRESHOLD`` overrides it)."""

DEFAULT_THREAD_SWITCH_INTERVAL_S = 0.0005
"""How soon a thread that serves the event loop (the checkpoint writer, a TaskManager's control
link) gets the GIL from the busy loop thread, in every process of the runtime; Python's default is
5 ms (``runtime/process.py`` says why)."""

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
"""On SIGTERM, how long the stop with savepoint or the cancel may take before the exit is forced."""

DEFAULT_AUTO_WATERMARK_INTERVAL_S = 0.2
"""Periodic watermark emission (Flink's ``pipeline.auto-watermark-interval``)."""

DEFAULT_REST_HOST = "127.0.0.1"
"""The control endpoint listens on loopback only unless asked otherwise."""

DEFAULT_REST_PORT = 0
"""Port of the control endpoint: 0 lets the system pick a free one."""

DEFAULT_JOBMANAGER_HOST = "127.0.0.1"
"""The JobManager listens for its TaskManagers' control connections on loopback only unless asked
otherwise (TaskManagers on other machines must reach it)."""


@dataclass
class CheckpointConfig:
    interval_s: float | None = None
    """Periodic checkpoints every so many seconds; None: only final checkpoints and savepoints."""
    mode: CheckpointingMode = CheckpointingMode.EXACTLY_ONCE
    timeout_s: float = 600.0
    """A checkpoint not completed within this time is aborted."""
    min_pause_s: float = 0.0
    """Least time from the completion of one checkpoint to the trigger of the next."""
    max_concurrent: int = 1
    tolerable_failures: int = 0
    """Consecutive failed checkpoints tolerated; one more fails the job over."""
    retained: int = 1
    """Completed checkpoints kept; older ones are subsumed and discarded from the storage."""
    retain_on_cancel: bool = True
    alert_on_failures: CheckpointFailureThreshold | None = None
    """Raise the checkpoint failure alert when so many checkpoints failed within a window (see
    :mod:`runtime.master.alerts`); None: no alert."""
    on_failure_alert: AlertHook | None = None
    """Called with a :class:`~runtime.master.alerts.CheckpointFailureAlert` when the alert
    fires (on the job master's event loop: it must not block, a coroutine function runs as a
    task; what it raises is logged)."""


@dataclass
class ExecutionConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    restart_strategy: RestartStrategy = field(default_factory=NoRestart)
    buffer_size: int = DEFAULT_BUFFER_SIZE
    buffer_timeout_s: float = DEFAULT_BUFFER_TIMEOUT_S
    exclusive_credits: int = DEFAULT_EXCLUSIVE_CREDITS
    floating_buffers: int = DEFAULT_FLOATING_BUFFERS
    auto_watermark_interval_s: float = DEFAULT_AUTO_WATERMARK_INTERVAL_S
    """How often sources and timestamp assigners emit watermarks (and detect idleness) besides
    after records; 0 turns the periodic emission off."""
    clock: Clock = field(default_factory=SystemClock)
    """Processing time of the tasks in this process (timers, periodic watermarks, idleness)."""
    allow_non_restored_state: bool = False
    """Restored state that does not fit the job is dropped knowingly instead of refused."""
    on_newer_committed_output: NewerOutputPolicy = NewerOutputPolicy.MOVE
    allow_existing_output: bool = False
