"""Log storms folded into one line per cause: a client library that retries in a loop (aiokafka
reconnecting to a broker that went away logs every attempt) would bury everything else.

:class:`RepeatFolder` is a filter for the handlers (a logger's own filters do not see its
children's records), scoped to some loggers: the first record of each cause passes, repeats are
counted and dropped, and the next repeat after ``interval_s`` passes with ``(repeated N times in
the last 10s)`` appended. A cause is the logger, the level and the formatted message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from runtime.api.durations import format_duration

KAFKA_CLIENT_LOGGERS = ("aiokafka",)
"""The loggers (with their children) of the Kafka client library."""

DEFAULT_FOLD_INTERVAL_S = 10.0


@dataclass
class _Cause:
    last_shown: float
    repeats: int = 0


class RepeatFolder(logging.Filter):
    """Folds the repeats of each cause logged by ``loggers`` (and their children); records of
    other loggers pass untouched."""

    def __init__(
        self,
        loggers: Iterable[str] = KAFKA_CLIENT_LOGGERS,
        interval_s: float = DEFAULT_FOLD_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.loggers = tuple(loggers)
        self.interval_s = interval_s
        self.clock = clock
        self._causes: dict[tuple[str, int, str], _Cause] = {}

    def _in_scope(self, name: str) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in self.loggers)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._in_scope(record.name):
            return True
        message = record.getMessage()
        key = (record.name, record.levelno, message)
        now = self.clock()
        cause = self._causes.get(key)
        if cause is None:
            self._causes[key] = _Cause(now)
            return True
        cause.repeats += 1
        elapsed = now - cause.last_shown
        if elapsed < self.interval_s:
            return False
        record.msg = (
            f"{message} (repeated {cause.repeats} times in the last {format_duration(round(elapsed, 1))})"
        )
        record.args = None
        cause.last_shown, cause.repeats = now, 0
        return True


def fold_repeats(
    loggers: Iterable[str] = KAFKA_CLIENT_LOGGERS, interval_s: float = DEFAULT_FOLD_INTERVAL_S
) -> RepeatFolder:
    """Install a :class:`RepeatFolder` on every handler of the root logger; returns it."""
    folder = RepeatFolder(loggers, interval_s)
    for handler in logging.getLogger().handlers:
        handler.addFilter(folder)
    return folder
