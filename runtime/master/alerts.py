"""Checkpoint-failure alerting: N failed checkpoints within a time window raise an alert.

A job that keeps failing its checkpoints still runs (up to ``tolerable_failures`` consecutive
ones), but it stops making progress that survives a failover, and the sinks of a two-phase commit
stop committing. So when ``failures`` checkpoints failed within ``window_s`` (Youzan's alert on
checkpoint failures over a window), the :class:`CheckpointFailureAlarm` of the checkpoint
coordinator logs an ERROR naming the job, the count, the window and the last failure's reason,
raises the alert that ``/status`` (``"alert"``) and ``/metrics``
(``pyflow_checkpoint_failure_alert``) show, and calls the user's hook once. The next completed
checkpoint clears the alert and starts the count afresh: failures before it are forgiven, since
the job checkpointed again.

A failure is what counts against ``tolerable_failures`` too: a checkpoint (not a savepoint)
declined by a task, expired, or not written; an abort that is no failure (a task finished before
acknowledging, a checkpoint subsumed by a newer one) does not count.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from runtime.api.durations import format_duration, parse_duration

log = logging.getLogger(__name__)

HOOK_NAME = "on_checkpoint_failure_alert"
"""The name of the hook a job file may define at its top level: ``def on_checkpoint_failure_alert
(alert)``, called with a :class:`CheckpointFailureAlert` (``python -m runtime run`` picks it up)."""


@dataclass(frozen=True)
class CheckpointFailureThreshold:
    """Alert when ``failures`` checkpoints failed within ``window_s`` seconds."""

    failures: int
    window_s: float

    def __post_init__(self) -> None:
        if self.failures < 1:
            msg = f"checkpoint failure alert: the count must be at least 1, got {self.failures}"
            raise ValueError(msg)
        if self.window_s <= 0:
            msg = f"checkpoint failure alert: the window must be positive, got {self.window_s}s"
            raise ValueError(msg)

    @classmethod
    def parse(cls, text: str) -> CheckpointFailureThreshold:
        """``N/WINDOW`` as on the command line: ``3/10min``, ``1/30s``."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\S.*?)\s*", text)
        if match is None:
            msg = (
                f"invalid checkpoint failure alert {text!r}: use N/WINDOW, e.g. 3/10min "
                "(3 failed checkpoints within 10 minutes)"
            )
            raise ValueError(msg)
        try:
            window_s = parse_duration(match.group(2))
        except ValueError as exc:
            msg = f"invalid checkpoint failure alert {text!r}: {exc}"
            raise ValueError(msg) from None
        return cls(int(match.group(1)), window_s)

    def describe(self) -> str:
        return f"{self.failures}/{format_duration(self.window_s)}"


@dataclass(frozen=True)
class CheckpointFailureAlert:
    """What the hook receives when the alert fires."""

    job: str
    failures: int
    """Checkpoints that failed within the window (at least the threshold's count)."""
    window_s: float
    checkpoint_id: int
    """The checkpoint whose failure raised the alert."""
    reason: str
    """Why it failed."""
    message: str
    """The whole alert as one line (the ERROR logged, ``/status``'s ``alert.message``)."""


AlertHook = Callable[[CheckpointFailureAlert], None]
"""Called on the job master's event loop when the alert fires: it must not block (hand slow work
such as an HTTP call to a thread); an exception it raises is logged and otherwise ignored."""


class CheckpointFailureAlarm:
    """The alert's state machine, driven by the checkpoint coordinator with its clock's time (so
    tests move it on virtual time). Without a threshold it never fires."""

    def __init__(
        self,
        job: str,
        threshold: CheckpointFailureThreshold | None,
        hook: AlertHook | None = None,
    ) -> None:
        self.job = job
        self.threshold = threshold
        self.hook = hook
        self.active: CheckpointFailureAlert | None = None
        """The alert while it is raised; None otherwise."""
        self._failures: deque[float] = deque()

    def on_failure(self, now_s: float, checkpoint_id: int, reason: str) -> None:
        """A checkpoint failed at ``now_s`` (the coordinator's monotonic seconds)."""
        threshold = self.threshold
        if threshold is None:
            return
        failures = self._failures
        failures.append(now_s)
        while failures and failures[0] <= now_s - threshold.window_s:
            failures.popleft()
        if self.active is not None or len(failures) < threshold.failures:
            return
        window = format_duration(threshold.window_s)
        message = (
            f"job {self.job!r}: {len(failures)} checkpoints failed within {window} (alert at "
            f"{threshold.describe()}); last: checkpoint {checkpoint_id}: {reason}"
        )
        alert = CheckpointFailureAlert(
            self.job, len(failures), threshold.window_s, checkpoint_id, reason, message
        )
        self.active = alert
        log.error("checkpoint failure alert: %s", message)
        if self.hook is not None:
            try:
                self.hook(alert)
            except Exception:
                log.exception("the checkpoint failure alert hook of job %r raised", self.job)

    def on_completed(self, checkpoint_id: int) -> None:
        """A checkpoint completed: the alert clears and the count starts afresh."""
        self._failures.clear()
        if self.active is not None:
            log.warning(
                "checkpoint failure alert of job %r cleared: checkpoint %d completed",
                self.job,
                checkpoint_id,
            )
            self.active = None
