"""Named crash points for fault-injection tests (armed through ``runtime.testing``).

A point is armed with ``arm(name, hit=N, mode=...)``; the N-th time the runtime passes it in this
process, it crashes: ``raise`` throws :class:`InjectedCrash` (the task fails and the restart
strategy takes over), ``exit`` ends the process at once with status 137, like a SIGKILL.
Points: ``before-snapshot`` (a task is about to snapshot), ``before-commit`` (a two-phase sink
pre-committed for a completed checkpoint and is about to commit), ``during-restore`` (an operator
is restoring state).
"""

from __future__ import annotations

import os
import sys

POINTS = ("before-snapshot", "before-commit", "during-restore")


class InjectedCrash(RuntimeError):
    """A crash injected on purpose at a named point."""


_armed: dict[str, tuple[int, str]] = {}
_hits: dict[str, int] = {}


def arm(point: str, hit: int = 1, mode: str = "raise") -> None:
    if point not in POINTS:
        msg = f"unknown crash point {point!r}; known: {', '.join(POINTS)}"
        raise ValueError(msg)
    if mode not in ("raise", "exit"):
        msg = f"crash mode must be 'raise' or 'exit', got {mode!r}"
        raise ValueError(msg)
    _armed[point] = (hit, mode)
    _hits[point] = 0


def disarm_all() -> None:
    _armed.clear()
    _hits.clear()


def crash_point(point: str, where: str) -> None:
    """Crash here if ``point`` is armed and this is its N-th hit."""
    armed = _armed.get(point)
    if armed is None:
        return
    _hits[point] = _hits.get(point, 0) + 1
    hit, mode = armed
    if _hits[point] != hit:
        return
    del _armed[point]
    message = f"injected crash at {point} ({where})"
    if mode == "exit":
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os._exit(137)
    raise InjectedCrash(message)
