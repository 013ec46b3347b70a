"""Restart strategies: after a failed attempt, whether and when to restart from the latest checkpoint.

``next_delay(failure, now)`` returns the seconds to wait before the next attempt, or ``None`` to
give up (the job fails with the failure named); the job master logs each restart at WARNING with
its cause.

The default follows Flink (1.19+): with periodic checkpointing, ``exponential-delay`` from 1s,
doubling up to 1min, with unlimited attempts, and the delay reset after an hour without failure
(so a broker outage of any length is ridden out, and a job failing deterministically keeps
retrying about once a minute, saying why each time); without checkpointing, ``none`` (a restart
would go back to the beginning).
"""

from __future__ import annotations

from collections import deque

from runtime.api.durations import format_duration, parse_duration

DEFAULT_INITIAL_DELAY_S = 1.0
DEFAULT_MAX_DELAY_S = 60.0


class RestartStrategy:
    name = "restart-strategy"

    def next_delay(self, failure: BaseException, now: float) -> float | None:
        raise NotImplementedError

    def describe(self) -> str:
        """The strategy and its settings, for the start-up lines."""
        return self.name


class NoRestart(RestartStrategy):
    name = "none"

    def next_delay(self, failure: BaseException, now: float) -> float | None:
        return None


class FixedDelayRestart(RestartStrategy):
    """Up to ``attempts`` restarts, each after ``delay_s``."""

    name = "fixed-delay"

    def __init__(self, attempts: int = 3, delay_s: float = 1.0) -> None:
        self.attempts = attempts
        self.delay_s = delay_s
        self.restarts = 0

    def next_delay(self, failure: BaseException, now: float) -> float | None:
        if self.restarts >= self.attempts:
            return None
        self.restarts += 1
        return self.delay_s

    def describe(self) -> str:
        return f"{self.name} ({self.attempts} attempts, {format_duration(self.delay_s)} apart)"


class FailureRateRestart(RestartStrategy):
    """Restart after ``delay_s`` unless more than ``max_failures`` happened within ``interval_s``."""

    name = "failure-rate"

    def __init__(
        self, max_failures: int = 3, interval_s: float = 60.0, delay_s: float = 1.0
    ) -> None:
        self.max_failures = max_failures
        self.interval_s = interval_s
        self.delay_s = delay_s
        self._failures: deque[float] = deque()

    def next_delay(self, failure: BaseException, now: float) -> float | None:
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.interval_s:
            self._failures.popleft()
        if len(self._failures) > self.max_failures:
            return None
        return self.delay_s

    def describe(self) -> str:
        return (
            f"{self.name} (at most {self.max_failures} failures per "
            f"{format_duration(self.interval_s)}, {format_duration(self.delay_s)} apart)"
        )


class ExponentialDelayRestart(RestartStrategy):
    """Delays that double from ``initial_s`` up to ``max_s``; reset after ``reset_after_s`` of
    quiet. ``attempts`` (0 = unlimited) caps the restarts."""

    name = "exponential-delay"

    def __init__(
        self,
        initial_s: float = DEFAULT_INITIAL_DELAY_S,
        max_s: float = DEFAULT_MAX_DELAY_S,
        multiplier: float = 2.0,
        reset_after_s: float = 3600.0,
        attempts: int = 0,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.multiplier = multiplier
        self.reset_after_s = reset_after_s
        self.attempts = attempts
        self._current = 0.0
        self._last_failure: float | None = None
        self.restarts = 0

    def next_delay(self, failure: BaseException, now: float) -> float | None:
        if self.attempts and self.restarts >= self.attempts:
            return None
        if self._last_failure is not None and now - self._last_failure > self.reset_after_s:
            self._current = 0.0
        self._last_failure = now
        self._current = (
            self.initial_s
            if self._current == 0
            else min(self.max_s, self._current * self.multiplier)
        )
        self.restarts += 1
        return self._current

    def describe(self) -> str:
        attempts = f"{self.attempts} attempts" if self.attempts else "unlimited attempts"
        return (
            f"{self.name} ({format_duration(self.initial_s)} \u2192 "
            f"{format_duration(self.max_s)}, {attempts}, reset after "
            f"{format_duration(self.reset_after_s)} without failure)"
        )


def default_restart_strategy(checkpointing: bool) -> RestartStrategy:
    """Flink's default: ``exponential-delay`` with periodic checkpointing, ``none`` without."""
    return ExponentialDelayRestart() if checkpointing else NoRestart()


def parse_restart_strategy(spec: str) -> RestartStrategy:
    """``none``, ``fixed-delay[:ATTEMPTS[:DELAY]]``, ``failure-rate[:MAX:INTERVAL[:DELAY]]``,
    ``exponential-delay[:INITIAL[:MAX]]``; durations like ``500ms``, ``5s``, ``1min``."""
    name, *args = spec.split(":")
    try:
        if name == "none":
            return NoRestart()
        if name == "fixed-delay":
            attempts = int(args[0]) if args else 3
            delay = parse_duration(args[1]) if len(args) > 1 else 1.0
            return FixedDelayRestart(attempts, delay)
        if name == "failure-rate":
            max_failures = int(args[0]) if args else 3
            interval = parse_duration(args[1]) if len(args) > 1 else 60.0
            delay = parse_duration(args[2]) if len(args) > 2 else 1.0
            return FailureRateRestart(max_failures, interval, delay)
        if name == "exponential-delay":
            initial = parse_duration(args[0]) if args else DEFAULT_INITIAL_DELAY_S
            maximum = parse_duration(args[1]) if len(args) > 1 else DEFAULT_MAX_DELAY_S
            return ExponentialDelayRestart(initial, maximum)
    except ValueError as exc:
        msg = f"invalid restart strategy {spec!r}: {exc}"
        raise ValueError(msg) from exc
    msg = (
        f"unknown restart strategy {spec!r}: use none, fixed-delay[:ATTEMPTS[:DELAY]], "
        "failure-rate[:MAX:INTERVAL[:DELAY]] or exponential-delay[:INITIAL[:MAX]]"
    )
    raise ValueError(msg)
